"""Every command the tool prints as advice runs (issue 17, item 12) — as printed, with ``lpeer`` not on
the PATH too (issue 25) —, and every command has the common options once defined (issue 15):
``--workspace/-w`` and ``--format``; no ``<bool>`` in help pages."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from lifelong_peer import advice
from lifelong_peer.cli.main import app
from lifelong_peer.workspace import Workspace

runner = CliRunner()


def _args(template: str, root) -> list[str]:
    """The advice as a user would type it here: placeholders filled for the tiny workspace."""
    base = root / "ws" / "runs" / "r" / "checkpoints" / "base.safetensors"
    filled = template.format(
        run="r", directory=root / "new-ws", stream="toy", base=base, slices="2001,2002", name="toy-joint", options=""
    )
    filled = filled.replace("SOURCE", str(root / "docs.jsonl")).replace("NAME_OR_PATH", "gpt2")
    filled = filled.replace("--name NAME", "--name toy2")
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
def test_every_advice_parses(tiny_workspace, template):
    _parses(_args(template, tiny_workspace))


@pytest.mark.parametrize("template", [advice.INIT, advice.INGEST, advice.STREAMS, advice.RESUME, advice.EVAL])
def test_advice_runs_on_a_tiny_workspace(tiny_workspace, template, monkeypatch):
    monkeypatch.setenv("LPEER_WORKSPACE", str(tiny_workspace / "ws"))
    result = runner.invoke(app, _args(template, tiny_workspace))
    assert result.exit_code == 0, (template, result.output, result.exception)


def test_the_demo_prints_advice_from_the_list():
    source = (Path(__file__).resolve().parents[1] / "cli" / "demo_cmds.py").read_text()
    assert "advice.command(advice.EVAL," in source and "try: lpeer" not in source


# --- as printed (issue 25: `lpeer` is not on the PATH after `make demo`) -------------------------------

SCRIPT = Path(sys.executable).parent / "lpeer"  # this installation's command, as pip wrote it
needs_script = pytest.mark.skipif(not SCRIPT.is_file(), reason="no lpeer script beside this interpreter")


def without_lpeer_on_path() -> dict:
    """The environment of a user who has not activated the virtual environment."""
    dirs = [d for d in os.environ["PATH"].split(os.pathsep) if not (Path(d) / "lpeer").exists()]
    env = {k: v for k, v in os.environ.items() if k != "LPEER_WORKSPACE"}
    return env | {"PATH": os.pathsep.join(dirs)}


def hints(text: str) -> list[str]:
    """The commands a message prints between backticks, or after "try:"."""
    return re.findall(r"`([^`]+)`", text) + re.findall(r"\(try: (.+)\)$", text, re.MULTILINE)


def run_as_printed(hint: str, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    """The hint typed into a shell, as the user would paste it."""
    return subprocess.run(hint, shell=True, cwd=cwd, env=env, capture_output=True, text=True, check=False)


@needs_script
def test_hints_name_the_lpeer_this_shell_can_run(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert advice.lpeer_command() == str(SCRIPT)  # not on the PATH: its path
    monkeypatch.setenv("PATH", str(SCRIPT.parent))
    assert advice.lpeer_command() == "lpeer"
    other = tmp_path / "bin" / "lpeer"  # another installation's lpeer comes first on the PATH
    other.parent.mkdir()
    other.write_text("#!/bin/sh\n")
    other.chmod(0o755)
    monkeypatch.setenv("PATH", f"{other.parent}{os.pathsep}{SCRIPT.parent}")
    assert advice.lpeer_command() == str(SCRIPT)
    monkeypatch.chdir(SCRIPT.parent.parent)  # below the current directory: a relative path
    assert advice.lpeer_command() == os.path.join(SCRIPT.parent.name, "lpeer")


def test_hints_name_the_workspace_when_it_is_not_found_by_default(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LPEER_WORKSPACE", raising=False)
    monkeypatch.setattr(advice, "lpeer_command", lambda: "lpeer")
    assert advice.command(advice.EVAL, tmp_path, run="r") == "lpeer eval r"
    assert advice.command(advice.EVAL, tmp_path / "my ws", run="r") == "lpeer eval r -w 'my ws'"
    monkeypatch.setenv("LPEER_WORKSPACE", str(tmp_path / "my ws"))
    assert advice.command(advice.EVAL, tmp_path / "my ws", run="r") == "lpeer eval r"
    assert advice.command(advice.INIT, directory=tmp_path / "new") == "lpeer init new"


@needs_script
def test_error_hints_run_as_printed_without_lpeer_on_the_path(tmp_path):
    env = without_lpeer_on_path()
    (tmp_path / "here").mkdir()
    # `lpeer init .`, then in the workspace it made `lpeer streams -w here` and `lpeer ingest --default -w here`
    for args, cwd in (
        (["streams"], tmp_path / "here"),
        (["run", "-w", "here"], tmp_path),
        (["run", "-s", "news", "-w", "here"], tmp_path),
    ):
        shown = subprocess.run([str(SCRIPT), *args], cwd=cwd, env=env, capture_output=True, text=True, check=False)
        assert shown.returncode == 2, shown.stderr
        [hint] = hints(shown.stderr)
        done = run_as_printed(hint, cwd, env)
        assert done.returncode == 0, (hint, done.stderr)


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


@pytest.mark.parametrize("name", [None] + [name for name, _ in _commands()])
def test_help_is_whole_at_80_columns(name):
    """Issue 25: at 80 columns `lpeer run --help` cut option names (`--expert-weight-d…`) and left an
    18-column description; its options now come in panels, each a table sized by its own names."""
    command = typer.main.get_command(app) if name is None else dict(_commands())[name]
    result = runner.invoke(app, [name, "--help"] if name else ["--help"], env={"COLUMNS": "80"})
    assert result.exit_code == 0
    assert "…" not in result.output
    assert max(len(line) for line in result.output.splitlines()) <= 80
    words = set(re.findall(r"-[-\w]+", result.output))
    for param in command.params:  # every option's names whole (arguments have none)
        assert {o for o in (*param.opts, *param.secondary_opts) if o.startswith("-")} <= words, param.name


def test_run_options_come_in_panels():
    from lifelong_peer.cli.options import PANELS, TRAIN_OPTIONS
    from lifelong_peer.cli.run_cmds import ATTACH_PANEL

    assert sorted(n for names in PANELS.values() for n in names) == sorted(TRAIN_OPTIONS)  # each once
    result = runner.invoke(app, ["run", "--help"], env={"COLUMNS": "80"})
    for panel in [*PANELS, ATTACH_PANEL]:
        assert f"─ {panel} ─" in result.output
