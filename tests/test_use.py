"""``lpeer score / generate / export`` (issue 26) on tiny trained runs: scores against the run's own evaluation and
a slow recomputation, novelty against the growth the run would make, dating, sampling and the export round trip."""

from __future__ import annotations

import json
import math
import shlex
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from peer_helpers import TINY_LM, TOY_WORDS
from safetensors.torch import load_file
from typer.testing import CliRunner

from lifelong_peer.cli.main import app
from lifelong_peer.export import load_exported
from lifelong_peer.generate import SampleConfig, generate, top_p_filter
from lifelong_peer.model import LanguageModel, ModelConfig
from lifelong_peer.run import new_run, open_run
from lifelong_peer.runops import grow_run
from lifelong_peer.streams import ingest
from lifelong_peer.train import run_phases
from lifelong_peer.use import load_model, novelty, pack, score_tokens, split_documents
from lifelong_peer.workspace import Workspace

runner = CliRunner()
TRAIN = {"steps": 6, "batch_size": 4, "eval_tokens": 256, "usage_tokens": 256, "warmup": 1, "lr": 3e-3}

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def built(tmp_path_factory, one_thread):
    """Stream ``toy`` (slices 2001-2003) and ``later`` (2004, another file); run ``r`` trained on 2001, 2002 keeping
    every phase's model, run ``p`` on all three keeping only the latest."""
    root = tmp_path_factory.mktemp("use")
    rng = np.random.default_rng(0)

    def docs(year, words):
        return [{"id": f"{year}-{d}", "text": " ".join(rng.choice(words.split(), 40)), "time": f"{year}-03-01"} for d in range(40)]  # fmt: skip

    lines = [d for year, words in TOY_WORDS.items() for d in docs(year, words)]
    (root / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in lines))
    (root / "later.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs(2004, "keys of the frozen model")))
    ws = Workspace.init(root / "ws")
    ingest(ws, str(root / "docs.jsonl"), "toy", split=(0.6, 0.2, 0.2))
    ingest(ws, str(root / "later.jsonl"), "later", split=(0.6, 0.2, 0.2))
    run_phases(new_run(ws, "toy", "naive", TRAIN | {"keep_checkpoints": "all"}, TINY_LM, run_id="r", slices=["2001", "2002"]))  # fmt: skip
    run_phases(new_run(ws, "toy", "naive", TRAIN, TINY_LM, run_id="p"))
    return root


def _cli(root, *args) -> dict:
    result = runner.invoke(app, [*args, "-w", str(root / "ws"), "--format", "json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _fails(root, *args) -> str:
    result = runner.invoke(app, [*args, "-w", str(root / "ws")])
    assert result.exit_code != 0 and result.exception is not None
    return str(result.exception)


def _run(root, run="r"):
    return open_run(Workspace.open(root / "ws"), run)


# --- score ------------------------------------------------------------------------------------------------


def test_a_file_of_held_out_documents_scores_as_the_run_evaluated_it(built, tmp_path):
    """The test split's documents, written to a JSONL file and read back like ingest reads: with the run's
    eval_tokens, the score is results.json's entry for that phase and slice (the evaluation during training)."""
    run = _run(built)
    results = json.loads((run.dir / "results.json").read_text())
    sep = run.stream.tokenizer.separator_id
    for slice_index, name in enumerate(run.config.slices):
        documents = [bytes(d[1:]).decode() for d in split_documents(run.slice_data(name).tokens("test"), sep)]
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"body": text}) + "\n" for text in documents))
        for phase in (0, 1):
            got = _cli(built, "score", "r", str(path), "--phase", str(phase), "--max-tokens", "256", "--text-field", "body")  # fmt: skip
            after = results["eval"]["test"]["after"][phase]
            assert got["documents"] == len(documents) and got["checkpoint"] == f"phase-{phase:03d}.safetensors"
            assert got["score"]["tokens"] == after["tokens"][slice_index]
            assert got["score"]["bpb"] == pytest.approx(after["bpb"][slice_index], rel=1e-9)
            assert got["score"]["nll"] == pytest.approx(after["nll"][slice_index], rel=1e-9)


