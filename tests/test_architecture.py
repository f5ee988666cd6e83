"""The parts and what each may import (docs/ARCHITECTURE.md, issue 15), read from the source: data
flows one way, the index manager never runs, evaluation never needs the trainer, streams load no model."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODEL_CODE = {"attach", "model", "peer", "peer_model", "train", "run", "runops", "hooks", "config", "evaluate"}

#: file (relative to the repository) → lifelong_peer modules it must not import
RULES = {
    "streams/*.py": MODEL_CODE,
    "lifelong_peer/index/*.py": {"run", "runops", "train", "config", "evaluate", "hooks"},
    "lifelong_peer/hooks/*.py": {"run", "runops", "train", "evaluate"},
    "lifelong_peer/config.py": {"run", "runops", "train", "evaluate", "hooks"},
    "lifelong_peer/data.py": {"run", "runops", "train", "evaluate", "hooks", "config"},
    "lifelong_peer/run.py": {"train", "runops", "evaluate"},
    "lifelong_peer/bases.py": {"run", "train", "runops", "evaluate", "hooks"},
    "lifelong_peer/evaluate.py": {"train", "runops"},
    "lifelong_peer/report.py": {"train", "runops"},
    "cli/eval_cmds.py": {"train", "runops"},
    "cli/use_cmds.py": {"train", "runops"},
    "lifelong_peer/use.py": {"train", "runops"},
    "lifelong_peer/export.py": {"train", "runops"},
    "lifelong_peer/generate.py": {"run", "train", "runops", "evaluate", "hooks", "config"},
    "lifelong_peer/model.py": {"attach", "train", "run"},
    "lifelong_peer/attach.py": {"model", "train", "run"},
    # read by the commands that train nothing, which must not load torch (issue 25)
    "lifelong_peer/files.py": MODEL_CODE | {"checkpoint", "index", "optim"},
    "lifelong_peer/policies.py": MODEL_CODE | {"checkpoint", "index", "optim"},
}

#: modules over ~500 lines, and why
LARGE = {
    "lifelong_peer/peer.py": "the PEER layer in one file, with its function-preserving generations (issue 16)",
}


def imported(path: Path) -> set[str]:
    """lifelong_peer modules ``path`` imports (first component after the package), anywhere in the file."""
    package = "lifelong_peer" if path.parent.name != "hooks" else "lifelong_peer.hooks"
    if path.parent.name == "streams":
        package = "lifelong_peer.streams"
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            full = (
                [f"{base}.{a.name}" for a in node.names] if base in ("lifelong_peer", "lifelong_peer.hooks") else [base]
            )
        elif isinstance(node, ast.Import):
            full = [a.name for a in node.names]
        else:
            continue
        for name in full:
            parts = name.split(".")
            if parts[0] == "lifelong_peer" and len(parts) > 1:
                names.add(parts[1])
    return names


@pytest.mark.parametrize("pattern", sorted(RULES))
def test_imports_follow_the_layers(pattern):
    files = sorted(ROOT.glob(pattern))
    assert files, pattern
    for path in files:
        bad = imported(path) & RULES[pattern]
        if path.parent.name == "hooks":
            bad.discard("hooks")  # a hook imports its siblings
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_modules_stay_readable():
    for path in sorted((ROOT / "lifelong_peer").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        lines = len(path.read_text().splitlines())
        assert lines <= 550 or rel in LARGE, f"{rel} has {lines} lines"


def test_the_phase_loop_fits_one_screen():
    tree = ast.parse((ROOT / "lifelong_peer" / "train.py").read_text())
    for name in ("run_phases", "_run_phases"):  # the entry point and the loop it wraps (Ctrl-C handling)
        loop = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
        assert loop.end_lineno - loop.lineno + 1 <= 40, name
