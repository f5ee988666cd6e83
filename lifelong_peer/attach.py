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

``transformers`` is imported only by ``load_base`` and ``HFTokenizer``; ``attach`` itself works on
any module with the usual layout (a ``config`` and a list of blocks that each own an ``.mlp``).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checkpoint import CheckpointError, check_state, load_tensors, save_tensors
from .errors import UserError
from .peer import PEER, PEERConfig, active_params_per_token

Mode = Literal["add", "replace"]
ATTACHED_FORMAT = "lifelong-peer/attached/1"
#: names of a decoder block's FFN submodule across architectures (GPT-2, Llama, Qwen, Mistral, NeoX, …)
MLP_NAMES = ("mlp", "feed_forward", "ffn")


@dataclass
class AttachConfig:
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

    def peer_config(self, position: int) -> PEERConfig:
        """The PEERConfig of the ``position``-th PEER layer (0-based among PEER layers)."""
        n = self.peer.num_subkeys if self.peer_subkeys is None else self.peer_subkeys[position]
        gens = self.peer.generations if self.peer_generations is None else self.peer_generations[position]
        return dataclasses.replace(self.peer, num_subkeys=n, generations=gens)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> AttachConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown attach config keys: {', '.join(sorted(unknown))}")
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


class AttachedLM(nn.Module):
    """A Hugging Face causal LM with PEER layers, behind the ``LanguageModel`` interface.

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

    def grow(self, num_new: int, layer: int | None = None, **kwargs) -> dict[int, Tensor]:
        """Grow every PEER layer (or the ``layer``-th one) by ``num_new`` sub-keys per half; see ``PEER.grow``.

        Returns {position among PEER layers: new expert ids}; updates ``config.peer_subkeys``.
        """
        layers = self.peer_layers()
        positions = range(len(layers)) if layer is None else [layer]
        for pos in positions:
            if not 0 <= pos < len(layers):
                raise ValueError(
                    f"PEER layer {pos} does not exist; this model has {len(layers)} (0..{len(layers) - 1})"
                )
        new = {pos: layers[pos].grow(num_new, **kwargs) for pos in positions}
        self.config.peer_subkeys = [p.config.num_subkeys for p in layers]
        if any(p.config.generations for p in layers):
            self.config.peer_generations = [p.config.generations for p in layers]
            gates = {p.config.generation_gate for p in layers if p.config.generations}
            if len(gates) > 1:
                raise ValueError(
                    f"PEER layers of one model cannot gate their generations differently, got {sorted(gates)}"
                )
            self.config.peer = dataclasses.replace(self.config.peer, generation_gate=gates.pop())
        return new

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def active_params_per_token(self) -> int:
        """Parameters a token touches: all but other tokens' input embeddings and unretrieved experts."""
        total = self.num_params()
        emb, out = self.hf.get_input_embeddings(), self.hf.get_output_embeddings()
        if out is None or out.weight is not emb.weight:  # a tied matrix is touched in full as the output layer
            total -= emb.weight.numel() - emb.weight.shape[1]
        for p in self.peer_layers():
            total += active_params_per_token(p.config) - sum(t.numel() for t in p.parameters())
        return total

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


