"""benchmarks/paper.py (issue 18): resuming skips finished runs; the aggregation against hand-made rows."""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("paper", ROOT / "benchmarks" / "paper.py")
paper = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(paper)
_usage_spec = importlib.util.spec_from_file_location("paper_usage", ROOT / "benchmarks" / "paper_usage.py")
paper_usage = importlib.util.module_from_spec(_usage_spec)
_usage_spec.loader.exec_module(paper_usage)

TINY = [
    "--sizes", "8,16", "--lrs", "1e-3,3e-3", "--seeds", "2", "--dim", "16", "--heads", "4", "--topk", "4",
    "--dim-key", "8", "--attn-heads", "2", "--layers", "2", "--steps", "2", "--warmup", "1",
    "--eval-tokens", "512", "--usage-tokens", "512",
]  # fmt: skip
SETUP = paper.setup_of(paper.parse_args(TINY))
LRS = [1e-3, 3e-3]


def row(model, n, lr, seed, val, test, bn=True, usage=((100.0, 0.3), (90.0, 0.5)), setup=SETUP):
    """A results-file row as train_one writes it (only the fields the aggregation reads are meaningful)."""
    return {
        "setup": setup,
        "spec": paper.spec(model, n, lr, seed, bn),
        "val_bpb": val,
        "test_bpb": test,
        "wall_s": 10.0,
        "params": 1000,
        "active_params": 100,
        "train_loss": [[100, 2.5 + seed], [200, 2.0 + seed]],
        "usage": [
            {"usage_pct": u, "kl_unevenness": kl, "dead": 0, "tokens": 1, "subkey_usage_pct": [100.0, u]}
            for u, kl in usage
        ]
        if model == "peer"
        else [],
    }


def hand_made() -> list[dict]:
    rows = [
        # n=8: 3e-3 wins the sweep on validation; its seeds' test bpb 2.0, 2.2, 2.4 → 2.2 ± 0.2
        row("peer", 8, 1e-3, 0, val=2.5, test=1.0),  # the losing lr: must not enter the test numbers
        row("peer", 8, 3e-3, 0, val=2.1, test=2.0),
        row("peer", 8, 3e-3, 1, val=2.3, test=2.2),
        row("peer", 8, 3e-3, 2, val=2.5, test=2.4),
        row("peer", 8, 1e-3, 1, val=9.0, test=9.0),  # a seed at the non-chosen lr: ignored
        # n=16: 1e-3 wins; test 1.4, 1.5, 1.6 → 1.5 ± 0.1 (gap 0.7 > 2 × 0.2: clear)
        row("peer", 16, 1e-3, 0, val=1.4, test=1.4),
        row("peer", 16, 3e-3, 0, val=1.6, test=1.0),
        row("peer", 16, 1e-3, 1, val=1.5, test=1.5),
        row("peer", 16, 1e-3, 2, val=1.6, test=1.6),
        # without BatchNorm at the chosen lrs (Table 2): more uneven
        row("peer", 8, 3e-3, 0, val=2.2, test=2.2, bn=False, usage=((80.0, 0.9), (60.0, 1.1))),
        row("peer", 16, 1e-3, 0, val=1.6, test=1.6, bn=False, usage=((70.0, 0.2), (50.0, 0.2))),
        row("dense", None, 1e-3, 0, val=3.0, test=3.0),
        row("peer", 8, 3e-3, 0, val=0.1, test=0.1, setup={**SETUP, "steps": 99}),  # another setup: ignored
    ]
    return rows


