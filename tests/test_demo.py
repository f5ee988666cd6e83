"""The one-command demo at a tiny size (issue 7): it runs end to end from the shipped base."""

from __future__ import annotations

import json
import re
import subprocess

import pytest
from test_advice import SCRIPT, hints, run_as_printed, without_lpeer_on_path
from typer.testing import CliRunner

from lifelong_peer.cli.main import app
from lifelong_peer.demo import BASE_CHECKPOINT

pytestmark = pytest.mark.slow


def test_shipped_base_loads_and_knows_english():
    from lifelong_peer.checkpoint import load_model

    model = load_model(BASE_CHECKPOINT)
    assert model.peer_layers(), "the shipped base is a PEER model (lifelong grows it)"
    import torch

    text = torch.tensor([list(b"The Congress of the United States shall")])
    _, loss = model.eval()(text[:, :-1], text[:, 1:])
    assert loss.item() < 2.5  # nats/byte; an untrained model is at ln 256 ≈ 5.5


def test_demo_cli_runs_both_strategies_and_writes_heatmaps(tmp_path):
    out = tmp_path / "demo"
    result = CliRunner().invoke(
        app, ["demo", "--out", str(out), "--steps", "2", "--eval-tokens", "256", "--format", "json", "--quiet"]
    )
    assert result.exit_code == 0, result.output
    comparison = json.loads(result.stdout)
    assert [r["strategy"] for r in comparison["runs"]] == ["base", "naive", "lifelong"]  # the frozen base first
    assert len(comparison["slices"]) == 6
    for path in comparison["files"]["heatmaps"]:
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    lifelong = next(r for r in comparison["runs"] if r["strategy"] == "lifelong")
    naive = next(r for r in comparison["runs"] if r["strategy"] == "naive")
    assert lifelong["num_experts"] == naive["num_experts"]  # issue 24: lifelong spends no memory naive does not
    # a second call reuses the finished runs instead of failing on existing run ids
    again = CliRunner().invoke(
        app, ["demo", "--out", str(out), "--steps", "2", "--eval-tokens", "256", "--format", "json", "--quiet"]
    )
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["runs"] == comparison["runs"]
    if SCRIPT.is_file():  # issue 25: after `make demo` `lpeer` is not on the PATH; the closing hint runs anyway
        env = without_lpeer_on_path()
        shown = subprocess.run(
            [str(SCRIPT), "demo", "--out", "demo", "--steps", "2", "--eval-tokens", "256", "--quiet"],
            cwd=tmp_path, env=env, capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert shown.returncode == 0, shown.stderr
        [hint] = re.findall(r"\(try: (.+)\)$", shown.stdout, re.MULTILINE)
        done = run_as_printed(hint, tmp_path, env)
        assert done.returncode == 0, (hint, done.stderr)
        assert "demo-lifelong-s0 (lifelong)" in done.stdout
        # the summary's command that adds the joint reference runs as printed too
        [joint] = [h for h in hints(shown.stdout) if " --strategy joint " in h]
        done = run_as_printed(joint, tmp_path, env)
        assert done.returncode == 0, (joint, done.stderr)