def _offline() -> bool:
    flags = (os.environ.get(v, "").strip().lower() for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return any(f in ("1", "true", "yes", "on") for f in flags)


def _check_local_dir(name: str, weights: bool) -> None:
    path = Path(name).expanduser()
    if not path.exists():
        raise UserError(f"base model {name!r}: no such directory")
    if not path.is_dir():
        raise UserError(f"base model {name!r}: not a directory")
    if not (path / "config.json").is_file():
        raise UserError(f"base model {name!r}: config.json is missing")
    if weights and not any(path.glob("*.safetensors")):
        raise UserError(
            f"base model {name!r}: no *.safetensors weights (lifelong-peer does not load pickled .bin files)"
        )


def _load_error(what: str, name: str, error: Exception) -> UserError:
    """One sentence for a model or tokenizer ``from_pretrained`` could not load; offline, name what is missing."""
    if not _offline():
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return UserError(f"{what} {name!r}: could not load it ({first})")
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = isinstance(try_to_load_from_cache(name, "config.json"), str)
    except ValueError:  # not a valid repo id
        cached = False
    missing = (
        "its files are" if what == "tokenizer" else "its *.safetensors weights are" if cached else "its config.json is"
    )
    return UserError(
        f"{what} {name!r}: {missing} not in the Hugging Face cache and HF_HUB_OFFLINE is set; "
        f"download it where there is internet (hf download {name}) or give a local directory"
    )


def load_base_config(name_or_path: str):
    """The ``transformers`` config of a base model (vocabulary, positions) without loading its weights;
    same sources and offline rules as ``load_base``."""
    transformers, source = _base_source(name_or_path)
    try:
        return transformers.AutoConfig.from_pretrained(source, local_files_only=_offline())
    except (OSError, ValueError) as e:
        raise _load_error("base model", name_or_path, e) from None


def _base_source(name_or_path: str):
    """(the transformers module, what to pass to from_pretrained): a checked local directory or a hub name."""
    try:
        import transformers
    except ImportError:
        raise UserError("loading a base model needs transformers: pip install 'lifelong-peer[hf]'") from None
    local = Path(name_or_path).expanduser()
    if local.exists() or name_or_path.startswith((".", "/", "~")):
        _check_local_dir(name_or_path, weights=True)
    return transformers, str(local) if local.exists() else name_or_path


def load_base(name_or_path: str, dtype: str | None = None, device: str | torch.device = "cpu") -> nn.Module:
    """A ``transformers`` causal LM from a local directory or the Hugging Face cache/hub, in eval mode.

    With ``HF_HUB_OFFLINE`` set nothing is fetched (``local_files_only``); a model that is not
    there is a ``UserError`` naming what is missing. Only safetensors weights are loaded (no pickle).
    """
    transformers, source = _base_source(name_or_path)
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            source, local_files_only=_offline(), use_safetensors=True
        )
    except (OSError, ValueError) as e:
        raise _load_error("base model", name_or_path, e) from None
    if dtype is not None:
        model = model.to(getattr(torch, dtype))
    return model.to(device).eval()


class HFTokenizer:
    """A Hugging Face tokenizer behind the ``lifelong_peer.streams.tokenize.Tokenizer`` interface.

    No special tokens are added by ``encode``; ``separator_id`` (end-of-text, else beginning-of-text)
    is what to place between packed documents. Bits per byte stay comparable with the byte model
    because evaluation divides by the UTF-8 bytes behind the tokens, not by tokens.
    """

    def __init__(self, name_or_path: str):
        try:
            from transformers import AutoTokenizer
        except ImportError:
            raise UserError("Hugging Face tokenizers need transformers: pip install 'lifelong-peer[hf]'") from None
        local = Path(name_or_path).expanduser()
        if local.exists():
            _check_local_dir(name_or_path, weights=False)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(
                str(local) if local.exists() else name_or_path, local_files_only=_offline()
            )
        except (OSError, ValueError) as e:
            raise _load_error("tokenizer", name_or_path, e) from None
        self.name = f"hf:{name_or_path}"
        self.vocab_size = len(self.tokenizer)
        sep = self.tokenizer.eos_token_id
        self.separator_id = sep if sep is not None else self.tokenizer.bos_token_id

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def fingerprint(self) -> str:
        """sha256 of what fixes the ids: the full tokenizer definition (fast tokenizers) or the vocabulary,
        plus the separator. Equal for the same tokenizer however it was named (hub name or local copy)."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        definition = backend.to_str() if backend is not None else json.dumps(sorted(self.tokenizer.get_vocab().items()))
        return hashlib.sha256(f"{definition}\n{self.separator_id}".encode()).hexdigest()

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(list(ids))


__all__ = [
    "ATTACHED_FORMAT",
    "AttachConfig",
    "AttachedLM",
    "HFTokenizer",
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