def test_aggregate_means_stds_lr_choice_and_checks():
    agg = paper.aggregate(hand_made(), SETUP, [8, 16], LRS)
    peer = {m["n"]: m for m in agg["models"] if m["model"] == "peer"}
    assert peer[8]["lr"] == 3e-3 and peer[16]["lr"] == 1e-3
    assert peer[8]["sweep_val_bpb"] == {1e-3: 2.5, 3e-3: 2.1}
    assert peer[8]["seeds"] == [0, 1, 2]
    assert peer[8]["test_bpb"]["mean"] == pytest.approx(2.2)
    assert peer[8]["test_bpb"]["std"] == pytest.approx(0.2)
    assert peer[16]["test_bpb"]["mean"] == pytest.approx(1.5)
    assert peer[16]["test_bpb"]["std"] == pytest.approx(0.1)
    dense = next(m for m in agg["models"] if m["model"] == "dense")
    assert dense["test_bpb"] == {"mean": 3.0, "std": None, "n": 1}
    (check,) = agg["fig3a"]["checks"]
    assert (check["from"], check["to"]) == (64, 256)
    assert check["gap"] == pytest.approx(0.7) and check["twice_spread"] == pytest.approx(0.4)
    assert check["lower"] and check["clear"] and agg["fig3a"]["monotone"] and agg["fig3a"]["clear"]
    # paired by seed: 2.0 − 1.4, 2.2 − 1.5, 2.4 − 1.6 = 0.6, 0.7, 0.8 → 0.7 ± 0.1 (clear)
    assert check["paired_gap"]["mean"] == pytest.approx(0.7) and check["paired_gap"]["std"] == pytest.approx(0.1)
    assert check["clear_paired"]
    t8, t16 = agg["table2"]
    assert t8["usage_pct_bn"]["mean"] == pytest.approx(statistics.fmean([95.0, 95.0, 95.0]))
    assert t8["kl_unevenness_bn"]["mean"] == pytest.approx(0.4) and t8["kl_unevenness_bn"]["n"] == 3
    assert t8["usage_pct_nobn"]["mean"] == pytest.approx(70.0) and t8["kl_unevenness_nobn"]["mean"] == pytest.approx(
        1.0
    )
    assert t16["kl_unevenness_nobn"]["mean"] == pytest.approx(0.2)
    # sub-keys: rows all used, columns as used as the experts (100, 90 per layer → 97.5, 95 → bound 95)
    assert t8["subkey_usage_pct_bn"]["mean"] == pytest.approx(97.5) and t8["grid_bound_pct_bn"]["mean"] == 95.0
    assert t8["subkey_usage_pct_nobn"]["mean"] == pytest.approx(85.0)  # (100 + 80)/2, (100 + 60)/2
    assert t8["test_bpb_nobn"] == {"mean": 2.2, "std": None, "n": 1} and t8["test_bpb_bn"]["mean"] == pytest.approx(2.2)
    assert agg["kl_lower_with_bn"] == [64]  # at 256 experts BatchNorm (0.4) is worse than none (0.2)
    # the run of another step budget is kept out of every number above, and shown as that budget's own
    (other,) = agg["other_budgets"]
    single = {"mean": 0.1, "std": None, "n": 1}
    assert other["models"] == [{"model": "peer", "experts": 64, "lr": 3e-3, "test_bpb": single}]
    assert other["steps"] == 99 and other["table2"][0]["usage_pct_bn"]["mean"] == pytest.approx(95.0)
    assert other["table2"][0]["kl_unevenness_nobn"] is None and len(other["table2"]) == 1
    md = paper.markdown(agg, None, 1.0)
    # Table 2 per budget: this budget's no BN → BN (70 → 95 %, KL 1.0 → 0.4), the other's BN only
    assert "| 64 | 70.0 → 95.0 ± 0.0 | 1.000 → 0.400 ± 0.000 | — → 95.0 | — → 0.400 |" in md
    assert "| 256 | 60.0 → 95.0 ± 0.0 | 0.200 → 0.400 ± 0.000 | — → — | — → — |" in md
    assert "| model | 2 steps | 99 steps |" in md and "| PEER, 64 experts | 2.2000 ± 0.2000 (3) | 0.1000 (1) |" in md
    assert "| PEER, 256 experts | 1.5000 ± 0.1000 (3) | — |" in md


