"""Checkpoints: safetensors for tensors, JSON for everything else; atomic writes; no pickle.

A model file is one ``.safetensors`` file whose header metadata holds the JSON config under the key
``lifelong_peer`` — one file, so one atomic rename publishes weights and config together, and
loading builds the right shapes (a grown pool, its frozen masks) before reading a single tensor.
Loading never executes code: safetensors and JSON are data formats, and a pickle / ``torch.save``
file is refused by its magic bytes with a message.

Integrity (issue 10): every file carries a sha256 of its content (metadata JSON + every tensor's
name, dtype, shape and bytes) in its header, checked on every load, so a flipped byte is an error
naming the file wherever the file travels; runs also record each file's size and sha256
(``files.file_record`` / ``verify_file``) to tell a truncated file from an altered one. Before any tensor
is allocated, shapes are derived from the config on PyTorch's ``meta`` device, so a hostile header
announcing 10^12 parameters costs nothing. Writes that fail for lack of space or permission are
one-line ``UserError``s naming the path; the temp file + rename leaves the previous file intact.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import files
from .errors import CheckpointError
from .model import LanguageModel, ModelConfig

MODEL_FORMAT = "lifelong-peer/model/1"
META_KEY = "lifelong_peer"
#: header key of the content checksum (``content_sha256``); files written before it load unchecked
DIGEST_KEY = "lifelong_peer_sha256"
#: a safetensors header larger than this is not one of ours (guards against absurd allocations)
MAX_HEADER_BYTES = 100 * 1024 * 1024


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Write ``tensors`` and the JSON-able ``meta`` to one safetensors file, atomically."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    meta_json = json.dumps(meta, sort_keys=True)
    header = {META_KEY: meta_json, DIGEST_KEY: content_sha256(meta_json, tensors)}
    files.atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=header))  # looked up when called (torture.py)


def content_sha256(meta_json: str, tensors: dict[str, torch.Tensor]) -> str:
    """sha256 of the metadata and of every tensor (name, dtype, shape, bytes), independent of file layout."""
    h = hashlib.sha256(meta_json.encode("utf-8"))
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode("utf-8"))
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def read_meta(path: str | os.PathLike) -> dict:
    """The JSON metadata of a safetensors file we wrote, without reading its tensors."""
    return _read_header(Path(path))[0]


def _read_header(path: Path) -> tuple[dict, str, str | None]:
    """(meta, meta JSON as stored, content sha256 or None) of a safetensors file we wrote."""
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    with open(path, "rb") as f:
        head = f.read(8)
        _refuse_foreign(path, head + f.read(1))
        f.seek(8)
        (size,) = struct.unpack("<Q", head)
        if size > MAX_HEADER_BYTES or size > path.stat().st_size - 8:
            raise CheckpointError(f"{path}: not a valid safetensors file (header size {size} is out of range)")
        raw = f.read(size)
    try:
        stored = json.loads(raw)["__metadata__"]
        meta_json, digest = stored[META_KEY], stored.get(DIGEST_KEY)
        meta = json.loads(meta_json)
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        raise CheckpointError(f"{path}: not a lifelong-peer checkpoint (no {META_KEY!r} metadata)") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: metadata is not a JSON object")
    return meta, meta_json, digest


def load_tensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a file written by ``save_tensors``: (tensors, meta). Refuses anything else with a message,
    and a file whose content does not match its checksum."""
    meta, meta_json, digest = _read_header(Path(path))
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"{path}: corrupted safetensors data ({e})") from None
    if digest is not None and content_sha256(meta_json, tensors) != digest:
        raise CheckpointError(f"{path}: corrupted or altered (its content does not match the checksum in its header)")
    return tensors, meta


def _refuse_foreign(path: Path, head: bytes) -> None:
    if len(head) < 8:
        raise CheckpointError(f"{path}: file is empty or truncated, not a checkpoint")
    # a pickle starts with 0x80 (PROTO); so does a safetensors file whose header size is 128 mod 256,
    # but its header, from byte 8 on, is a JSON object
    if head.startswith(b"PK\x03\x04") or (head[:1] == b"\x80" and head[8:9] != b"{"):
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
    layers = meta.get("model_config", {}).get("layers") if isinstance(meta.get("model_config"), dict) else None
    if isinstance(layers, int) and layers > len(tensors):  # every block has tensors: refuse before building
        raise CheckpointError(f"{path}: its config announces {layers:,} blocks, but it holds {len(tensors)} tensors")
    try:
        config = ModelConfig.from_dict(meta["model_config"])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{path}: invalid model config ({e})") from None
    with torch.device("meta"):  # shapes without memory: a config announcing absurd sizes fails here, cheaply
        check_state(path, LanguageModel(config).state_dict(), tensors)
    model = LanguageModel(config)
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


def check_optimizer_state(path: str | os.PathLike, params: dict[str, torch.Tensor], tensors: dict) -> None:
    """Optimizer state ``{"<param>::<key>": tensor}`` fits ``params``: each tensor a scalar, one number
    per row (row-sparse step counts), or shaped like the parameter or its (rows, width) view (moments)."""
    for key, t in tensors.items():
        name = key.rpartition("::")[0]
        p = params.get(name)
        if p is None:
            raise CheckpointError(f"{path}: optimizer state {key} belongs to no parameter of the model")
        width = p.shape[-1] if p.dim() else 1
        allowed = {(), (p.numel() // width,), tuple(p.shape), (p.numel() // width, width)}
        if tuple(t.shape) not in allowed or not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64)):
            raise CheckpointError(
                f"{path}: optimizer state {key} has shape {tuple(t.shape)} {t.dtype}, which does not fit {name}"
            )
