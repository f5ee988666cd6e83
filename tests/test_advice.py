"""Every command the tool prints as advice runs (issue 17, item 12), and every command has the common
options once defined (issue 15): ``--workspace/-w`` and ``--format``; no ``<bool>`` in help pages."""

from __future__ import annotations

import json
import shlex

import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

from lifelong_peer import advice
from lifelong_peer.cli.main import app
from lifelong_peer.run import new_run
from lifelong_peer.streams import ingest
from lifelong_peer.train import run_phases
from lifelong_peer.workspace import Workspace

runner = CliRunner()
MODEL = {"dim": 32, "layers": 1, "heads": 2, "context": 32, "peer": {"num_subkeys": 4, "heads": 2, "topk": 2}}
TRAIN = {"steps": 2, "batch_size": 2, "eval_tokens": 128, "usage_tokens": 128, "warmup": 1}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A workspace with stream ``toy`` (two yearly slices, from docs.jsonl) and run ``r`` trained on it."""
    root = tmp_path_factory.mktemp("advice")
    rng = np.random.default_rng(0)
    lines = [
        json.dumps(
            {"text": " ".join(rng.choice(["peer", "expert", "time", "slice"], 40)), "time": f"{y}-0{1 + d % 9}-01"}
        )
        for y in (2001, 2002)
        for d in range(30)
    ]
    (root / "docs.jsonl").write_text("\n".join(lines) + "\n")
    ws = Workspace.init(root / "ws")
    ingest(ws, str(root / "docs.jsonl"), "toy", split=(0.6, 0.2, 0.2))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    run_phases(new_run(ws, "toy", "naive", TRAIN, MODEL, run_id="r"))
    torch.set_num_threads(threads)
    return root


def _args(template: str, root) -> list[str]:
    """The advice as a user would type it here: placeholders filled for the tiny workspace."""
    base = root / "ws" / "runs" / "r" / "checkpoints" / "base.safetensors"
    filled = template.format(
        run="r", workspace=root / "ws", stream="toy", base=base, slices="2001,2002", name="toy-joint", options=""
    )
    filled = filled.replace("SOURCE", str(root / "docs.jsonl")).replace("NAME_OR_PATH", "gpt2")
    filled = filled.replace("--name NAME", "--name toy2").replace("DIR", str(root / "new-ws"))
    words = shlex.split(filled)
    assert words[0] == "lpeer"
    return words[1:]


def _parses(args: list[str]) -> None:
    """Click accepts the command line: the command and every option exist (no run)."""
    group = typer.main.get_command(app)
    with group.make_context("lpeer", list(args), resilient_parsing=True) as ctx:
        command = group.get_command(ctx, args[0])
        assert command is not None, args
        command.make_context(args[0], args[1:], parent=ctx)  # raises on an unknown option


@pytest.mark.parametrize("template", advice.ADVICE)
def test_every_advice_parses(tiny, template):
    _parses(_args(template, tiny))


@pytest.mark.parametrize("template", [advice.INIT, advice.INGEST, advice.STREAMS, advice.RESUME, advice.EVAL])
def test_advice_runs_on_a_tiny_workspace(tiny, template, monkeypatch):
    monkeypatch.setenv("LPEER_WORKSPACE", str(tiny / "ws"))
    result = runner.invoke(app, _args(template, tiny))
    assert result.exit_code == 0, (template, result.output, result.exception)


def test_the_demo_prints_advice_from_the_list():
    from pathlib import Path

    source = (Path(__file__).resolve().parents[1] / "cli" / "demo_cmds.py").read_text()
    assert "advice.EVAL.format(" in source and "try: lpeer" not in source


def _commands():
    group = typer.main.get_command(app)
    return sorted(group.commands.items())


@pytest.mark.parametrize("name", [name for name, _ in _commands()])
def test_every_command_has_the_common_options_and_no_bool_metavar(name):
    command = dict(_commands())[name]
    options = {opt for p in command.params for opt in p.opts}
    assert {"--workspace", "-w", "--format"} <= options, name
    result = runner.invoke(app, [name, "--help"], env={"COLUMNS": "300"})
    assert result.exit_code == 0
    assert "<bool>" not in result.output, name


def test_init_reports_json(tmp_path):
    result = runner.invoke(app, ["init", str(tmp_path / "w"), "--format", "json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"workspace": str(tmp_path / "w")}
    assert runner.invoke(app, ["init", "-w", str(tmp_path / "v")]).exit_code == 0
    Workspace.open(tmp_path / "v")  # a workspace now