def test_a_larger_pool_that_is_worse_or_within_noise_fails_the_checks():
    rows = hand_made()
    for r in rows:  # n=16 now 2.25 ± 0.1: worse than n=8's 2.2
        if r["spec"]["n"] == 16 and r["spec"]["lr"] == 1e-3 and r["spec"]["bn"]:
            r["test_bpb"] += 0.75
    agg = paper.aggregate(rows, SETUP, [8, 16], LRS)
    assert not agg["fig3a"]["monotone"] and not agg["fig3a"]["clear"]
    assert agg["fig3a"]["checks"][0]["paired_gap"]["mean"] == pytest.approx(-0.05)
    assert not agg["fig3a"]["checks"][0]["clear_paired"]
    for r in rows:  # a shared seed effect: unpaired the gap drowns in it, paired it stands out
        if r["spec"]["n"] == 16 and r["spec"]["lr"] == 1e-3 and r["spec"]["bn"]:
            r["test_bpb"] = {0: 1.9, 1: 2.1, 2: 2.3}[r["spec"]["seed"]]  # n=8: 2.0, 2.2, 2.4
    (check,) = paper.aggregate(rows, SETUP, [8, 16], LRS)["fig3a"]["checks"]
    assert check["gap"] == pytest.approx(0.1) and not check["clear"]  # 0.1 < 2 × 0.2
    assert check["paired_gap"]["mean"] == pytest.approx(0.1) and check["clear_paired"]  # std 0
    single = [r for r in hand_made() if r["spec"]["seed"] == 0]  # one seed: lower, but never "clear"
    agg = paper.aggregate(single, SETUP, [8, 16], LRS)
    assert agg["fig3a"]["monotone"] and not agg["fig3a"]["clear"]


def test_every_pool_is_also_checked_against_the_smallest():
    """64 → 256 → 1,024 experts: by the issue's (unpaired) test neither step is clear of the seed noise;
    paired, the whole span is, while the first step is not."""
    tests = {8: (2.0, 2.2, 2.4), 16: (1.95, 2.25, 2.3), 32: (1.8, 2.0, 2.2)}
    rows = [row("peer", n, 3e-3, s, val=t, test=t) for n, ts in tests.items() for s, t in enumerate(ts)]
    agg = paper.aggregate(rows, SETUP, [8, 16, 32], [3e-3])
    steps, span = agg["fig3a"]["checks"], agg["fig3a"]["against_smallest"]
    assert [(c["from"], c["to"]) for c in steps] == [(64, 256), (256, 1024)]
    assert [(c["from"], c["to"]) for c in span] == [(64, 256), (64, 1024)]
    assert not steps[0]["clear_paired"] and not steps[1]["clear"]
    assert span[1]["paired_gap"]["mean"] == pytest.approx(0.2) and span[1]["clear_paired"]
    md = paper.markdown(agg, None, 1.0)
    assert "| 64 → 1,024 | +0.2000 | 0.4000 | yes | no | +0.2000 ± 0.0000 | yes |" in md


def test_plan_order_and_lr_choice():
    def specs(todo):
        assert all(j["setup"] == SETUP for j in todo)
        return [j["spec"] for j in todo]

    models = [paper.spec("peer", 8, 1e-3, 0), paper.spec("peer", 16, 1e-3, 0), paper.spec("dense", None, 1e-3, 0)]
    todo = specs(paper.plan(SETUP, [], [8, 16], LRS, seeds=2, bn_seeds=1, dense_total=False))
    assert todo[:3] == models  # every model at the first lr first, then the rest of the sweep
    assert todo[3:] == [paper.spec(m["model"], m["n"], 3e-3, 0) for m in models]  # nothing at a guessed lr yet
    rows = [r for r in hand_made() if r["spec"]["seed"] == 0 and r["spec"]["bn"]]
    rows = [r for r in rows if r["spec"]["model"] == "peer" or r["spec"]["lr"] == 1e-3]  # dense: 3e-3 not done
    todo = specs(paper.plan(SETUP, rows, [8, 16], LRS, seeds=2, bn_seeds=1, dense_total=False))
    done = {paper._key(r["spec"]) for r in rows if r["setup"] == SETUP}
    assert not done & {paper._key(s) for s in todo}
    assert todo[0] == paper.spec("dense", None, 3e-3, 0)
    # the sweep chose 3e-3 for n=8: its no-BN run and its second seed use it
    assert paper.spec("peer", 8, 3e-3, 0, bn=False) in todo and paper.spec("peer", 8, 3e-3, 1) in todo
    assert paper.spec("peer", 8, 1e-3, 1) not in todo
    assert not [s for s in todo if s["model"] == "dense" and s["seed"] == 1]  # dense's sweep is unfinished
    no_bn = specs(paper.plan(SETUP, rows, [8, 16], LRS, seeds=2, bn_seeds=0, dense_total=False))
    assert [s for s in no_bn if s["bn"]] == no_bn and len(no_bn) == len(todo) - 2