def _slow_score(model, tokens: np.ndarray, context: int) -> float:
    """Summed NLL (nats) of every token after the first, one window at a time from each multiple of ``context``."""
    total = 0.0
    t = torch.from_numpy(tokens.astype(np.int64))
    with torch.no_grad():
        for start in range(0, len(t) - 1, context):
            chunk = t[start : start + context + 1]
            logits, _ = model(chunk[None, :-1])
            total += float(F.cross_entropy(logits[0], chunk[1:], reduction="sum"))
    return total


@pytest.mark.parametrize("length", [5, 31, 32, 100])
def test_every_token_of_a_text_is_scored_once(built, length):
    run = _run(built)
    model = load_model(run, 1)["model"].eval()
    text = ("the peer expert stream " * 10)[:length]
    tokens, num_bytes = pack(run.stream.tokenizer, [text])
    assert tokens[0] == 0 and bytes(tokens[1:].tolist()).decode() == text and num_bytes == length
    got = score_tokens(model, tokens, num_bytes, run.config.context)
    assert got["tokens"] == len(tokens) - 1 and got["bytes"] == length
    assert got["bpb"] == pytest.approx(_slow_score(model, tokens, run.config.context) / (length * math.log(2)))


def test_text_or_file_and_what_is_refused(built, tmp_path):
    string = _cli(built, "score", "r", "the peer expert")
    assert string["source"] == "text" and string["bytes"] == 15 and string["phase"] == 1
    (tmp_path / "speech.txt").write_text("the peer expert")
    assert _cli(built, "score", "r", str(tmp_path / "speech.txt"))["score"] == string["score"]
    # the same two documents in every format ingest reads score alike
    docs = ["the peer expert", "time slice, and of"]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"body": d}) + "\n" for d in docs))
    (tmp_path / "docs.csv").write_text("body\n" + "".join(f'"{d}"\n' for d in docs))
    (tmp_path / "txt").mkdir()
    for i, d in enumerate(docs):
        (tmp_path / "txt" / f"{i}.txt").write_text(d)
    import datasets

    datasets.Dataset.from_dict({"body": docs}).save_to_disk(str(tmp_path / "saved"))
    scores = [_cli(built, "score", "r", str(tmp_path / name), "--text-field", "body") for name in ("docs.jsonl", "docs.csv", "saved")]  # fmt: skip
    scores.append(_cli(built, "score", "r", str(tmp_path / "txt")))
    assert all(s["documents"] == 2 and s["score"] == scores[0]["score"] for s in scores)
    assert "no such file" in _fails(built, "score", "r", str(tmp_path / "missing.jsonl"))
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": 3}\n')
    assert "bad.jsonl:2" in _fails(built, "score", "r", str(tmp_path / "bad.jsonl"))
    assert "no phase 2" in _fails(built, "score", "r", "text", "--phase", "2")
    assert "either" in _fails(built, "score", "r")


def test_all_phases_scores_each_kept_model_and_names_the_pruned(built):
    every = _cli(built, "score", "r", "the peer expert stream", "--all-phases")
    assert [row["phase"] for row in every["phases"]] == [-1, 0, 1] and every["note"] is None
    for row in every["phases"][1:]:
        one = _cli(built, "score", "r", "the peer expert stream", "--phase", str(row["phase"]))
        assert row["score"] == one["score"] and row["slice"] == _run(built).config.slices[row["phase"]]
    pruned = _cli(built, "score", "p", "the peer expert stream", "--all-phases")
    assert [row["pruned"] for row in pruned["phases"]] == [False, True, True, False]
    assert "0, 1" in pruned["note"] and "--keep-checkpoints all" in pruned["note"]
    assert "--keep-checkpoints all" in _fails(built, "score", "p", "text", "--phase", "0")


