"""Progress off a terminal (issue 17): plain lines naming the run every interval, not bars dumped at the end."""

from __future__ import annotations

import json
import re

import pytest
import torch
from test_walkthrough import TINY  # the walkthrough's tiny model and run settings
from typer.testing import CliRunner

from lifelong_peer.cli import progress
from lifelong_peer.cli.main import app
from lifelong_peer.cli.progress import PlainIngestProgress, PlainProgress, event_lines, experts_text


class Clock:
    """Time that moves only when the test says so."""

    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_line_per_interval_naming_the_run():
    lines, clock = [], Clock()
    show = PlainProgress(lines.append, interval=10.0, clock=clock)
    show({"event": "run_start", "run": "demo-naive-s0", "strategy": "naive"})
    show({"event": "phase_start", "phase": 0, "slice": "1790-1839", "steps": 100, "start": 0})
    for step in range(100):
        clock.now += 1.0  # one second per step
        event = {"event": "step", "phase": 0, "step": step, "loss": 2.0 - step / 100, "tok_s": 8278.4}
        show(event | {"experts": 2304, "frozen_fraction": 0.5, "peer_layers": 9})
    assert lines[0] == "demo-naive-s0 | phase 0: 1790-1839 | 100 steps"
    # the first step, then one line per 10 s, then the last step
    assert [line.split(" | ")[2] for line in lines[1:]] == [
        f"step {n}/100" for n in (1, 11, 21, 31, 41, 51, 61, 71, 81, 91, 100)
    ]
    assert lines[2] == (
        "demo-naive-s0 | phase 0: 1790-1839 | step 11/100 | loss 1.900 | 8,278 tok/s | 2,304 experts in all 9 layers, "
        "50% frozen | ETA 0:01:29"
    )
    assert lines[-1].endswith("| 8,278 tok/s | 2,304 experts in all 9 layers, 50% frozen | took 0:01:40")
    show({"event": "run_start", "run": "demo-lifelong-s0", "strategy": "lifelong"})
    show({"event": "phase_start", "phase": -1, "slice": "base", "steps": 300, "start": 120})  # a resumed base
    clock.now += 3.0
    show({"event": "step", "phase": -1, "step": 120, "loss": 1.5})  # no tok/s, no experts: left out
    assert lines[-2:] == [
        "demo-lifelong-s0 | base | 300 steps, from step 120",
        "demo-lifelong-s0 | base | step 121/300 | loss 1.500 | ETA 0:08:57",
    ]


def test_every_expert_count_says_whose_it_is():
    """Issue 25: progress said "9,216 experts" (all layers), growth "1,024 → 2,304" (one layer)."""
    assert experts_text(9216, 9, 0.125) == "9,216 experts in all 9 layers, 12% frozen"
    assert experts_text(1024, 1, 0.0) == "1,024 experts in 1 layer, 0% frozen"
    grow = {"layer": 0, "k": 8, "experts_before": 1024, "experts_after": 2304, "changed_old": 0.0}
    assert event_lines({"event": "grow", "layers": [grow]}) == [
        "grow layer 0: +8 sub-keys per half, 1,024 → 2,304 experts in this layer, old tokens re-routed 0.0%"
    ]
    freeze = {"layer": 1, "policy": "all-old", "frozen_pct": 40.0}
    assert event_lines({"event": "freeze", "layers": [freeze]}) == [
        "freeze layer 1 (all-old): 40.0% of its experts frozen"
    ]


def test_ingest_lines_per_interval_and_none_for_a_quick_ingest():
    lines, clock = [], Clock()
    show = PlainIngestProgress(lines.append, "news", interval=10.0, clock=clock)
    show("scan", 0, None)
    clock.now += 4.0
    show("scan", 256, None)
    assert lines == []  # under the interval: quiet
    clock.now += 7.0
    show("scan", 512, None)
    show("pack", 0, 1000)
    clock.now += 10.0
    show("pack", 250, 1000)
    assert lines == ["news | reading | 512 records", "news | tokenising | 250/1,000 documents | ETA 0:00:30"]


@pytest.mark.slow
def test_run_off_a_terminal_prints_plain_lines_as_it_goes(tmp_path, monkeypatch):
    """`lpeer run` with stderr in a file (CliRunner's stderr is no terminal): lines, not bars at the end."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setattr(progress, "INTERVAL_S", 0.0)  # every step, so that a 3-step run shows them all
    docs = tmp_path / "docs.jsonl"
    docs.write_text(
        "".join(json.dumps({"id": i, "text": "word " * 80, "time": 2001 + i % 2}) + "\n" for i in range(24))
    )
    (tmp_path / "tiny.toml").write_text(TINY)
    ws = str(tmp_path / "ws")
    runner = CliRunner()
    try:
        assert runner.invoke(app, ["init", ws]).exit_code == 0
        ingest = runner.invoke(app, ["ingest", str(docs), "--name", "d", "-w", ws])
        assert ingest.exit_code == 0, ingest.output
        args = ["run", "-w", ws, "--stream", "d", "--name", "r1", "--config", str(tmp_path / "tiny.toml")]
        result = runner.invoke(app, [*args, "--base-steps", "3", "--steps", "3", "--grow", "2"])
    finally:
        torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output
    err = result.stderr.splitlines()
    assert "━" not in result.stderr and "…" not in result.stderr  # no bars, nothing cut
    for label in ("base", "phase 0: 2001", "phase 1: 2002"):
        steps = [line for line in err if line.startswith(f"r1 | {label} | step ")]
        assert [line.split(" | ")[2] for line in steps] == ["step 1/3", "step 2/3", "step 3/3"], err
        assert all(" | loss " in line for line in steps)
        assert " | ETA " in steps[1] and " | took " in steps[2]
    assert any(line.startswith("r1 | after phase 1 (2002): validation bits/byte") for line in err)
    # issue 25: each expert count says whose it is: a layer's (growth) or all layers' (steps, the eval table)
    grown = [line for line in err if line.startswith("r1 | grow layer ")]
    assert grown and all(re.search(r"\d → [\d,]+ experts in this layer", line) for line in grown), err
    layers = len({line.split()[4] for line in grown})  # "r1 | grow layer 0: ...": each layer grew
    where = f"in all {layers} layers" if layers > 1 else "in 1 layer"
    phase_steps = [line for line in err if line.startswith("r1 | phase ") and " | step " in line]
    assert phase_steps and all(f" experts {where}, " in line for line in phase_steps), phase_steps
    assert "experts (all layers)" in result.stdout
    assert any(line.startswith("d | tokenising | ") for line in ingest.stderr.splitlines())
