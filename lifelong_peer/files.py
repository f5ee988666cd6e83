"""Files on disk, without tensors: atomic writes, size + sha256 records, and the names of a run's
checkpoint files.

Every file lifelong-peer writes is written to a temp file, fsynced and renamed (readers see the old
or the new file, never half of one); runs record each file's size and sha256 to tell a truncated file
from an altered one (issue 10). These helpers load no torch, so the commands that only read
workspaces — ``lpeer streams``, ``lpeer eval`` of a finished run, ``--help`` — start fast (issue 25).
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from .errors import CheckpointError, UserError

_UMASK = os.umask(0)
os.umask(_UMASK)


class IntegrityWarning(UserWarning):
    """A damaged file was skipped or rebuilt (the command line prints it as one line on stderr)."""


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)``, fsync, and rename onto ``path``: readers see the old or the new file, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; published files get the usual permissions
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno in _RESOURCE_ERRORS:
            raise UserError(
                f"cannot write {path}: {_RESOURCE_ERRORS[e.errno]} ({e.strerror}); the previous version is intact"
            ) from None
        raise
    _fsync_dir(path.parent)


#: write failures a user fixes (free space, permissions), not bugs
_RESOURCE_ERRORS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EROFS: "the file system is read-only",
}


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | os.PathLike, data: object) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def atomic_write_dir(path: str | os.PathLike, write: Callable[[Path], None], replace: bool = False) -> None:
    """Build a directory with ``write(tmp_dir)`` beside ``path``, fsync it and rename it onto ``path``: a crash
    leaves no half-written directory (issue 26: ``lpeer export``). A non-empty ``path`` is refused unless ``replace``;
    then it is moved aside, the new one renamed in, and the old one deleted."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{path} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not replace:
        raise UserError(f"{path} is not empty; choose another directory or replace it (lpeer export --force)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp makes 0700; published directories get the usual permissions
        write(tmp)
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb+") as fh:
                    os.fsync(fh.fileno())
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and e.errno in _RESOURCE_ERRORS:
            raise UserError(f"cannot write {path}: {_RESOURCE_ERRORS[e.errno]} ({e.strerror})") from None
        raise
    old = None
    if path.is_dir():
        old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
        os.replace(path, old / path.name)
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def file_record(path: str | os.PathLike) -> dict:
    """``{"size": bytes, "sha256": hex}`` of a file, for a run's integrity listing (state.json)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return {"size": Path(path).stat().st_size, "sha256": h.hexdigest()}


def verify_file(path: str | os.PathLike, record: dict) -> None:
    """Raise ``CheckpointError`` naming ``path`` when it is missing, truncated or altered since ``record``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (recorded with {record['size']:,} bytes)")
    size = path.stat().st_size
    if size != record["size"]:
        what = "truncated" if size < record["size"] else "altered"
        raise CheckpointError(f"{path}: {what} ({size:,} bytes, recorded {record['size']:,})")
    if file_record(path)["sha256"] != record["sha256"]:
        raise CheckpointError(f"{path}: altered (its sha256 differs from the one recorded when it was written)")


_CHECKPOINT = re.compile(r"checkpoints/(?:base|phase-(\d{3,}))(?:-step-(\d{6,})|-edit-(\d+))?\.safetensors")


def checkpoint_name(phase: int, step: int | None = None, edit: int | None = None) -> str:
    """The file name of a run checkpoint: after ``phase`` (-1: base training), at ``step`` of it when
    mid-phase, or the ``edit``-th edit by hand of the model after it."""
    stem = "base" if phase < 0 else f"phase-{phase:03d}"
    if step is not None:
        return f"{stem}-step-{step:06d}.safetensors"
    if edit is not None:
        return f"{stem}-edit-{edit}.safetensors"
    if phase < 0:
        raise ValueError("base.safetensors is the base model, not a run checkpoint")
    return f"{stem}.safetensors"


def checkpoint_order(rel: str) -> tuple | None:
    """Where the run checkpoint ``rel`` (relative to the run directory) lies in the run's history:
    (phase, step — inf when the phase is done —, edit); None for anything else (base.safetensors)."""
    m = _CHECKPOINT.fullmatch(rel)
    if m is None or (m[1] is None and m[2] is None and m[3] is None):
        return None
    return (int(m[1]) if m[1] else -1, int(m[2]) if m[2] else math.inf, int(m[3]) if m[3] else 0)
