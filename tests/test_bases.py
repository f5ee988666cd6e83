"""Base reuse within a workspace (issue 17 item 6): the walkthrough trained a bit-identical base twice,
once for the naive and once for the lifelong run. A run now reuses an intact base of its workspace
trained under the same ``base_key``, says so on stderr, and ``--base`` takes a run name."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from lifelong_peer.bases import base_key
from lifelong_peer.checkpoint import load_tensors
from lifelong_peer.cli.main import app
from lifelong_peer.errors import CheckpointError
from lifelong_peer.run import new_run, open_run
from lifelong_peer.streams import ingest
from lifelong_peer.train import run_phases
from lifelong_peer.workspace import Workspace

runner = CliRunner()
MODEL = {"dim": 32, "layers": 1, "heads": 2, "context": 32, "peer": {"num_subkeys": 4, "heads": 2, "topk": 2}}
TRAIN = {"steps": 2, "batch_size": 2, "eval_tokens": 128, "usage_tokens": 128, "warmup": 1, "base_steps": 4}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    rng = np.random.default_rng(0)
    words = ["peer", "expert", "time", "slice", "stream"]
    lines = [
        json.dumps({"text": " ".join(rng.choice(words, 40)), "time": f"{y}-0{1 + d % 9}-01"})
        for y in (2001, 2002)
        for d in range(30)
    ]
    (root / "docs.jsonl").write_text("\n".join(lines) + "\n")
    (root / "tiny.toml").write_text(
        "[model]\ndim = 32\nlayers = 1\nheads = 2\ncontext = 32\n[model.peer]\nnum_subkeys = 4\nheads = 2\ntopk = 2\n"
    )
    return root


def _workspace(path, docs) -> Workspace:
    ws = Workspace.init(path)
    ingest(ws, str(docs / "docs.jsonl"), "toy", split=(0.6, 0.2, 0.2))
    return ws


def _run(ws, strategy, run_id, **over):
    events = []
    run = new_run(ws, "toy", strategy, {**TRAIN, **over}, MODEL, run_id=run_id)
    run_phases(run, progress=events.append)
    return run, events


def _base(run) -> dict:
    return load_tensors(run.dir / "checkpoints" / "base.safetensors")[0]


def _base_steps(events) -> int:
    return sum(e["event"] == "step" and e["phase"] == -1 for e in events)


def test_a_second_strategy_reuses_the_base_bit_for_bit_without_training_it(docs, tmp_path):
    ws = _workspace(tmp_path / "ws", docs)
    naive, trained = _run(ws, "naive", "naive")
    lifelong, reused = _run(ws, "lifelong", "lifelong")
    assert _base_steps(trained) == 4 and _base_steps(reused) == 0  # not retrained
    assert [e["run"] for e in reused if e["event"] == "base_reused"] == ["naive"]
    assert (lifelong.dir / "checkpoints/base.safetensors").read_bytes() == (
        naive.dir / "checkpoints/base.safetensors"
    ).read_bytes()
    # the very base the lifelong run would have trained itself (in a workspace with nothing to reuse)
    alone, own = _run(_workspace(tmp_path / "alone", docs), "lifelong", "lifelong")
    assert _base_steps(own) == 4
    a, b = _base(alone), _base(lifelong)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # and so the same run from there on
    ra, rb = (json.loads((r.dir / "results.json").read_text())["eval"] for r in (alone, lifelong))
    assert ra == rb
    assert (
        json.loads((lifelong.dir / "base.json").read_text())["key"]
        == json.loads((naive.dir / "base.json").read_text())["key"]
    )


@pytest.mark.parametrize("change", [{"base_lr": 1e-3}, {"seed": 1}, {"base_steps": 3}, {"batch_size": 3}])
def test_a_base_trained_under_other_settings_is_not_reused(docs, tmp_path, change):
    ws = _workspace(tmp_path / "ws", docs)
    _run(ws, "naive", "first")
    _, events = _run(ws, "naive", "second", **change)
    assert _base_steps(events) == TRAIN["base_steps"] + (change.get("base_steps", 4) - 4)
    assert not [e for e in events if e["event"] == "base_reused"]


def test_the_key_covers_the_data_and_the_model(docs, tmp_path):
    ws = _workspace(tmp_path / "ws", docs)
    run = new_run(ws, "toy", "naive", {**TRAIN, "base_data": "mix"}, MODEL, run_id="a")
    key = base_key(run)
    assert [name for name, _ in key["data"]] == ["2001", "2002"] and key["model"]["dim"] == 32
    first = new_run(ws, "toy", "naive", {**TRAIN, "base_data": "first"}, MODEL, run_id="b")
    wider = new_run(ws, "toy", "naive", {**TRAIN, "base_data": "mix"}, {**MODEL, "dim": 48}, run_id="c")
    assert base_key(first)["data"] == key["data"][:1] and base_key(wider) != key
    assert "expert_weight_decay" not in key["train"] or key["train"]["expert_weight_decay"] == 0.0
    lifelong = new_run(ws, "toy", "lifelong", {**TRAIN, "base_data": "mix"}, MODEL, run_id="d")
    assert base_key(lifelong) == key  # the strategy's protections are not part of the base


@pytest.mark.parametrize("damage", ["flip", "delete-record"])
def test_a_damaged_base_is_never_reused(docs, tmp_path, damage):
    ws = _workspace(tmp_path / "ws", docs)
    first, _ = _run(ws, "naive", "first")
    path = first.dir / "checkpoints/base.safetensors"
    if damage == "flip":
        data = bytearray(path.read_bytes())
        data[-5] ^= 0x40
        path.write_bytes(bytes(data))
    else:
        (first.dir / "base.json").write_text("{not json")
    _, events = _run(ws, "naive", "second")
    assert _base_steps(events) == 4 and not [e for e in events if e["event"] == "base_reused"]


def test_base_takes_a_run_name_and_the_cli_says_when_it_reuses(docs, tmp_path):
    ws = _workspace(tmp_path / "ws", docs)
    args = ["-w", str(ws.root), "--stream", "toy", "--config", str(docs / "tiny.toml"), "--steps", "2"]
    args += ["--batch-size", "2", "--eval-tokens", "128", "--usage-tokens", "128", "--base-steps", "4", "-q"]
    first = runner.invoke(app, ["run", *args, "--strategy", "naive", "--name", "n"])
    assert first.exit_code == 0, first.output
    assert "reusing" not in first.stderr
    second = runner.invoke(app, ["run", *args, "--strategy", "lifelong", "--name", "l"])
    assert second.exit_code == 0, second.output
    assert "reusing run n's base model" in second.stderr and "not retrained" in second.stderr
    named = runner.invoke(
        app, ["run", "-w", str(ws.root), "--stream", "toy", "--steps", "1", "-q", "--base", "n", "--name", "b"]
    )
    assert named.exit_code == 0, named.output
    run = open_run(ws, "b")
    assert run.config.base == str(ws.run_dir("n") / "checkpoints/base.safetensors")
    a, b = _base(run), _base(open_run(ws, "n"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    data = bytearray((ws.run_dir("n") / "checkpoints/base.safetensors").read_bytes())
    data[-5] ^= 0x40
    (ws.run_dir("n") / "checkpoints/base.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"base\.safetensors: altered"):
        new_run(ws, "toy", "naive", TRAIN, base="n", run_id="c")
    missing = runner.invoke(app, ["run", "-w", str(ws.root), "--stream", "toy", "--base", "nope"])
    assert "no such checkpoint file, nor a run of workspace" in str(missing.exception)  # main(): one line, exit 2