def test_dating_ranks_the_slices_by_the_model_that_trained_each(built):
    text = "time slice and of " * 8
    got = _cli(built, "score", "r", text, "--date")
    by_phase = {k: _cli(built, "score", "r", text, "--phase", str(k))["score"]["bpb"] for k in (0, 1)}
    assert [r["bpb"] for r in got["ranking"]] == sorted(by_phase.values())
    assert {r["slice"]: r["bpb"] for r in got["ranking"]} == {"2001": by_phase[0], "2002": by_phase[1]}
    assert got["guess"] == "2002" and got["chance"] == 0.5  # 2002's words, under the model that learnt them
    message = _fails(built, "score", "p", text, "--date")
    assert "dating needs the model of every phase" in message and "--keep-checkpoints all" in message


# --- novelty ----------------------------------------------------------------------------------------------


def test_novelty_is_the_need_the_next_growth_measures(built, tmp_path):
    got = _cli(built, "score", "r", "--slice", "2003")
    assert got["phase"] == 1 and list(got["old_slices"]) == ["2001", "2002"] and got["note"] is None
    results = json.loads((_run(built).dir / "results.json").read_text())
    after = results["eval"]["validation"]["after"][1]
    for i, name in enumerate(["2001", "2002"]):  # the old slices' evaluation, to the rounding of its bytes
        assert got["old_slices"][name] == pytest.approx(after["bpb"][i], rel=5e-3)
    assert got["need"] == pytest.approx(max(0.0, 1 - got["old_bpb"] / got["new_bpb"]))

    # the growth lpeer grow --auto --slice 2003 makes before the next phase measures the very same numbers
    shutil.copytree(built / "ws", tmp_path / "ws")
    grown = grow_run(open_run(Workspace.open(tmp_path / "ws"), "r"), auto=True, slice_name="2003")
    for layer, report in zip(got["layers"], grown["layers"], strict=True):
        assert report["need"] == got["need"] and report["poorly_served_new"] == layer["poorly_served_new"]
        assert report["k"] == layer["grow_auto_subkeys"]


def test_novelty_of_another_streams_slice(built):
    run = _run(built)
    other = novelty(run, "2004", stream="later", phase=0)
    assert other["stream"] == "later" and other["phase"] == 0 and list(other["old_slices"]) == ["2001"]
    assert other["new_bpb"] != novelty(_run(built), "2003", phase=0)["new_bpb"]
    assert all(0 <= layer["poorly_served_new"] <= 1 for layer in other["layers"])
    trained = novelty(run, "2001", phase=1)
    assert list(trained["old_slices"]) == ["2002"] and "was trained on" in trained["note"]
    assert "no slice" in _fails(built, "score", "r", "--slice", "1999")
    assert "--slice" in _fails(built, "score", "r", "--stream", "later")


# --- generate ---------------------------------------------------------------------------------------------


def test_top_p_keeps_the_smallest_nucleus():
    logits = torch.tensor([2.0, 0.5, 1.0, -1.0, 0.0])
    probs = torch.softmax(logits, -1)
    for p in (0.3, 0.5, 0.8, 0.95, 1.0):
        kept = torch.isfinite(top_p_filter(logits, p))
        order = torch.argsort(probs, descending=True).tolist()
        need = next(i for i in range(5) if float(probs[order[: i + 1]].sum()) >= p - 1e-7) + 1
        assert sorted(torch.nonzero(kept).flatten().tolist()) == sorted(order[:need]), p


def test_generation_is_reproducible_and_greedy_is_the_argmax(built):
    args = ("generate", "r", "--prompt", "the ", "--max-bytes", "24")
    one, two = _cli(built, *args, "--seed", "5"), _cli(built, *args, "--seed", "5")
    assert one == two and one["bytes"] <= 24 and one["tokens"]
    assert one["stopped"] == "end of document" or one["bytes"] == 24
    phase0 = _cli(built, *args, "--seed", "5", "--phase", "0")
    assert phase0["checkpoint"] == "phase-000.safetensors"

    run = _run(built)
    model = load_model(run, 1)["model"].eval()
    got = generate(model, run.stream.tokenizer, "time ", SampleConfig(temperature=0, max_bytes=12))
    ids = [0, *b"time "]
    with torch.no_grad():
        while len(ids) < 6 + 12:
            nxt = int(model(torch.tensor([ids[-32:]]))[0][0, -1].argmax())
            if nxt == 0:
                break
            ids.append(nxt)
    assert got["tokens"] == ids[6:]
    assert "--top-p" in _fails(built, "generate", "r", "--top-p", "0")


