"""The README's walkthrough, run command by command on a small generated stream (issue 7).

Sizes in the README (steps, base steps) are scaled down and a tiny model config is added to
``lpeer run``; everything else — commands, options, order, run ids — is taken from the README as written.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from lifelong_peer.cli.main import app

README = Path(__file__).resolve().parents[1] / "README.md"
TINY = """
[model]
dim = 32
layers = 2
heads = 2
context = 32
[model.peer]
num_subkeys = 8
heads = 2
topk = 4
dim_key = 16
[train]
batch_size = 4
eval_tokens = 256
usage_tokens = 256
warmup = 1
"""


def walkthrough_commands() -> list[str]:
    text = README.read_text()
    block = text.split("## Walkthrough with your own data", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = []
    for line in block.splitlines():
        line = line.split("#", 1)[0].strip()
        commands += [part.strip() for part in line.split("&&") if part.strip()]
    return commands


def write_news(path: Path) -> None:
    rng = np.random.default_rng(0)
    topics = ["markets rally on rates", "storm hits the coast", "team wins the final", "new phone launched"]
    with open(path, "w") as f:
        for q, topic in enumerate(topics):
            for d in range(30):
                words = " ".join(rng.choice([*topic.split(), "the", "and", "of"], 60))
                date = f"2025-{3 * q + 1 + d % 3:02d}-{1 + d % 27:02d}"
                f.write(json.dumps({"id": f"n{q}-{d}", "text": words, "date": date}) + "\n")


@pytest.mark.slow
def test_readme_walkthrough_runs(tmp_path, monkeypatch, one_thread):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LPEER_WORKSPACE", raising=False)
    write_news(tmp_path / "news.jsonl")
    (tmp_path / "tiny.toml").write_text(TINY)
    commands = walkthrough_commands()
    assert any(c.startswith("lpeer run") for c in commands) and any(c.startswith("lpeer report") for c in commands)
    runner = CliRunner()
    for command in commands:
        if command.startswith("cd "):
            monkeypatch.chdir(command.split()[1])
            (Path.cwd() / "news.jsonl").write_bytes((tmp_path / "news.jsonl").read_bytes())
            continue
        if command.startswith("lpeer run"):
            command = re.sub(r"--base-steps \d+", "--base-steps 2", command)
            command = re.sub(r"--steps \d+", "--steps 2", command) + f" --config {tmp_path / 'tiny.toml'}"
        args = shlex.split(command)[1:]
        result = runner.invoke(app, args)
        assert result.exit_code == 0, f"{command}\n{result.output}\n{result.exception!r}"
    assert (Path.cwd() / "report" / "report.png").exists()
