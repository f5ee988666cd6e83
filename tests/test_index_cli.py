"""``lpeer inspect / grow / freeze`` (issue 5) on a tiny trained run: JSON against the ledger and
brute force, edits reach the saved checkpoint, bad arguments are one-line errors before any work."""

from __future__ import annotations

import json
import math
import shutil
import sys
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from peer_helpers import TINY_LM, TOY_WORDS
from typer.testing import CliRunner

from lifelong_peer.cli.main import app, main
from lifelong_peer.index import UsageLedger, collect_usage
from lifelong_peer.peer import pair_of
from lifelong_peer.run import new_run, open_run
from lifelong_peer.runops import freeze_run, inspect_run, parse_expert_ids
from lifelong_peer.streams import ingest
from lifelong_peer.train import run_phases
from lifelong_peer.workspace import Workspace

runner = CliRunner()
TRAIN = {"steps": 4, "batch_size": 4, "eval_tokens": 256, "usage_tokens": 256, "warmup": 1}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def built(tmp_path_factory, one_thread):
    """A workspace with stream ``toy`` (slices 2001, 2002, 2003) and run ``r`` trained on 2001, 2002.
    Tests that edit the run work on a copy (``ws``); this one stays as trained."""
    root = tmp_path_factory.mktemp("index-cli")
    rng = np.random.default_rng(0)
    lines = []
    for year, words in TOY_WORDS.items():
        vocab = words.split()
        for d in range(40):
            text = " ".join(rng.choice(vocab, 40))
            lines.append(json.dumps({"id": f"{year}-{d}", "text": text, "time": f"{year}-{1 + d % 9:02d}-01"}))
    (root / "docs.jsonl").write_text("\n".join(lines) + "\n")
    ws = Workspace.init(root / "ws")
    ingest(ws, str(root / "docs.jsonl"), "toy", split=(0.6, 0.2, 0.2))
    run = new_run(ws, "toy", "naive", TRAIN, TINY_LM, run_id="r", slices=["2001", "2002"])
    run_phases(run)
    return root / "ws"


@pytest.fixture
def ws(built, tmp_path):
    shutil.copytree(built, tmp_path / "ws")
    return tmp_path / "ws"