# --- export -----------------------------------------------------------------------------------------------


def test_export_round_trip_gives_the_same_logits(built, tmp_path):
    out = tmp_path / "exported"
    got = _cli(built, "export", "r", "--out", str(out), "--phase", "0")
    assert got["kind"] == "byte-level" and set(got["files"]) == {"README.md", "config.json", "model.safetensors"}
    idx = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    model = load_model(_run(built), 0)["model"].eval()
    with torch.no_grad():
        want = model(idx)[0]
        assert torch.equal(load_exported(out)(idx)[0], want)
        # the README's way without lifelong-peer's loader: config.json + any safetensors reader
        config = json.loads((out / "config.json").read_text())
        plain = LanguageModel(ModelConfig.from_dict(config["model_config"]))
        plain.load_state_dict(load_file(out / "model.safetensors"))
        assert torch.equal(plain.eval()(idx)[0], want)
    assert config["slices"] == ["2001"] and config["separator"] == 0 and config["tokenizer"] == "bytes"

    before = sorted(p.name for p in out.iterdir())
    assert "not empty" in _fails(built, "export", "r", "--out", str(out))
    assert sorted(p.name for p in out.iterdir()) == before
    _cli(built, "export", "r", "--out", str(out), "--force")
    with torch.no_grad():
        assert torch.equal(load_exported(out)(idx)[0], load_model(_run(built))["model"].eval()(idx)[0])
    assert [p.name for p in tmp_path.iterdir()] == ["exported"]  # no temporary directory left behind


# --- the README's examples --------------------------------------------------------------------------------


def test_the_readme_examples_run(tmp_path, monkeypatch):
    """The commands of the README's "Use what you trained", as written, on the walkthrough's generated stream:
    run ``news-naive-1`` trained on 2025's quarters (every phase's model kept), 2026-Q4 arriving later."""
    from test_walkthrough import README, write_news

    text = README.read_text()
    section = text.split("## Use what you trained", 1)[1].split("\n## ", 1)[0]
    block = section.split("```bash", 1)[1].split("```", 1)[0]
    commands = [c for line in block.splitlines() if (c := line.split("  #", 1)[0].strip())]
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LPEER_WORKSPACE", raising=False)
    write_news(tmp_path / "news.jsonl")
    with open(tmp_path / "news.jsonl", "a") as f:
        for d in range(30):
            f.write(
                json.dumps({"id": f"late-{d}", "text": "the market of the storm " * 8, "date": "2026-11-02"}) + "\n"
            )
    ws = Workspace.init(tmp_path)
    ingest(ws, "news.jsonl", "news", slice="quarter", time_field="date", split=(0.6, 0.2, 0.2))
    quarters = [f"2025-Q{q}" for q in range(1, 5)]
    run_phases(new_run(ws, "news", "naive", TRAIN | {"keep_checkpoints": "all"}, TINY_LM, run_id="news-naive-1", slices=quarters))  # fmt: skip
    (tmp_path / "article.jsonl").write_text(json.dumps({"text": "markets rally on rates and the team wins"}) + "\n")
    (tmp_path / "letter.txt").write_text("storm hits the coast of the new phone\n")
    assert len(commands) == 7
    for command in commands:
        result = runner.invoke(app, shlex.split(command)[1:])
        assert result.exit_code == 0, f"{command}\n{result.output}\n{result.exception!r}"
    python = section.split("```python", 1)[1].split("```", 1)[0]
    namespace: dict = {}
    exec(python, namespace)  # the README's own snippet
    assert isinstance(namespace["model"], LanguageModel)
