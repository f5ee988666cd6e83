"""Bring your own model: attach growable PEER layers to a Hugging Face causal LM (issue 11).

He 2024 (§1, §3) notes that a PEER layer "can be added to an existing transformer model or used to
replace an FFW layer". ``attach`` does either to chosen decoder blocks of a ``transformers`` causal LM:

* ``mode="add"``: the block's MLP becomes ``mlp(x) + peer(x)``. The PEER branch starts with
  v = 0 for every expert, so it outputs exactly zero and the attached model computes the very same
  logits as the base until trained; training and growth then add memory beside the pretrained FFN.
* ``mode="replace"``: the MLP is removed and PEER alone takes its place (also v = 0, i.e. the block
  starts as if it had no FFN). Lossy until trained.

The base model's own weights are frozen (``requires_grad=False``) except those named by
``trainable`` patterns, so the row-sparse optimizer (``lifelong_peer.optim``) trains only PEER (+
chosen) parameters. The result is wrapped in ``AttachedLM``, which speaks the ``LanguageModel``
interface the trainer and the index manager use: ``model(idx, targets) -> (logits, loss)``,
``peer_layers()``, ``grow()``, ``num_params()``, ``active_params_per_token()``, ``config.context``.

Checkpoints (``save_attached`` / ``load_attached``) hold only what can change — PEER layers and the
trainable base weights — plus the config, the base's name or path, and a sha256 fingerprint of the
base weights, checked on load so a delta is never applied to the wrong base.

``transformers`` is imported only by ``load_base`` (and the stream's ``HFTokenizer``); ``attach`` itself works on
any module with the usual layout (a ``config`` and a list of blocks that each own an ``.mlp``).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checkpoint import CheckpointError, check_state, load_tensors, save_tensors
from .errors import UserError
from .peer import PEER, PEERConfig
from .peer_model import PEERModel, PEERModelConfig
from .streams.hf_tokenizer import cache_only, check_local_dir, load_error

Mode = Literal["add", "replace"]
ATTACHED_FORMAT = "lifelong-peer/attached/1"
#: names of a decoder block's FFN submodule across architectures (GPT-2, Llama, Qwen, Mistral, NeoX, …)
MLP_NAMES = ("mlp", "feed_forward", "ffn")


@dataclass
class AttachConfig(PEERModelConfig):
    """Where PEER layers sit in a base model, and what identifies that base. Saved with every checkpoint."""

    base: str = ""
    """Hugging Face model name or local directory of the base model ("" for a model built in memory)."""
    fingerprint: str = ""
    """sha256 of the base model's weights at attach time (``fingerprint``); checked on load."""
    dtype: str = "float32"
    """dtype of the base weights (the fingerprint depends on it); ``load_attached`` loads the base in it."""
    layers: list[int] = field(default_factory=list)
    """Decoder blocks (0-based) that carry a PEER layer, ascending."""
    mode: Mode = "add"
    """add: MLP + PEER branch (exactly the base's output at attach); replace: PEER instead of the MLP."""
    peer: PEERConfig = field(default_factory=PEERConfig)
    """PEER layer template; its dim is the base's hidden size."""
    peer_subkeys: list[int] | None = None
    """Current sub-keys per PEER layer, in block order; follows growth. None: all at peer.num_subkeys."""
    peer_generations: list[list[list[int]]] | None = None
    """Grown generations per PEER block, in block order (``PEERConfig.generations``); follows growth. None: none."""
    trainable: list[str] = field(default_factory=list)
    """fnmatch patterns of base parameter names left trainable (e.g. "*.ln_2.*", "lm_head.*"); "*" = all."""
    context: int = 1024
    """Longest sequence fed to the model (default: the base's max_position_embeddings)."""
    vocab_size: int = 0
    """Rows of the base's output layer (logits per token)."""

    def __post_init__(self) -> None:
        if isinstance(self.peer, dict):
            self.peer = PEERConfig(**self.peer)
        if self.mode not in ("add", "replace"):
            raise UserError(f"attach mode must be add or replace, got {self.mode!r}")
        if self.peer_subkeys is not None and len(self.peer_subkeys) != len(self.layers):
            raise ValueError(
                f"AttachConfig.peer_subkeys has {len(self.peer_subkeys)} entries for {len(self.layers)} layers"
            )
        if self.peer_generations is not None and len(self.peer_generations) != len(self.layers):
            raise ValueError(
                f"AttachConfig.peer_generations has {len(self.peer_generations)} entries for {len(self.layers)} layers"
            )

    @classmethod
    def from_dict(cls, data: dict) -> AttachConfig:
        cls.check_keys(data, "attach")
        return cls(**data)


