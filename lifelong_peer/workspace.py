"""The workspace: a folder whose manifest (``workspace.json``) records streams, their slices and runs.

Two guarantees (issue 3):

- **one writer of each thing at a time** — a lock is an exclusive ``fcntl.flock`` on a file (``exclusive``),
  which holds the holder's PID and command; a second process gets a one-line ``UserError`` naming that
  PID. The kernel releases a flock when its process dies, so a crash never leaves a stale lock behind.
  Locks are re-entrant within a process. Issue 25: what is locked is what is written, so one running job
  no longer locks the whole workspace — the manifest only while it changes (``Workspace.lock``, which
  waits a few seconds for another process's change to finish), a run while it is trained or edited
  (``run.locked_run``: ``runs/RUN/.lock``), a stream while it is ingested (``.locks/stream-NAME.lock``).
- **atomic writes** — the manifest is replaced by temp file + rename (``files.atomic_write_json``),
  so a crash at any point leaves it either as before or as after. Readers never need the lock.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

from . import advice
from .errors import UserError
from .files import atomic_write_json

MANIFEST = "workspace.json"
LOCK = ".lock"
FORMAT = "lifelong-peer/workspace/1"
ENV_VAR = "LPEER_WORKSPACE"

#: seconds a manifest change waits for another process's (each holds the manifest lock for milliseconds)
MANIFEST_WAIT_S = 10.0

#: per-process lock holders, by lock file: (open lock file, depth) — flock is per open file, so a second
#: open in the same process would block itself; this makes ``exclusive`` re-entrant.
_HELD: dict[Path, tuple[object, int]] = {}


@contextlib.contextmanager
def exclusive(path: Path, what: str, wait_s: float = 0.0, shared: bool = False) -> Iterator[None]:
    """Hold an exclusive flock on ``path`` (created if needed) while the block runs: one writer of ``what``
    (a phrase: "run 'r'") at a time. Waits up to ``wait_s`` seconds for another holder, then raises a
    ``UserError`` naming its PID and command. Re-entrant within this process. ``shared``: a reader's lock,
    held by any number of readers at once and refused only while a writer holds the exclusive one."""
    path = Path(path).resolve()
    if path in _HELD:
        f, depth = _HELD[path]
        _HELD[path] = (f, depth + 1)
        try:
            yield
        finally:
            f, depth = _HELD[path]
            _HELD[path] = (f, depth - 1)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "a+", encoding="utf-8")  # noqa: SIM115 - lives as long as the lock
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(f.fileno(), (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() < deadline:
                time.sleep(0.05)
                continue
            f.seek(0)
            holders = [line for line in f.read().splitlines() if _alive(line.partition(" ")[0])]
            f.close()
            pid, _, command = (holders[-1] if holders else "unknown PID").partition(" ")
            raise UserError(
                f"{what} is in use by PID {pid} ({command or 'unknown command'}); wait for it to finish or stop it"
            ) from None
    if not shared:  # a writer's line replaces the file's; readers add theirs (any number hold it at once)
        f.seek(0)
        f.truncate()
    command = " ".join(Path(a).name if i == 0 else a for i, a in enumerate(sys.argv))[:200]
    f.write(f"{os.getpid()} {command}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    f.flush()
    _HELD[path] = (f, 1)
    try:
        yield
    finally:
        del _HELD[path]
        if shared:  # take this reader's line out (the lines only name holders for the refusal message)
            f.seek(0)
            others = [line for line in f.read().splitlines() if not line.startswith(f"{os.getpid()} ")]
            f.seek(0)
            f.truncate()
            f.write("".join(line + "\n" for line in others))
            f.flush()
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)
        f.close()


def _alive(pid: str) -> bool:
    """Whether the process a lock file's line names still runs (a killed reader's line outlives its lock)."""
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:  # another user's process
        return True
    return True


def now_iso() -> str:
    return datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


class Workspace:
    """A workspace folder. Construct with ``Workspace.init(path)`` or ``Workspace.open(path)``."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).resolve()

    # -- creation and discovery -------------------------------------------------------------
    @classmethod
    def init(cls, path: str | os.PathLike) -> Workspace:
        """Create ``path`` (if needed) and an empty manifest; refuses an existing workspace."""
        root = Path(path)
        if (root / MANIFEST).exists():
            raise UserError(f"{root} is already an lpeer workspace")
        if root.exists() and not root.is_dir():
            raise UserError(f"{root} exists and is not a directory")
        root.mkdir(parents=True, exist_ok=True)
        ws = cls(root)
        with ws.lock():
            atomic_write_json(ws.manifest_path, {"format": FORMAT, "created": now_iso(), "streams": {}, "runs": {}})
        return ws

    @classmethod
    def open(cls, path: str | os.PathLike | None = None) -> Workspace:
        """The workspace at ``path``, else ``$LPEER_WORKSPACE``, else the current directory."""
        root = default_root(path)
        if not (root / MANIFEST).is_file():
            raise UserError(f"{root} is not an lpeer workspace (run `{advice.command(advice.INIT, directory=root)}`)")
        ws = cls(root)
        ws.manifest()  # validate early: a corrupted manifest is reported before any work starts
        return ws

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST

    # -- manifest ---------------------------------------------------------------------------
    def manifest(self) -> dict:
        """The parsed, validated manifest."""
        try:
            data = json.loads(self.manifest_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            init = advice.command(advice.INIT, directory=self.root)
            raise UserError(f"{self.root} is not an lpeer workspace (run `{init}`)") from None
        except (ValueError, UnicodeDecodeError) as e:
            raise UserError(f"{self.manifest_path} is corrupted: not valid JSON ({e})") from None
        problem = _manifest_problem(data)
        if problem:
            raise UserError(f"{self.manifest_path} is corrupted: {problem}")
        return data

    def update_manifest(self, fn: Callable[[dict], object]) -> dict:
        """Read-modify-write under the lock: ``fn`` edits the manifest dict in place (its return value
        is ignored). The write is atomic; if ``fn`` raises, the manifest is unchanged. Returns the new manifest.
        """
        with self.lock():
            data = copy.deepcopy(self.manifest())
            fn(data)
            problem = _manifest_problem(data)
            if problem:
                raise ValueError(f"update_manifest would write an invalid manifest: {problem}")
            atomic_write_json(self.manifest_path, data)
            return data

    # -- lock -------------------------------------------------------------------------------
    def lock(self) -> contextlib.AbstractContextManager:
        """The manifest's lock, for a read-modify-write of it (``update_manifest``): held for milliseconds, so a
        second process waits up to ``MANIFEST_WAIT_S`` for it. Runs and streams have locks of their own."""
        return exclusive(self.root / LOCK, f"workspace {self.root}", MANIFEST_WAIT_S)

    def stream_lock(self, name: str, shared: bool = False) -> contextlib.AbstractContextManager:
        """One ingest of stream ``name`` at a time; other streams and runs go on meanwhile. ``shared``: a run
        reading the stream while it trains (``run.locked_run``), so that ``ingest --replace`` cannot delete
        its files under it; any number of runs read one stream at once."""
        path = self.root / ".locks" / f"stream-{name}.lock"  # not in streams/: a failed ingest leaves that as it was
        return exclusive(path, f"stream {name!r} of workspace {self.root}", shared=shared)

    # -- runs -------------------------------------------------------------------------------
    def run_dir(self, run_id: str) -> Path:
        return self.root / "runs" / run_id

    def register_run(self, run_id: str, info: dict) -> None:
        """Record (or update) ``manifest["runs"][run_id]`` with ``info`` merged in."""
        check_name("run id", run_id)

        self.update_manifest(lambda m: m["runs"].setdefault(run_id, {}).update(info))

    def resolve_run(self, run_or_path: str) -> Path:
        """A run id of this workspace, or a path to a run directory → the run directory."""
        runs = self.manifest()["runs"]
        if run_or_path in runs:
            return self.run_dir(run_or_path)
        path = Path(run_or_path)
        if path.is_dir():
            return path.resolve()
        known = ", ".join(sorted(runs)) or "none yet"
        raise UserError(f"no run {run_or_path!r} in workspace {self.root} (known runs: {known})")


def default_root(path: str | os.PathLike | None = None) -> Path:
    """``path``, else ``$LPEER_WORKSPACE``, else the current directory: where a command's workspace is."""
    return Path(path if path is not None else os.environ.get(ENV_VAR) or os.getcwd())


def check_name(what: str, name: str) -> None:
    """Names become directory names: letters, digits, '.', '_', '-', not starting with '.'."""
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,99}", name or ""):
        raise UserError(f"invalid {what} {name!r}: use letters, digits, '.', '_' and '-' (not starting with '.')")


def _manifest_problem(data: object) -> str | None:
    if not isinstance(data, dict):
        return "the top level is not a JSON object"
    if data.get("format") != FORMAT:
        return f"unknown format {data.get('format')!r} (expected {FORMAT})"
    for key in ("streams", "runs"):
        if not isinstance(data.get(key), dict):
            return f"{key!r} is missing or not an object"
    return None