def test_a_shorter_sweep_chooses_the_lr_of_the_longer_runs():
    """--sweep-steps: the sweep runs on a short setup; every seed of the long setup (seed 0 too) at its choice."""
    short = {**SETUP, "steps": 1}
    todo = paper.plan(SETUP, [], [8], LRS, seeds=2, bn_seeds=1, dense_total=False, sweep_setup=short)
    assert [j["setup"] for j in todo] == [short] * 4  # 2 models × 2 lrs, nothing long before the sweep is done
    rows = [
        row("peer", 8, 1e-3, 0, val=2.0, test=2.0, setup=short),
        row("peer", 8, 3e-3, 0, val=1.0, test=1.0, setup=short),
    ]
    rows += [row("dense", None, lr, 0, val=3.0, test=3.0, setup=short) for lr in LRS]
    todo = paper.plan(SETUP, rows, [8], LRS, seeds=2, bn_seeds=1, dense_total=False, sweep_setup=short)
    assert todo == [
        paper.job(SETUP, paper.spec("peer", 8, 3e-3, 0)),
        paper.job(SETUP, paper.spec("dense", None, 1e-3, 0)),  # a tie chooses the smaller lr
        paper.job(SETUP, paper.spec("peer", 8, 3e-3, 0, bn=False)),
        paper.job(SETUP, paper.spec("peer", 8, 3e-3, 1)),
        paper.job(SETUP, paper.spec("dense", None, 1e-3, 1)),
    ]
    rows += [row("peer", 8, 3e-3, s, val=1.5, test=1.4 + s / 10, setup=SETUP) for s in (0, 1)]
    agg = paper.aggregate(rows, SETUP, [8], LRS, sweep_setup=short)
    (peer,) = [m for m in agg["models"] if m["model"] == "peer"]
    assert peer["lr"] == 3e-3 and peer["sweep_val_bpb"] == {1e-3: 2.0, 3e-3: 1.0}  # the short runs' validation
    assert peer["test_bpb"]["mean"] == pytest.approx(1.45) and peer["seeds"] == [0, 1]  # the long runs' test
    assert agg["sweep_steps"] == 1 and "(runs of 1 steps)" in paper.markdown(agg, None, 1.0)


def test_workers_claim_distinct_runs_and_a_dead_workers_claim_lapses(tmp_path):
    out = tmp_path / "paper.json"
    todo = paper.plan(SETUP, [], [8, 16], [1e-3], seeds=1, bn_seeds=0, dense_total=False)  # 3 runs
    first, left = paper.claim(out, lambda: todo)
    assert first == todo[0] and left == 3 and paper.live_claims(out) == {paper.job_name(first): os.getpid()}
    assert paper.claim(out, lambda: todo)[0] == todo[1]  # the first is taken
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    claims = json.loads(out.with_suffix(".claims").read_text())
    out.with_suffix(".claims").write_text(json.dumps({**claims, paper.job_name(todo[2]): dead.pid}))
    assert paper.job_name(todo[2]) not in paper.live_claims(out)
    assert paper.claim(out, lambda: todo)[0] == todo[2]  # a killed worker's run is free again
    assert paper.claim(out, lambda: todo) == (None, 3)  # all claimed
    paper.release(out, first)
    assert paper.claim(out, lambda: todo)[0] == first