class PEERBranch(nn.Module):
    """What takes a block's MLP slot: ``mlp(x) + peer(x)`` (add) or ``peer(x)`` (replace, ``mlp`` None).

    PEER runs in its own dtype (float32 by default, for the row-sparse optimizer) whatever the base's.
    """

    def __init__(self, mlp: nn.Module | None, peer: PEER):
        super().__init__()
        self.mlp = mlp
        self.peer = peer

    def forward(self, x: Tensor, *args, **kwargs):
        """x (B, T, dim) → (B, T, dim); extra arguments go to the wrapped MLP."""
        y = self.peer(x.to(self.peer.U.dtype)).to(x.dtype)
        if self.mlp is None:
            return y
        out = self.mlp(x, *args, **kwargs)
        if isinstance(out, tuple):  # MLPs that also return router logits and the like
            return (out[0] + y, *out[1:])
        return out + y


# --- finding the blocks ---------------------------------------------------------------------------


def _mlp_name(block: nn.Module) -> str | None:
    return next((n for n in MLP_NAMES if isinstance(getattr(block, n, None), nn.Module)), None)


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's list of decoder blocks: the first ModuleList whose every entry owns an MLP
    (``transformer.h`` for GPT-2, ``model.layers`` for Llama/Qwen/SmolLM/Mistral), preferring one of
    length ``config.num_hidden_layers``."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) and all(map(_mlp_name, m))]
    if not lists:
        raise UserError(
            f"{type(model).__name__}: found no decoder blocks with an MLP submodule "
            f"({'/'.join(MLP_NAMES)}); supported are GPT-2 and Llama/Qwen/SmolLM/Mistral-style causal LMs"
        )
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    return next((m for m in lists if len(m) == n), lists[0])


def peer_layers(model: nn.Module) -> list[PEER]:
    """The attached PEER layers of ``model`` (an ``AttachedLM`` or the Hugging Face model), in block order."""
    return [m for m in model.modules() if isinstance(m, PEER)]


def _hidden_size(model: nn.Module) -> int:
    size = getattr(getattr(model, "config", None), "hidden_size", None)
    return int(size) if size else model.get_input_embeddings().embedding_dim


