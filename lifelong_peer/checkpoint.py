"""Checkpoints: safetensors for tensors, JSON for everything else; atomic writes; no pickle.

A model file is one ``.safetensors`` file whose header metadata holds the JSON config under the key
``lifelong_peer`` — one file, so one atomic rename publishes weights and config together, and
loading builds the right shapes (a grown pool, its frozen masks) before reading a single tensor.
Loading never executes code: safetensors and JSON are data formats, and a pickle / ``torch.save``
file is refused by its magic bytes with a message.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import CheckpointError
from .model import LanguageModel, ModelConfig

MODEL_FORMAT = "lifelong-peer/model/1"
META_KEY = "lifelong_peer"
#: a safetensors header larger than this is not one of ours (guards against absurd allocations)
MAX_HEADER_BYTES = 100 * 1024 * 1024
_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)``, fsync, and rename onto ``path``: readers see the old or the new file, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; published files get the usual permissions
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | os.PathLike, data: object) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


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


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Write ``tensors`` and the JSON-able ``meta`` to one safetensors file, atomically."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    header = {META_KEY: json.dumps(meta, sort_keys=True)}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=header))


def read_meta(path: str | os.PathLike) -> dict:
    """The JSON metadata of a safetensors file we wrote, without reading its tensors."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    with open(path, "rb") as f:
        head = f.read(8)
        _refuse_foreign(path, head)
        (size,) = struct.unpack("<Q", head)
        if size > MAX_HEADER_BYTES or size > path.stat().st_size - 8:
            raise CheckpointError(f"{path}: not a valid safetensors file (header size {size} is out of range)")
        raw = f.read(size)
    try:
        header = json.loads(raw)
        meta = json.loads(header["__metadata__"][META_KEY])
    except (ValueError, KeyError, TypeError):
        raise CheckpointError(f"{path}: not a lifelong-peer checkpoint (no {META_KEY!r} metadata)") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: metadata is not a JSON object")
    return meta


def load_tensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a file written by ``save_tensors``: (tensors, meta). Refuses anything else with a message."""
    meta = read_meta(path)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: corrupted safetensors data ({e})") from None
    return tensors, meta


def _refuse_foreign(path: Path, head: bytes) -> None:
    if len(head) < 8:
        raise CheckpointError(f"{path}: file is empty or truncated, not a checkpoint")
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        raise CheckpointError(
            f"{path}: this is a pickle/torch.save file; lifelong-peer only loads safetensors checkpoints "
            "(pickle can run arbitrary code on load)"
        )


def save_model(model: LanguageModel, path: str | os.PathLike) -> None:
    """Weights, buffers (frozen masks, BatchNorm statistics) and config of ``model`` to one file."""
    meta = {"format": MODEL_FORMAT, "model_config": model.config.to_dict()}
    save_tensors(path, model.state_dict(), meta)


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> LanguageModel:
    """Rebuild a model saved by ``save_model`` — the config fixes every shape before tensors are read."""
    tensors, meta = load_tensors(path)
    return model_from_tensors(path, tensors, meta).to(device)


def model_from_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict) -> LanguageModel:
    if meta.get("format") != MODEL_FORMAT:
        raise CheckpointError(f"{path}: unsupported checkpoint format {meta.get('format')!r} (expected {MODEL_FORMAT})")
    try:
        config = ModelConfig.from_dict(meta["model_config"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: invalid model config ({e})") from None
    model = LanguageModel(config)
    check_state(path, model.state_dict(), tensors)
    model.load_state_dict(tensors, strict=True)
    return model


def check_state(path: str | os.PathLike, expected: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor]) -> None:
    """Every expected tensor present with the shape and dtype the config implies, and nothing else."""
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        what = f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}"
        raise CheckpointError(f"{path}: tensors do not match the saved config ({what})")
    for name, ref in expected.items():
        t = tensors[name]
        if t.shape != ref.shape or t.dtype != ref.dtype:
            raise CheckpointError(
                f"{path}: tensor {name} has shape {tuple(t.shape)} {t.dtype}, the config implies "
                f"{tuple(ref.shape)} {ref.dtype}"
            )
