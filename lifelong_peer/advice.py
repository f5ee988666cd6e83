"""Every command the tool prints as advice, in one place, so a test can run each one (issue 17, item 12).

Templates take ``str.format`` fields; ``ADVICE`` lists them all for ``tests/test_advice.py``. Print one
with ``command``: it writes the command as the user can run it *here* (issue 25, where the demo's own
closing hint failed as printed): ``lpeer`` becomes the path of this installation's script when ``lpeer``
on the PATH is not it (``.venv/bin/lpeer`` after ``make demo``, before ``source .venv/bin/activate``),
and ``-w WORKSPACE`` is added when the command, typed in this directory, would not find the workspace.
Words in capitals (``SOURCE``, ``NAME``) are for the user to fill in.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from pathlib import Path

INIT = "lpeer init {directory}"
INGEST_DEFAULT = "lpeer ingest --default"
INGEST = "lpeer ingest SOURCE --name NAME"
STREAMS = "lpeer streams"
RESUME = "lpeer run --resume {run}"
BASE_MODEL = "lpeer run --base-model NAME_OR_PATH"
EVAL = "lpeer eval {run}"
REEVALUATE = "lpeer eval {run} --reevaluate"
KEEP_ALL = "lpeer run --stream STREAM --keep-checkpoints all"

#: a joint run comparable with a compared run (``report.joint_command``): its stream, slices, base model and options
JOINT = "lpeer run --stream {stream} --strategy joint --base {base} --slices {slices} --name {name}{options}"

ADVICE = [INIT, INGEST_DEFAULT, INGEST, STREAMS, RESUME, BASE_MODEL, EVAL, REEVALUATE, KEEP_ALL, JOINT]


def command(template: str, workspace: str | os.PathLike | None = None, **fields) -> str:
    """``template`` with ``fields`` filled in (paths as the user can type them), run as ``lpeer_command()``,
    with ``-w WORKSPACE`` when ``workspace`` is not where the command would look by itself."""
    filled = template.format(**{k: _shown(v) if isinstance(v, Path) else v for k, v in fields.items()})
    text = lpeer_command() + filled.removeprefix("lpeer")
    if workspace is not None:
        from .workspace import default_root

        if Path(workspace).resolve() != default_root().resolve():
            text += f" -w {_shown(Path(workspace))}"
    return text


def lpeer_command() -> str:
    """How to run this installation's ``lpeer`` from here: ``lpeer`` when that is what the PATH finds,
    else the path of its script (relative to the current directory when below it), else
    ``python -m lifelong_peer.cli`` with this interpreter."""
    script = Path(sys.executable).parent / "lpeer"
    if not script.is_file():
        return f"{shlex.quote(sys.executable)} -m lifelong_peer.cli"
    found = shutil.which("lpeer")
    if found is not None and os.path.samefile(found, script):
        return "lpeer"
    shown = _shown(script)
    return shown if os.sep in shown else f".{os.sep}{shown}"  # a bare name would be looked up on the PATH


def _shown(path: Path) -> str:
    """``path`` quoted for a shell, relative to the current directory when below it."""
    try:
        text = str(path.absolute().relative_to(Path.cwd()))
    except ValueError:
        text = str(path.absolute())
    return shlex.quote(text)