def fingerprint(model: nn.Module) -> str:
    """sha256 over the names, dtypes, shapes and bytes of ``model.state_dict()`` (sorted by name)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


# --- attaching --------------------------------------------------------------------------------------


def attach(
    model: nn.Module,
    layers: Sequence[int] | None = None,
    mode: Mode = "add",
    peer: PEERConfig | None = None,
    trainable: Sequence[str] = (),
    base: str | None = None,
    context: int | None = None,
) -> AttachedLM:
    """Put PEER layers into blocks ``layers`` of a ``transformers`` causal LM; returns the ``AttachedLM``.

    ``layers``: 0-based block indices, negative ones count from the end (default: the middle block,
    as in the paper, §3). ``peer``: the PEER template (default ``PEERConfig()``; dim is set to the
    hidden size). ``trainable``: fnmatch patterns of base parameters to keep trainable — all others
    are frozen. ``base``: name or path to record (default ``model.name_or_path``). ``context``:
    longest sequence (default the base's ``max_position_embeddings``). ``model`` is modified in
    place and stays usable as a Hugging Face model (``AttachedLM.hf``).
    """
    if peer_layers(model):
        raise UserError(f"{type(model).__name__} already has PEER layers attached")
    blocks = decoder_blocks(model)
    n = len(blocks)
    layers = [n // 2] if layers is None else list(layers)
    bad = [i for i in layers if not -n <= i < n]
    if bad or not layers:
        raise UserError(f"attach: layers {bad or layers} do not exist; the model has {n} blocks (0..{n - 1})")
    layers = sorted({i % n for i in layers})
    hidden = _hidden_size(model)
    hf_config = getattr(model, "config", None)
    max_pos = getattr(hf_config, "max_position_embeddings", None)
    if context and max_pos and context > max_pos:
        raise UserError(f"attach: context {context} exceeds the base's max_position_embeddings ({max_pos})")
    params = list(model.parameters())
    config = AttachConfig(
        base=base if base is not None else str(getattr(model, "name_or_path", "") or ""),
        fingerprint=fingerprint(model),
        dtype=str(params[0].dtype).removeprefix("torch.") if params else "float32",
        layers=layers,
        mode=mode,
        peer=dataclasses.replace(peer or PEERConfig(), dim=hidden),
        trainable=list(trainable),
        context=int(context or max_pos or 1024),
        vocab_size=int(getattr(hf_config, "vocab_size", 0) or model.get_output_embeddings().weight.shape[0]),
    )
    return _build(model, config)


def _build(model: nn.Module, config: AttachConfig) -> AttachedLM:
    """Insert the PEER layers ``config`` describes (v = 0) and freeze the base; no checks on the config."""
    blocks = decoder_blocks(model)
    names = [name for name, _ in model.named_parameters()]
    for pattern in config.trainable:
        if not fnmatch.filter(names, pattern):
            raise UserError(
                f"attach: trainable pattern {pattern!r} matches no parameter of the base (e.g. {names[0]!r})"
            )
    for name, param in model.named_parameters():
        param.requires_grad_(any(fnmatch.fnmatchcase(name, pattern) for pattern in config.trainable))
    for pos, b in enumerate(config.layers):
        block = blocks[b]
        slot = _mlp_name(block)
        mlp = getattr(block, slot)
        device = next(block.parameters()).device
        layer = PEER(config.peer_config(pos))
        with torch.no_grad():
            layer.V.zero_()  # the branch outputs exactly zero until trained (module docstring)
        branch = PEERBranch(mlp if config.mode == "add" else None, layer.to(device))
        setattr(block, slot, branch.train(block.training))  # a new module is in training mode; follow the base
    return AttachedLM(model, config)


class AttachedLM(PEERModel):
    """A Hugging Face causal LM with PEER layers, a ``PEERModel`` like the byte-level ``LanguageModel``.

    ``forward(idx (B, T), targets (B, T) | None) → (logits (B, T, vocab), mean NLL | None)``.
    """

    def __init__(self, hf_model: nn.Module, config: AttachConfig):
        super().__init__()
        self.hf = hf_model
        self.config = config
        self.training = hf_model.training  # keep the base's mode (from_pretrained gives eval)

    def forward(self, idx: Tensor, targets: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Targets equal to -1 are ignored (padding), as in ``LanguageModel``."""
        if self.config.context < idx.shape[1]:
            raise ValueError(f"sequence of {idx.shape[1]} tokens exceeds the model's context of {self.config.context}")
        logits = self.hf(input_ids=idx, use_cache=False).logits
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-1)
        return logits, loss

    def peer_layers(self) -> list[PEER]:
        return peer_layers(self.hf)

    def untouched_params(self) -> int:
        """The other tokens' input-embedding rows (none when tied: the output layer touches it in full)."""
        emb, out = self.hf.get_input_embeddings(), self.hf.get_output_embeddings()
        if out is None or out.weight is not emb.weight:
            return emb.weight.numel() - emb.weight.shape[1]
        return 0

    def delta_state_dict(self) -> dict[str, Tensor]:
        """What a checkpoint holds: every PEER layer's state and the ``trainable`` base weights (HF names)."""
        prefixes = tuple(f"{name}." for name, m in self.hf.named_modules() if isinstance(m, PEER))
        return {
            name: t
            for name, t in self.hf.state_dict().items()
            if name.startswith(prefixes) or any(fnmatch.fnmatchcase(name, p) for p in self.config.trainable)
        }


# --- checkpoints ------------------------------------------------------------------------------------


def save_attached(model: AttachedLM, path: str | os.PathLike) -> None:
    """The delta (``AttachedLM.delta_state_dict``) and config to one safetensors file, atomically."""
    meta = {"format": ATTACHED_FORMAT, "attach_config": model.config.to_dict()}
    save_tensors(path, model.delta_state_dict(), meta)