def test_two_parallel_workers_run_every_run_once(tmp_path, monkeypatch):
    """Two workers (threads here) on one plan: each run once, and the second seeds wait for the sweep."""
    out, lock = tmp_path / "paper.json", threading.Lock()
    calls = []

    def fake_run(cmd, env):
        j = json.loads(cmd[cmd.index("--one") + 1])
        s = j["spec"]
        with lock:
            # a run at a chosen lr starts only after its model's whole sweep has finished
            if s["seed"] > 0 or not s["bn"]:
                swept = paper.finished(paper.load_rows(out), SETUP)
                assert all(paper._key(paper.spec(s["model"], s["n"], lr, 0)) in swept for lr in LRS)
            calls.append(paper.run_name(s))
        time.sleep(0.02)
        val = 2.0 - s["lr"] * 100 if s["model"] == "peer" else 2.0 + s["lr"] * 100  # peer: 3e-3, dense: 1e-3
        paper.append_row(out, row(s["model"], s["n"], s["lr"], s["seed"], val=val, test=2.0, bn=s["bn"]))
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(paper.subprocess, "run", fake_run)
    monkeypatch.setattr(paper, "WAIT_S", 0.01)
    monkeypatch.setattr(paper, "write_report", lambda *a: None)
    args = [*TINY, "--out", str(out), "--work", str(tmp_path / "ws")]
    workers = [threading.Thread(target=paper.main, args=(args,)) for _ in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=60)
    assert len(calls) == len(set(calls)) == 2 * 3 + 2 + 3  # the same runs one worker does, each once
    assert {"peer-n8-lr0.003-s1", "peer-n16-nobn-lr0.003-s0", "dense-lr0.001-s1"} <= set(calls)
    assert len(paper.load_rows(out)) == len(calls) and paper.live_claims(out) == {}


def test_resume_skips_finished_runs(tmp_path, monkeypatch):
    """Each run is a subprocess (here a stand-in that appends its row); a second invocation runs only what is left."""
    out = tmp_path / "paper.json"
    calls = []

    def fake_run(cmd, env):
        job = json.loads(cmd[cmd.index("--one") + 1])
        assert job["setup"] == SETUP
        calls.append(paper.run_name(job["spec"]))
        paper.append_row(out, row(job["spec"]["model"], job["spec"]["n"], job["spec"]["lr"], job["spec"]["seed"],
                                  val=2.0, test=2.0, bn=job["spec"]["bn"], setup=job["setup"]))  # fmt: skip
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(paper.subprocess, "run", fake_run)
    args = [*TINY, "--out", str(out), "--work", str(tmp_path / "ws")]
    assert paper.main([*args, "--max-runs", "2"]) == 0
    first = list(calls)
    assert first == ["peer-n8-lr0.001-s0", "peer-n16-lr0.001-s0"]
    assert paper.main(args) == 0
    assert not set(calls[2:]) & set(first)  # finished runs are never redone
    assert len(calls) == len(set(calls)) == 2 * 3 + 2 + 3  # 3 models × 2 lrs + 2 no-BN + 3 models' second seed
    before = out.read_text()
    calls.clear()
    assert paper.main(args) == 0 and calls == [] and out.read_text() == before
    assert (tmp_path / "paper.md").exists() and (tmp_path / "paper-fig3a.png").stat().st_size > 0


def test_the_hand_written_reading_survives_a_rewrite(tmp_path):
    out = tmp_path / "paper.json"
    agg = paper.aggregate(hand_made(), SETUP, [8, 16], LRS)
    paper.write_report(out, agg, hand_made())
    md = out.with_suffix(".md")
    md.write_text(md.read_text() + "Reproduced, partly.\n")
    paper.write_report(out, agg, hand_made())
    assert md.read_text().count(paper.READING_MARK) == 1 and md.read_text().endswith("Reproduced, partly.\n")
    assert "| 64 → 256 | +0.7000 | 0.4000 | yes | yes | +0.7000 ± 0.1000 | yes |" in md.read_text()
    assert out.with_name("paper-fig3a.png").stat().st_size > 0
    assert agg["models"][0]["train_loss"] == [
        [[100, 2.5], [200, 2.0]],
        [[100, 3.5], [200, 3.0]],
        [[100, 4.5], [200, 4.0]],
    ]


