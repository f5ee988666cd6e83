"""Reusing a trained base within a workspace (issue 17): the walkthrough trained the same base twice.

A trained base depends only on what ``base_key`` lists; a run whose key equals that of a base already
trained in its workspace (its own earlier one first) copies that base instead of training its own —
provided the file passes its integrity check. ``--base RUN`` names such a base by its run.
Each run keeps its key in ``base.json`` beside the file's size and sha256 (``Run.save_base``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
from pathlib import Path

from . import advice, distributed
from .config import base_train_config
from .errors import CheckpointError, UserError
from .files import verify_file

_BASE = "checkpoints/base.safetensors"


def base_key(run) -> dict:
    """Everything a trained base depends on (issue 17): the train tokens it reads (per slice, in order),
    the model, the base settings (``base_train_config``), the device kind, the number of ranks and the
    code version. Two runs with equal keys train bit-identical bases, so one may reuse the other's."""
    from . import __version__

    cfg = run.config
    names = cfg.slices if cfg.train.base_data == "mix" else cfg.slices[:1]
    tc = base_train_config(cfg.train)
    settings = {k: v for k, v in dataclasses.asdict(tc).items() if k not in ("checkpoint_every", "device")}
    model = cfg.model.to_dict() if cfg.attach is None else {"attach": dataclasses.asdict(cfg.attach)}
    return {
        "data": [[n, _tokens_fingerprint(run.slice_data(n), "train")] for n in names],
        "model": model,
        "context": cfg.context,
        "train": settings,
        "device": run.device.type,
        "world_size": distributed.world_size(),
        "version": __version__,
    }


def _tokens_fingerprint(data, split: str) -> str:
    """The sha256 of a slice's ``split`` tokens: the one recorded at ingest, or computed (in-memory data)."""
    import numpy as np

    record = (getattr(data, "splits", None) or {}).get(split, {}).get("file")
    if record is not None:
        return record["sha256"]
    tokens = np.ascontiguousarray(data.tokens(split))
    return hashlib.sha256(tokens.dtype.str.encode() + tokens.tobytes()).hexdigest()


def find_base(run, key: dict) -> dict | None:
    """A trained base ``run`` may start from instead of training its own (issue 17): its own earlier
    one, else one of another run of its workspace, whose base.json has the same ``key`` and whose
    base.safetensors passes its integrity check (size, sha256, content checksum, config) — a damaged
    one is never reused. Returns ``{"run", "path"}`` or None."""
    wanted = key_hash(key)
    others = sorted((run.workspace.root / "runs").glob("*/base.json")) if run.workspace is not None else []
    for record_path in [run.dir / "base.json", *(p for p in others if p.parent.resolve() != run.dir.resolve())]:
        try:
            record = json.loads(record_path.read_text(encoding="utf-8"))
            if not isinstance(record, dict) or record.get("key") != wanted:
                continue
            path = record_path.parent / "checkpoints" / "base.safetensors"
            verify_file(path, record["file"])
            run.read_model(path)  # its content checksum, config and tensors
        except (OSError, ValueError, KeyError, TypeError, CheckpointError):
            continue
        return {"run": record_path.parent.name, "path": path}
    return None


def base_of_run(workspace, name: str) -> Path:
    """``--base RUN``: the base model of run ``name`` of ``workspace``, checked against its record."""
    directory = workspace.resolve_run(name)
    path = directory / "checkpoints" / "base.safetensors"
    if not path.exists():
        raise UserError(
            f"run {name!r} has no base model yet; start it first ({advice.command(advice.RESUME, workspace.root, run=name)})"
        )
    record = None
    for listing, get in (("base.json", lambda d: d["file"]), ("state.json", lambda d: d["files"][_BASE])):
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            record = record or get(json.loads((directory / listing).read_text(encoding="utf-8")))
    if record is not None:
        verify_file(path, record)
    return path


def key_hash(key: dict) -> str:
    """sha256 of a JSON-able settings key (sorted keys): equal settings, equal hash."""
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