def load_attached(
    path: str | os.PathLike, base_model: nn.Module | None = None, device: str | torch.device = "cpu"
) -> AttachedLM:
    """Rebuild an ``AttachedLM`` saved by ``save_attached`` on ``base_model`` (default: ``load_base`` of
    the recorded name/path). Refuses a base whose weights do not match the recorded fingerprint."""
    tensors, meta = load_tensors(path)
    if meta.get("format") != ATTACHED_FORMAT or "attach_config" not in meta:
        raise CheckpointError(f"{path}: not an attached-model checkpoint (format {meta.get('format')!r})")
    return attached_from_tensors(path, tensors, meta["attach_config"], base_model).to(device)


def attached_from_tensors(
    path: str | os.PathLike, tensors: dict[str, Tensor], config: dict, base_model: nn.Module | None = None
) -> AttachedLM:
    """``load_attached`` on tensors already read (``delta_state_dict`` names) and an ``AttachConfig`` dict —
    for files that hold more than the model, such as the trainer's run checkpoints."""
    try:
        config = AttachConfig.from_dict(config)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: invalid attach config ({e})") from None
    if base_model is None:
        if not config.base:
            raise UserError(f"{path}: the base model was built in memory; pass it as base_model")
        base_model = load_base(config.base, dtype=config.dtype)
    if peer_layers(base_model):
        raise UserError(f"{path}: base_model already has PEER layers attached; pass the plain base model")
    found = fingerprint(base_model)
    if found != config.fingerprint:
        raise UserError(
            f"{path}: the base model does not match the one this checkpoint was trained on "
            f"(weights fingerprint {found[:12]}…, expected {config.fingerprint[:12]}… of {config.base or 'an in-memory model'!r})"
        )
    model = _build(base_model, config)
    check_state(path, model.delta_state_dict(), tensors)
    model.hf.load_state_dict(tensors, strict=False)
    return model


# --- loading from Hugging Face -------------------------------------------------------------------------


def load_base_config(name_or_path: str):
    """The ``transformers`` config of a base model (vocabulary, positions) without loading its weights;
    same sources and offline rules as ``load_base``."""
    transformers, source = _base_source(name_or_path)
    why = cache_only(name_or_path)
    try:
        return transformers.AutoConfig.from_pretrained(source, local_files_only=why is not None)
    except (OSError, ValueError) as e:
        raise load_error("base model", name_or_path, e, why) from None


def _base_source(name_or_path: str):
    """(the transformers module, what to pass to from_pretrained): a checked local directory or a hub name."""
    try:
        import transformers
    except ImportError:
        raise UserError("loading a base model needs transformers: pip install 'lifelong-peer[hf]'") from None
    local = Path(name_or_path).expanduser()
    if local.exists() or name_or_path.startswith((".", "/", "~")):
        check_local_dir(name_or_path, weights=True)
    return transformers, str(local) if local.exists() else name_or_path


def load_base(name_or_path: str, dtype: str | None = None, device: str | torch.device = "cpu") -> nn.Module:
    """A ``transformers`` causal LM from a local directory or the Hugging Face cache/hub, in eval mode.

    With ``HF_HUB_OFFLINE`` set, or the hub out of reach, nothing is fetched (``local_files_only``); a model that is not
    there is a ``UserError`` naming what is missing. Only safetensors weights are loaded (no pickle).
    """
    transformers, source = _base_source(name_or_path)
    why = cache_only(name_or_path)
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            source, local_files_only=why is not None, use_safetensors=True
        )
    except (OSError, ValueError) as e:
        raise load_error("base model", name_or_path, e, why) from None
    if dtype is not None:
        model = model.to(getattr(torch, dtype))
    return model.to(device).eval()


__all__ = [
    "ATTACHED_FORMAT",
    "AttachConfig",
    "AttachedLM",
    "PEERBranch",
    "attach",
    "attached_from_tensors",
    "decoder_blocks",
    "fingerprint",
    "load_attached",
    "load_base",
    "load_base_config",
    "peer_layers",
    "save_attached",
]
