"""The command line starts without torch, faiss or datasets (issue 25, item 9): every command took ~4 s,
``--help`` and ``lpeer streams`` too. Commands that train nothing must not load them at all; how fast
they start is measured by ``benchmarks/startup.py``, not here."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "faiss", "datasets")
# runs `lpeer ARGS` in a fresh interpreter, then prints which of HEAVY it imported
PROBE = f"""
import json, sys
from lifelong_peer.cli.main import main
sys.argv = ["lpeer", *sys.argv[1:]]
try:
    main()
except SystemExit:
    pass
print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))
"""


def imported(args: list[str], cwd) -> list[str]:
    done = subprocess.run([sys.executable, "-c", PROBE, *args], cwd=cwd, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_importing_the_command_line_loads_none_of_them():
    done = subprocess.run(
        [sys.executable, "-c", f"import sys, lifelong_peer.cli.main; print([m for m in {HEAVY!r} if m in sys.modules])"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["run", "--help"],
        ["freeze", "--help"],
        ["streams"],
        ["eval", "r"],
        ["eval", "r", "--format", "json"],
        ["info"],
    ],
)
def test_commands_that_train_nothing_load_none_of_them(args, tiny_workspace):
    assert imported([*args, "-w", "ws"] if args[-1] != "--help" else args, tiny_workspace) == []


def test_info_full_reports_what_needs_torch(tiny_workspace):
    """`lpeer info` names the versions without importing anything heavy; --full pays for threads and CUDA."""
    assert "torch" in imported(["info", "--full", "-w", "ws"], tiny_workspace)


def test_a_command_that_trains_loads_torch(tiny_workspace):
    """The probe sees imports: `lpeer inspect` needs the model."""
    assert "torch" in imported(["inspect", "r", "-w", "ws"], tiny_workspace)