def cli(*args) -> dict:
    result = runner.invoke(app, [*map(str, args), "--format", "json"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return json.loads(result.stdout)


def load(path):
    """The run as saved, freshly read from disk."""
    run = open_run(Workspace.open(path), "r")
    run.load_latest()
    return run


def layer_inputs(model, windows: torch.Tensor) -> dict[int, torch.Tensor]:
    """Each PEER layer's inputs (tokens, dim) for ``windows``, captured by pre-hooks (eval mode)."""
    seen: dict[int, torch.Tensor] = {}
    layers = model.peer_layers()
    hooks = [
        p.register_forward_pre_hook(lambda m, a, pos=pos: seen.__setitem__(pos, a[0].reshape(-1, a[0].shape[-1])))
        for pos, p in enumerate(layers)
    ]
    with torch.no_grad():
        model.eval()(windows)
    for h in hooks:
        h.remove()
    return seen


def brute_ids(peer, x: torch.Tensor) -> torch.Tensor:
    """(T, heads, topk) expert ids by scoring every one of the N experts."""
    with torch.no_grad():
        return peer.all_scores(x).topk(peer.config.topk, dim=-1).indices


# --- inspect ---------------------------------------------------------------------------------------------


def test_inspect_layers_match_the_ledger_by_hand_and_the_ledger_matches_brute_force(built):
    data = cli("inspect", "r", "-w", built)
    run = load(built)
    assert data["mode"] == "layers" and data["phase"] == 1 and len(data["layers"]) == 2
    assert data == json.loads(json.dumps(inspect_run(run)))  # the CLI prints the library's dict
    slices = ["2001", "2002"]
    for pos, (lay, peer) in enumerate(zip(data["layers"], run.model.peer_layers(), strict=True)):
        n = peer.num_experts
        assert lay["num_experts"] == n == 64 and lay["frozen"] == 0 and set(lay["slices"]) == set(slices)
        sets = {s: set(run.ledger.get(s, pos).ids.tolist()) for s in slices}
        assert lay["usage_pct"] == pytest.approx(100 * len(sets["2001"] | sets["2002"]) / n)
        assert lay["dead"] == n - len(sets["2001"] | sets["2002"])
        for s in slices:
            u = run.ledger.get(s, pos)
            z = [m / float(u.mass.sum()) for m in u.mass.tolist()]
            kl = math.log(n) + sum(p * math.log(p) for p in z if p > 0)
            got = lay["slices"][s]
            assert got["usage_pct"] == pytest.approx(100 * len(sets[s]) / n)
            assert got["kl_unevenness"] == pytest.approx(kl)
            assert got["tokens"] == u.tokens == 256
        jaccard = len(sets["2001"] & sets["2002"]) / len(sets["2001"] | sets["2002"])
        assert lay["overlap"]["2001"]["2002"] == pytest.approx(jaccard)
    # the ledger holds what the model retrieves: slice 2002 was recorded by this very model
    windows = run.windows("2002", "validation", TRAIN["usage_tokens"])[:, :-1]
    for pos, x in layer_inputs(run.model, windows).items():
        counts = Counter(brute_ids(run.model.peer_layers()[pos], x).flatten().tolist())
        u = run.ledger.get("2002", pos)
        assert dict(zip(u.ids.tolist(), u.counts.tolist(), strict=True)) == counts
    one = cli("inspect", "r", "-w", built, "--layer", "1")
    assert [lay["layer"] for lay in one["layers"]] == [1] and one["layers"][0] == data["layers"][1]
    human = runner.invoke(app, ["inspect", "r", "-w", str(built)])
    assert human.exit_code == 0 and "PEER layer 1" in human.stdout and "2002" in human.stdout


def test_inspect_expert_gives_its_pair_users_and_nearest_keys(built):
    run = load(built)
    u = run.ledger.total(1)
    top = int(u.ids[u.mass.argmax()])
    data = cli("inspect", "r", "-w", built, "--layer", "1", "--expert", top, "--nearest", 4)
    (e,) = data["experts"]
    assert e["id"] == top and e["layer"] == 1 and e["frozen"] is False
    assert e["pair"] == [int(v) for v in pair_of(torch.tensor(top))]
    for s in ("2001", "2002"):
        got = run.ledger.get(s, 1)
        hit = got.ids.tolist().index(top)
        assert e["slices"][s]["count"] == int(got.counts[hit])
    # brute force: cosine of keys [c_i; c'_j] against every other expert
    peer = run.model.peer_layers()[1]
    i, j = pair_of(torch.arange(peer.num_experts))
    keys = F.normalize(torch.cat([peer.subkeys[i, 0], peer.subkeys[j, 1]], dim=-1).detach(), dim=-1)
    sims = keys @ keys[top]
    sims[top] = -math.inf
    best = sims.topk(4)
    assert [n["score"] for n in e["nearest"]] == pytest.approx(best.values.tolist(), abs=1e-5)
    assert {n["id"] for n in e["nearest"]} == set(best.indices.tolist())
    both = cli("inspect", "r", "-w", built, "--expert", top)
    assert [x["layer"] for x in both["experts"]] == [0, 1]
    human = runner.invoke(app, ["inspect", "r", "-w", str(built), "--layer", "1", "--expert", str(top)])
    assert human.exit_code == 0 and "sub-key pair" in human.stdout


def test_inspect_text_shows_what_each_head_retrieves(built):
    text = "the peer expert"
    data = cli("inspect", "r", "-w", built, "--text", text)
    assert data["tokens"] == list(text.encode()) and "".join(data["pieces"]) == text and not data["truncated"]
    run = load(built)
    inputs = layer_inputs(run.model, torch.tensor([data["tokens"]]))
    for lay in data["layers"]:
        ids = torch.tensor(lay["ids"])
        assert ids.shape == (len(text), 2, 4)
        want = brute_ids(run.model.peer_layers()[lay["layer"]], inputs[lay["layer"]])
        assert torch.equal(ids.sort(dim=-1).values, want.sort(dim=-1).values)
        assert torch.tensor(lay["gates"]).sum(-1) == pytest.approx(torch.ones(len(text), 2))
    long = cli("inspect", "r", "-w", built, "--text", "x" * 50, "--layer", "0")
    assert long["truncated"] and len(long["tokens"]) == 32 and [x["layer"] for x in long["layers"]] == [0]
    human = runner.invoke(app, ["inspect", "r", "-w", str(built), "--text", text])
    assert human.exit_code == 0 and "head 1" in human.stdout and "'p'" in human.stdout


# --- grow --------------------------------------------------------------------------------------------------


def test_grow_subkeys_saves_the_grown_model(ws):
    before = load(ws)
    (r,) = cli("grow", "r", "-w", ws, "--subkeys", 2, "--layer", 0)["layers"]
    assert (r["layer"], r["k"], r["subkeys_before"], r["subkeys_after"]) == (0, 2, 8, 10)
    assert (r["experts_before"], r["experts_after"], r["placement"]) == (64, 100, "random")
    assert 0.0 <= r["changed_old"] <= 1.0  # measured on the trained slices' validation inputs
    after = load(ws)
    old, new = before.model.peer_layers(), after.model.peer_layers()
    assert new[0].num_experts == 100 and new[1].num_experts == 64
    assert after.model.config.peer_subkeys == [10, 8]
    assert torch.equal(new[0].U[:64], old[0].U) and torch.equal(new[0].V[:64], old[0].V)  # stable ids
    assert torch.equal(new[1].subkeys, old[1].subkeys)
    assert after.ledger.get("2001", 0).ids.tolist() == before.ledger.get("2001", 0).ids.tolist()
    edit = json.loads((ws / "runs/r/edits.jsonl").read_text().splitlines()[-1])
    assert edit["command"] == "grow" and edit["subkeys"] == 2
    again = cli("grow", "r", "-w", ws, "--subkeys", 1, "--slice", 2002, "--layer", 1)
    assert again["old_slices"] == ["2001"]  # a trained --slice is the new one, not an old one
    assert [(r["layer"], r["experts_after"]) for r in again["layers"]] == [(1, 81)]
    human = runner.invoke(app, ["grow", "r", "-w", str(ws), "--subkeys", "1", "--layer", "0"])
    assert human.exit_code == 0 and "100 → 121" in human.stdout and "saved" in human.stderr


def test_grow_for_a_new_slice_places_subkeys_and_auto_decides_k(ws):
    data = cli("grow", "r", "-w", ws, "--subkeys", 1, "--slice", 2003)
    assert data["slice"] == "2003" and data["old_slices"] == ["2001", "2002"]
    for r in data["layers"]:
        assert r["placement"] == "kmeans" and r["experts_after"] == 81
        assert 0.0 <= r["new_hit"] <= 1.0 and 0.0 <= r["poorly_served_new"] <= 1.0
    auto = cli("grow", "r", "-w", ws, "--auto", "--slice", 2003)
    after = load(ws)
    for r, peer in zip(auto["layers"], after.model.peer_layers(), strict=True):
        assert r["subkeys_before"] == 9 and r["experts_after"] == (9 + r["k"]) ** 2 == peer.num_experts
        assert r["placement"] == ("kmeans" if r["k"] > 0 else "random")
    assert (auto["checkpoint"] is None) == all(r["k"] == 0 for r in auto["layers"])


def test_an_edit_writes_a_new_checkpoint_and_eval_says_the_results_predate_it(ws):
    """Issue 17 item 2: grow/freeze rewrote the evaluated checkpoint in place, and eval kept showing the
    matrix and expert count of a model that no longer existed. The edit is a new checkpoint; eval and
    report say the results predate it (--reevaluate scores the edited model); the next phase starts
    from the edit; once it is evaluated the note goes."""
    from lifelong_peer.runops import add_slice

    run_dir = ws / "runs" / "r"
    evaluated = (run_dir / "checkpoints" / "phase-001.safetensors").read_bytes()
    results = (run_dir / "results.json").read_text()
    assert cli("eval", "r", "-w", ws)["edits_since_evaluation"] == []
    grown = cli("grow", "r", "-w", ws, "--subkeys", 2, "--layer", 0)
    assert grown["checkpoint"].endswith("phase-001-edit-1.safetensors")
    frozen = cli("freeze", "r", "-w", ws, "--policy", "all-old")
    assert frozen["checkpoint"].endswith("phase-001-edit-2.safetensors")
    assert (run_dir / "checkpoints" / "phase-001.safetensors").read_bytes() == evaluated  # kept as evaluated
    state = json.loads((run_dir / "state.json").read_text())
    assert state["checkpoint"] == "checkpoints/phase-001-edit-2.safetensors" and state["completed_phases"] == 2
    assert load(ws).model.peer_layers()[0].num_experts == 100  # what the run continues from

    data = cli("eval", "r", "-w", ws)
    assert len(data["edits_since_evaluation"]) == 2 and data["edited"] is None
    assert "phase-001-edit-2.safetensors" in data["edits_since_evaluation"][1]
    assert data["num_experts"][-1] == 128  # results.json: the model as evaluated, before the edits
    human = runner.invoke(app, ["eval", "r", "-w", str(ws)])
    assert human.exit_code == 0 and "predate its edits" in human.stderr and "--reevaluate" in human.stderr
    again = cli("eval", "r", "-w", ws, "--reevaluate")
    assert again["edited"]["num_experts"] == 100 + 64 and len(again["edited"]["bpb"]) == 2
    assert again["edited"]["frozen_fraction"] == 1.0
    assert (run_dir / "results.json").read_text() == results  # the phase rows are not rewritten
    report = cli("report", "r", "-w", ws, "--out", ws / "report")
    row = next(r for r in report["runs"] if r["run"] == "r")  # after the frozen-base row (issue 16)
    assert len(row["edits_since_evaluation"]) == 2 and "--reevaluate" in row["reevaluate"]
    human = runner.invoke(app, ["report", "r", "-w", str(ws), "--out", str(ws / "report")])
    assert human.exit_code == 0 and "run r's results predate its edits" in human.stderr

    run = open_run(Workspace.open(ws), "r")
    add_slice(run, "2003")
    run_phases(run)
    after = load(ws)
    assert after.model.peer_layers()[0].num_experts == 100  # phase 2 started from the edited model
    assert cli("eval", "r", "-w", ws)["edits_since_evaluation"] == []
    # issue 24: after phase 2 the older phase checkpoints are pruned (keep_checkpoints latest); edits are history
    assert not (run_dir / "checkpoints" / "phase-001.safetensors").exists()
    assert (run_dir / "checkpoints" / "phase-001-edit-2.safetensors").exists()
    # the new slice was scored by the base and the models still kept when it arrived; phase 0's was pruned
    rows = json.loads((run_dir / "results.json").read_text())["eval"]["validation"]
    assert rows["before"]["bpb"][2] > 0 and rows["after"][1]["bpb"][2] > 0 and rows["after"][0]["bpb"][2] is None


# --- freeze -----------------------------------------------------------------------------------------------


def usage_policy_by_hand(ledger: UsageLedger, layer: int, percent: float) -> set[int]:
    """The fewest experts (most mass first, ties by id) whose old-slice mass reaches ``percent``%."""
    mass: Counter = Counter()
    for s in ("2001", "2002"):
        u = ledger.get(s, layer)
        for i, m in zip(u.ids.tolist(), u.mass.tolist(), strict=True):
            mass[i] += m
    total, acc, out = sum(mass.values()), 0.0, set()
    for i, m in sorted(mass.items(), key=lambda kv: (-kv[1], kv[0])):
        if acc >= percent / 100 * total * (1 - 1e-12):
            break
        out.add(i)
        acc += m
    return out


def frozen_ids(path) -> list[set[int]]:
    return [set(p.frozen.nonzero().flatten().tolist()) for p in load(path).model.peer_layers()]


def test_freeze_policies_and_unfreeze_reach_the_checkpoint(ws):
    ledger = load(ws).ledger
    data = cli("freeze", "r", "-w", ws, "--policy", "usage:50")
    want = [usage_policy_by_hand(ledger, pos, 50) for pos in range(2)]
    assert frozen_ids(ws) == want and 0 < len(want[0]) < 64
    assert [r["frozen"] for r in data["layers"]] == [len(w) for w in want]
    assert [r["frozen_pct"] for r in data["layers"]] == pytest.approx([100 * len(w) / 64 for w in want])

    data = cli("freeze", "r", "-w", ws, "--policy", "all-old", "--freeze-subkeys")
    assert [r["frozen_pct"] for r in data["layers"]] == [100.0, 100.0]
    assert [r["frozen_subkeys_pct"] for r in data["layers"]] == [100.0, 100.0]
    assert frozen_ids(ws) == [set(range(64))] * 2

    data = cli("freeze", "r", "-w", ws, "--unfreeze", "0,3-5", "--layer", "0")
    assert [r["layer"] for r in data["layers"]] == [0] and data["layers"][0]["trainable"] == 4
    assert frozen_ids(ws) == [set(range(64)) - {0, 3, 4, 5}, set(range(64))]
    assert bool(load(ws).model.peer_layers()[0].frozen_subkeys.all())  # sub-keys only with --freeze-subkeys

    human = runner.invoke(app, ["freeze", "r", "-w", str(ws), "--unfreeze", "all"])
    assert human.exit_code == 0 and "unfreeze all" in human.stdout and "saved" in human.stderr
    after = load(ws).model.peer_layers()
    assert not any(bool(p.frozen.any()) or bool(p.frozen_subkeys.any()) for p in after)
    edits = [json.loads(line) for line in (ws / "runs/r/edits.jsonl").read_text().splitlines()]
    assert [e["action"] for e in edits] == ["usage:50", "all-old", "unfreeze 0,3-5", "unfreeze all"]


def test_freeze_policy_adds_to_the_frozen_set_unless_replace_is_asked_for(ws):
    """Issue 17 item 3: usage:90 after all-old silently replaced the frozen set (2,304 frozen experts
    became 234). A policy now adds (nothing is unfrozen); --replace replaces; both report before → after."""
    ledger = load(ws).ledger
    cli("freeze", "r", "-w", ws, "--policy", "all-old")
    data = cli("freeze", "r", "-w", ws, "--policy", "usage:50")
    assert data["mode"] == "add" and frozen_ids(ws) == [set(range(64))] * 2  # nothing unfrozen
    assert [(r["frozen_before"], r["frozen"], r["newly_frozen"], r["unfrozen"]) for r in data["layers"]] == [
        (64, 64, 0, 0)
    ] * 2
    data = cli("freeze", "r", "-w", ws, "--policy", "usage:50", "--replace")
    want = [usage_policy_by_hand(ledger, pos, 50) for pos in range(2)]
    assert data["mode"] == "replace" and frozen_ids(ws) == want
    assert [(r["frozen_before"], r["frozen"], r["unfrozen"]) for r in data["layers"]] == [
        (64, len(w), 64 - len(w)) for w in want
    ]
    cli("freeze", "r", "-w", ws, "--unfreeze", "all")
    grown = cli("freeze", "r", "-w", ws, "--policy", "usage:50")  # from nothing frozen, add == the policy
    assert frozen_ids(ws) == want and [r["newly_frozen"] for r in grown["layers"]] == [len(w) for w in want]
    human = runner.invoke(app, ["freeze", "r", "-w", str(ws), "--policy", "all-old"])
    assert human.exit_code == 0 and f"{len(want[0])} → 64" in human.stdout and "added to the frozen set" in human.stdout
    bad = runner.invoke(app, ["freeze", "r", "-w", str(ws), "--policy", "all-old", "--subkeys"])
    assert bad.exit_code != 0  # --subkeys is grow's number; freeze's flag is --freeze-subkeys
    assert "--freeze-subkeys" in runner.invoke(app, ["freeze", "--help"]).stdout


def test_freeze_tfidf_trains_only_the_top_experts_of_the_new_slice(ws):
    data = cli("freeze", "r", "-w", ws, "--policy", "tfidf:3", "--slice", "2003")
    run = load(ws)
    new = UsageLedger()
    collect_usage(run.model, run.windows("2003", "train", TRAIN["usage_tokens"])[:, :-1], new, "2003")
    for r, peer in zip(data["layers"], run.model.peer_layers(), strict=True):
        trained = set((~peer.frozen).nonzero().flatten().tolist())
        assert r["trainable"] == len(trained) == 3 and r["frozen"] == 61
        assert trained <= set(new.get("2003", r["layer"]).ids.tolist())  # only experts 2003 retrieves


def test_freeze_warns_when_the_runs_own_policy_will_recompute_it(ws):
    config = json.loads((ws / "runs/r/config.json").read_text())
    config["train"]["freeze"] = "all-old"
    (ws / "runs/r/config.json").write_text(json.dumps(config))
    run = open_run(Workspace.open(ws), "r")
    result = freeze_run(run, policy="none")
    assert "all-old" in result["note"] and "recomputes" in result["note"]
    assert result["layers"][0]["frozen"] == 0


def test_parse_expert_ids():
    assert parse_expert_ids("all") is None
    assert parse_expert_ids(" 7,3, 10-12,3").tolist() == [3, 7, 10, 11, 12]


# --- help and errors ------------------------------------------------------------------------------------


def test_help_has_summary_and_example():
    for command in ("inspect", "grow", "freeze"):
        result = runner.invoke(app, [command, "--help"])
        assert result.exit_code == 0 and "Example: lpeer" in result.stdout, command
    assert "recomputes its frozen set" in runner.invoke(app, ["freeze", "--help"]).stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["inspect", "nope"], "no run 'nope'"),
        (["inspect", "r", "--layer", "2"], "PEER layer 2 does not exist"),
        (["inspect", "r", "--layer", "0", "--expert", "64"], "expert 64 does not exist"),
        (["inspect", "r", "--expert", "-1"], "expert -1 does not exist"),
        (["inspect", "r", "--expert", "1", "--text", "a"], "either --expert ID or --text"),
        (["inspect", "r", "--text", ""], "--text is empty"),
        (["grow", "r", "--subkeys", "0"], "--subkeys must be a positive number"),
        (["grow", "r", "--subkeys", "-3"], "--subkeys must be a positive number"),
        (["grow", "r"], "give either --subkeys K or --auto --slice S"),
        (["grow", "r", "--subkeys", "2", "--auto", "--slice", "2003"], "give either --subkeys K or --auto"),
        (["grow", "r", "--auto"], "--auto needs --slice S"),
        (["grow", "r", "--auto", "--slice", "1999"], "has no slice '1999'"),
        (["grow", "r", "--subkeys", "2", "--layer", "5"], "PEER layer 5 does not exist"),
        (["freeze", "r"], "give either --policy POLICY or --unfreeze"),
        (["freeze", "r", "--policy", "usage:0"], "invalid freezing policy 'usage:0'"),
        (["freeze", "r", "--policy", "tfidf:3"], "give --slice S"),
        (["freeze", "r", "--policy", "all-old", "--slice", "nope"], "has no slice 'nope'"),
        (["freeze", "r", "--policy", "all-old", "--layer", "0"], "--layer applies to --unfreeze only"),
        (["freeze", "r", "--unfreeze", "3-1"], "invalid expert ids '3-1'"),
        (["freeze", "r", "--unfreeze", "2,64", "--layer", "1"], "expert 64 does not exist"),
        (["freeze", "r", "--unfreeze", "0", "--layer", "2"], "PEER layer 2 does not exist"),
    ],
)
def test_user_errors_exit_2_with_one_line_before_any_work(built, monkeypatch, capsys, args, message):
    checkpoint = built / "runs/r/checkpoints/phase-001.safetensors"
    saved = checkpoint.read_bytes()
    monkeypatch.setattr(sys, "argv", ["lpeer", *args, "-w", str(built)])
    with pytest.raises(SystemExit) as exit_:
        main()
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    assert message in err and err.strip().startswith("error:") and err.strip().count("\n") == 0
    assert checkpoint.read_bytes() == saved and not (built / "runs/r/edits.jsonl").exists()


def test_a_run_stopped_mid_phase_is_refused(ws, monkeypatch, capsys):
    state = json.loads((ws / "runs/r/state.json").read_text())
    (ws / "runs/r/state.json").write_text(json.dumps({**state, "phase": 1, "step": 2, "completed_phases": 1}))
    monkeypatch.setattr(sys, "argv", ["lpeer", "freeze", "r", "--policy", "all-old", "-w", str(ws)])
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 2 and "stopped in the middle of phase 1" in capsys.readouterr().err