@pytest.mark.slow
def test_real_runs_resume_after_a_killed_one(tmp_path):
    """Real training subprocesses at tiny sizes: a run killed half-way (its run folder left behind) is
    started over, finished ones are kept byte for byte."""
    out, work = tmp_path / "paper.json", tmp_path / "ws"
    args = [*TINY, "--sizes", "8", "--lrs", "1e-3", "--seeds", "1", "--out", str(out), "--work", str(work)]
    assert paper.main([*args, "--max-runs", "1"]) == 0
    (first,) = paper.load_rows(out)
    assert first["spec"] == paper.spec("peer", 8, 1e-3, 0) and first["usage"][0]["usage_pct"] > 0
    for u in first["usage"]:  # 64 experts of 8 × 8 sub-keys: the used experts' sub-keys bound their number
        rows, cols = u["subkey_usage_pct"]
        assert 0 < rows <= 100 and 0 < cols <= 100 and u["usage_pct"] <= rows * cols / 100 + 1e-9
    assert first["train_loss"] == []  # every 100 steps; this run has 2
    assert 0 < first["test_bpb"] < 9 and first["train_tokens"] == 2 * 16 * 256
    # the next run (dense) was killed mid-way: its folder is there, its row is not
    left = work / "runs" / f"paper-{paper._tag(SETUP)}-dense-lr0.001-s0"
    left.mkdir(parents=True)
    (left / "junk").write_text("half a run")
    assert paper.main(args) == 0
    rows = paper.load_rows(out)
    assert rows[0] == first
    assert [paper.run_name(r["spec"]) for r in rows] == [
        "peer-n8-lr0.001-s0",
        "dense-lr0.001-s0",
        "peer-n8-nobn-lr0.001-s0",
    ]
    assert rows[1]["usage"] == [] and rows[2]["usage"][0]["kl_unevenness"] is not None


def test_candidate_subkeys_bound_the_sub_keys_of_retrieved_experts():
    """paper_usage.candidate_subkeys_pct: each retrieved expert's two sub-keys are among its head's
    candidates, so the candidates cover at least the sub-keys the retrieved experts use; k = n: all."""
    from lifelong_peer.peer import PEER, PEERConfig, pair_of

    torch.manual_seed(0)
    layer = PEER(PEERConfig(dim=16, num_subkeys=16, heads=2, topk=2, dim_key=8)).eval()
    x = torch.randn(64, 16)
    rows, cols = paper_usage.candidate_subkeys_pct(layer, x)
    _, ids = layer.retrieve(x)
    i, j = pair_of(ids)
    assert rows >= 100 * i.unique().numel() / 16 and cols >= 100 * j.unique().numel() / 16
    assert 0 < rows < 100  # 64 tokens × 2 heads × top-2 of 16 random sub-keys: some, not all
    wide = PEER(PEERConfig(dim=16, num_subkeys=4, heads=2, topk=4, dim_key=8)).eval()
    assert paper_usage.candidate_subkeys_pct(wide, x) == [100.0, 100.0]


def test_independent_query_halves_reach_the_pairs_correlated_ones_cannot():
    """paper_usage.pair_usage_pct: as retrieved it is the layer's own usage; with halves that are equal
    (so every token picks a diagonal expert i = j) usage stays on the diagonal, and made independent
    it leaves it."""
    from lifelong_peer.peer import PEER, PEERConfig

    torch.manual_seed(0)
    layer = PEER(PEERConfig(dim=16, num_subkeys=16, heads=1, topk=1, dim_key=8)).eval()
    x = torch.randn(512, 16)
    _, ids = layer.retrieve(x)
    real, _ = paper_usage.pair_usage_pct(layer, x)
    assert real == 100.0 * ids.unique().numel() / 256
    with torch.no_grad():  # second half of every query = first half; the same sub-keys on both sides
        layer.query.weight[4:] = layer.query.weight[:4]
        layer.subkeys[:, 1] = layer.subkeys[:, 0]
    real, mixed = paper_usage.pair_usage_pct(layer, x)
    assert real <= 100.0 * 16 / 256  # only the 16 diagonal experts
    assert mixed > 2 * real
