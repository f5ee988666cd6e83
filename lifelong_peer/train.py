"""The continual trainer: one phase per time slice, grow → train → evaluate → record → freeze → checkpoint.

A run lives in its own directory (``Workspace.run_dir``):

    config.json         the resolved run configuration (stream, slices, strategy, model or attach, training)
    state.json          where the run stands: finished phases and the latest checkpoint (atomic pointer)
    checkpoints/        phase-NNN.safetensors after each phase; phase-NNN-step-SSSSSS.safetensors mid-phase
    metrics.jsonl       one line per training step: phase, step, loss, lr, tok/s, experts, frozen fraction
    results.json        the evaluation matrix so far (``lifelong_peer.metrics.RunResults``)

Exact resume: batches are drawn from a generator seeded by (seed, phase, step), growth from one
seeded by (seed, phase), and a checkpoint holds everything else (weights, masks, optimizer moments,
Fisher, usage ledger), so a run killed at any point and resumed ends bit-identical on CPU.
Each phase starts a fresh optimizer with warm-up + cosine decay (continual pretraining re-warms).

Bring your own model (issue 11): with ``RunConfig.attach`` the run starts from a Hugging Face causal LM
with PEER layers attached (``lifelong_peer.attach``) instead of a byte-level ``LanguageModel``; its
checkpoints hold only the delta (PEER layers + trainable base weights) and the ``AttachConfig``, and
every model is rebuilt on a copy of the base loaded once per run (``Run.read_model``), whose weights
must match the fingerprint recorded at attach time.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import distributed, regularize
from .attach import ATTACHED_FORMAT, AttachedLM, attached_from_tensors, save_attached
from .checkpoint import (
    MODEL_FORMAT,
    atomic_write_json,
    load_model,
    load_tensors,
    model_from_tensors,
    save_model,
    save_tensors,
)
from .errors import CheckpointError, UserError
from .metrics import EvalRow, PhaseRecord, RunResults, SplitEval, load_results, save_results, write_run_outputs
from .model import LanguageModel, ModelConfig
from .optim import MOMENTS, PEEROptimizer, build_optimizer
from .peer import PEERConfig
from .strategies import strategy_overrides

RUN_CHECKPOINT_FORMAT = "lifelong-peer/run-checkpoint/1"
PRECISIONS = ("auto", "fp32", "bf16")
Progress = Callable[[dict], None]


@dataclass
class TrainConfig:
    """How a run trains. Strategy presets set some of these; every field can be overridden."""

    strategy: str = "naive"
    """Preset this config started from: naive, lifelong, replay, ewc, smf, smf-shared, dense, joint."""
    steps: int = 150
    """Optimizer steps per phase (ignored when `tokens` is set)."""
    tokens: int | None = None
    """Training tokens per phase; sets the steps to tokens / (batch_size · context)."""
    batch_size: int = 16
    """Windows per step."""
    lr: float = 1e-3
    """Peak learning rate of dense (shared) weights."""
    expert_lr: float | None = None
    """Peak learning rate of expert tables and sub-keys (default: lr)."""
    weight_decay: float = 0.0
    """Decoupled weight decay of dense matrices."""
    expert_weight_decay: float = 0.0
    """Decoupled L2 on the trainable (unfrozen) expert rows a step touches: 'regularised experts'."""
    expert_moments: str = "fp32"
    """Storage of the expert tables' Adam moments: fp32 (exact AdamW), bf16, or rowwise (one second
    moment per expert row); bf16 and rowwise halve their memory (BENCHMARKS.md, "Compact moments")."""
    warmup: int = 10
    """Warm-up steps at the start of each phase."""
    min_lr_ratio: float = 0.1
    """Cosine decay ends at this fraction of the peak learning rate."""
    grad_clip: float = 1.0
    """Global gradient-norm clip (0: off)."""
    grow: str = "none"
    """Growth before each phase: none, K (sub-keys per half), or auto (decided by the index manager)."""
    grow_mode: str = "exact"
    """How growth adds experts: exact (a new generation with its own retrieval and v = 0: the function is
    unchanged, old routing untouched; each generation adds grow_topk experts per head), safe (new sub-keys
    join the shared retrieval, shortened to enter no sampled old retrieval: near-unchanged), budget (the
    earlier behaviour: shortened to enter at most 5% of old retrievals)."""
    grow_topk: int = 0
    """Experts per head each grown generation retrieves in grow_mode exact (0: the layer's topk)."""
    grow_gate: str = "own"
    """Router weights of grown generations in grow_mode exact: own (a softmax of their own) or nested (their
    share of a softmax over them and all earlier generations); fixed by a model's first such growth."""
    freeze: str = "none"
    """Freezing policy applied before each phase: none, all-old, usage:P, tfidf:T."""
    freeze_subkeys: bool = False
    """Also freeze the sub-keys of frozen experts (keeps their keys, so their scores, fixed)."""
    train_shared: bool = True
    """Train the shared dense weights (attention, FFNs, embeddings, query nets); False trains experts only
    and also keeps normalisation statistics (the query BatchNorms' running means) fixed."""
    train_subkeys: bool = True
    """Train the PEER sub-keys (False: all frozen, so every expert's key and score stays put; SMF)."""
    tfidf_background: str = "base"
    """Background of tfidf:T's idf: base (windows of the base model's data — the first slice's train split
    with base_data first, every slice's with mix — as SMF's background batches) or old (the old slices)."""
    l2sp: float = 0.0
    """Weight of L2-SP: ½λ‖θ − θ_prev‖² on shared weights, anchored at the previous phase's end."""
    ewc: float = 0.0
    """Weight of EWC on shared weights (diagonal Fisher, accumulated online across phases)."""
    ewc_batches: int = 8
    """Batches used to estimate the Fisher at the end of each phase."""
    distill: float = 0.0
    """Weight of distillation: KL to the previous phase's model on the current batch."""
    distill_temperature: float = 2.0
    """Softmax temperature of distillation."""
    replay: float = 0.0
    """Fraction of each batch drawn from earlier slices' train splits."""
    joint: bool = False
    """Draw every batch from all slices at once (the non-continual reference)."""
    base_steps: int = 0
    """Train a base model for this many steps before phase 0 (when no --base checkpoint is given)."""
    base_data: str = "first"
    """Data of the base phase: first (the first slice only, so later slices are new to the base and
    there is something to learn) or mix (all slices' train splits)."""
    base_lr: float = 3e-3
    """Peak learning rate of the base phase."""
    eval_tokens: int = 16384
    """Held-out tokens scored per slice and split (evenly spaced windows; 0: the whole split)."""
    usage_tokens: int = 8192
    """Validation tokens per slice used to record expert usage after its phase."""
    checkpoint_every: int = 0
    """Also checkpoint every N steps inside a phase (0: only at phase ends)."""
    seed: int = 0
    """Seed of every random choice: init, batches, growth."""
    device: str = "auto"
    """auto (CUDA when present), cpu, or cuda."""
    precision: str = "auto"
    """Training forward and loss: bf16 (autocast to bfloat16), fp32, or auto (bf16 on CUDA GPUs with
    native bf16, else fp32). Weights, optimizer state, checkpoints and evaluation stay fp32."""

    def __post_init__(self) -> None:
        _check_types(self)
        positive = ("steps", "batch_size", "ewc_batches")
        for name in positive:
            if getattr(self, name) <= 0:
                raise UserError(f"{name} must be positive, got {getattr(self, name)}")
        if self.tokens is not None and self.tokens <= 0:
            raise UserError(f"tokens must be positive, got {self.tokens}")
        for name in ("lr", "base_lr"):
            if not getattr(self, name) > 0:
                raise UserError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("weight_decay", "expert_weight_decay", "l2sp", "ewc", "distill", "warmup", "base_steps"):
            if getattr(self, name) < 0:
                raise UserError(f"{name} must be ≥ 0, got {getattr(self, name)}")
        if not 0 <= self.replay < 1:
            raise UserError(f"replay must lie in [0, 1), got {self.replay}")
        from .index import parse_policy

        parse_policy(self.freeze)  # a bad policy is refused before any work, not at the first phase
        from .index import GROW_MODES

        if self.grow_mode not in GROW_MODES:
            raise UserError(f"grow_mode must be one of {', '.join(GROW_MODES)}, got {self.grow_mode!r}")
        if self.tfidf_background not in ("base", "old"):
            raise UserError(f"tfidf_background must be base or old, got {self.tfidf_background!r}")
        if self.grow_gate not in ("own", "nested"):
            raise UserError(f"grow_gate must be own or nested, got {self.grow_gate!r}")
        if self.grow_topk < 0:
            raise UserError(f"grow_topk must be ≥ 0, got {self.grow_topk}")
        if self.base_data not in ("mix", "first"):
            raise UserError(f"base_data must be mix or first, got {self.base_data!r}")
        if self.expert_moments not in MOMENTS:
            raise UserError(f"expert_moments must be one of {', '.join(MOMENTS)}, got {self.expert_moments!r}")
        if self.precision not in PRECISIONS:
            raise UserError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        grow = str(self.grow)
        if grow not in ("none", "auto") and not (grow.isdigit() and int(grow) > 0):
            raise UserError(f"grow must be none, auto or a positive number of sub-keys, got {self.grow!r}")
        self.grow = grow


_TYPES = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,)}


def _check_types(config) -> None:
    """Every field of the type its annotation names (config files and JSON carry any type)."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.name == "grow" and type(value) is int:  # `grow = 8` in TOML means 8 sub-keys
            value = str(value)
            setattr(config, f.name, value)
        names = [t.strip() for t in str(f.type).split("|")]
        if value is None and "None" in names:
            continue
        allowed = tuple(t for name in names if name != "None" for t in _TYPES.get(name, (object,)))
        if (isinstance(value, bool) and bool not in allowed) or not isinstance(value, allowed):
            want = " or ".join(n for n in names if n != "None")
            raise UserError(f"{f.name} must be {want}, got {value!r}")


@dataclass
class AttachOptions:
    """Bring your own model (issue 11): start from a Hugging Face causal LM with PEER layers attached."""

    base_model: str
    """Hugging Face model name or local directory, loaded through transformers (nothing fetched when local)."""
    layers: list[int] | None = None
    """Decoder blocks (0-based, negative from the end) that get a PEER layer; None: the middle block (§3)."""
    mode: str = "add"
    """add: PEER beside the block's MLP (the base's own logits until trained); replace: PEER instead of it."""
    peer: PEERConfig = field(default_factory=PEERConfig)
    """PEER layer template; its dim is set to the base's hidden size."""
    trainable: list[str] = field(default_factory=list)
    """fnmatch patterns of base parameters left trainable (e.g. "*.ln_2.*"); every other base weight is frozen."""
    context: int | None = None
    """Training window in tokens; None: the base's max_position_embeddings, at most 1024 (set by create_run)."""

    def __post_init__(self) -> None:
        if isinstance(self.peer, dict):
            try:
                self.peer = PEERConfig(**self.peer)
            except (TypeError, ValueError) as e:
                raise UserError(f"invalid [attach.peer] settings: {e}") from None
        if not isinstance(self.base_model, str) or not self.base_model:
            raise UserError(f"attach: base_model must name a Hugging Face model or directory, got {self.base_model!r}")
        if self.mode not in ("add", "replace"):
            raise UserError(f"attach mode must be add or replace, got {self.mode!r}")
        if self.layers is not None and (
            not isinstance(self.layers, list) or not self.layers or not all(type(i) is int for i in self.layers)
        ):
            raise UserError(f"attach: layers must be a list of block indices, got {self.layers!r}")
        if not isinstance(self.trainable, list) or not all(isinstance(t, str) for t in self.trainable):
            raise UserError(f"attach: trainable must be a list of name patterns, got {self.trainable!r}")
        if self.context is not None and (type(self.context) is not int or self.context <= 0):
            raise UserError(f"attach: context must be a positive number of tokens, got {self.context!r}")

    @classmethod
    def from_dict(cls, data: dict) -> AttachOptions:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserError(f"unknown attach option(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        if "base_model" not in data:
            raise UserError("attach: base_model is required (lpeer run --base-model NAME_OR_PATH)")
        return cls(**data)


@dataclass
class RunConfig:
    """Everything a run needs to be rebuilt: saved as config.json in the run directory."""

    run: str
    stream: str
    slices: list[str]
    model: ModelConfig | None
    """Shape of the byte-level model; None when the run attaches PEER to a base model (``attach``)."""
    train: TrainConfig
    base: str | None = None
    """Base checkpoint the run started from, if any."""
    extra: dict = field(default_factory=dict)
    attach: AttachOptions | None = None
    """Bring your own model: the run starts from this Hugging Face base with PEER attached (issue 11)."""

    def __post_init__(self) -> None:
        if (self.model is None) == (self.attach is None):
            raise ValueError("a run config needs exactly one of model (byte-level) and attach (a base model)")
        if self.attach is not None and self.base is not None:
            raise UserError(
                "--base starts from a byte-level checkpoint and --base-model from a Hugging Face model; give one"
            )

    @property
    def context(self) -> int | None:
        """Tokens per training and evaluation window."""
        return self.attach.context if self.attach is not None else self.model.context

    def to_dict(self) -> dict:
        return {
            "run": self.run,
            "stream": self.stream,
            "slices": self.slices,
            "model": self.model.to_dict() if self.model is not None else None,
            "attach": dataclasses.asdict(self.attach) if self.attach is not None else None,
            "train": dataclasses.asdict(self.train),
            "base": self.base,
            "extra": self.extra,
        }

    @classmethod
    def from_dict(cls, data: dict) -> RunConfig:
        return cls(
            run=data["run"],
            stream=data["stream"],
            slices=list(data["slices"]),
            model=ModelConfig.from_dict(data["model"]) if data["model"] is not None else None,
            train=TrainConfig(**data["train"]),
            base=data.get("base"),
            extra=data.get("extra", {}),
            attach=AttachOptions.from_dict(data["attach"]) if data.get("attach") is not None else None,
        )


def resolve_config(strategy: str, overrides: dict | None = None, model: ModelConfig | None = None) -> tuple:
    """Strategy preset, then user overrides (a flat dict of TrainConfig fields; ``model`` a dict of
    ModelConfig fields) → (ModelConfig, TrainConfig). Unknown keys are a UserError."""
    preset = strategy_overrides(strategy)
    overrides = dict(overrides or {})
    model_over = {**preset.pop("model", {}), **overrides.pop("model", {})}
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise UserError(f"unknown training option(s): {', '.join(unknown)}; known: {', '.join(sorted(fields))}")
    train = TrainConfig(**{**preset, **overrides, "strategy": strategy})
    base_model = model or ModelConfig()
    try:
        model_cfg = ModelConfig.from_dict({**base_model.to_dict(), **model_over})
    except (TypeError, ValueError) as e:
        raise UserError(f"invalid model configuration: {e}") from None
    return model_cfg, train


# --- data -----------------------------------------------------------------------------------------


def sample_batch(pools: list[np.ndarray], replay_pools: list[np.ndarray], cfg: TrainConfig, context: int, gen):
    """A (batch_size, context + 1) window batch: a ``replay`` fraction from earlier slices, the rest
    from ``pools`` (the current slice, or all slices when joint); slice and offset drawn from ``gen``."""
    n_replay = round(cfg.replay * cfg.batch_size) if replay_pools else 0
    rows = []
    for r in range(cfg.batch_size):
        source = replay_pools if r < n_replay else pools
        tokens = source[int(torch.randint(len(source), (1,), generator=gen))]
        start = int(torch.randint(len(tokens) - context, (1,), generator=gen))
        rows.append(torch.from_numpy(np.asarray(tokens[start : start + context + 1], dtype=np.int64)))
    return torch.stack(rows)


def eval_windows(tokens: np.ndarray, context: int, max_tokens: int) -> torch.Tensor:
    """Evenly spaced, non-overlapping (n, context + 1) windows covering ≤ max_tokens predictions."""
    n_all = (len(tokens) - 1) // context
    n = n_all if max_tokens <= 0 else max(1, min(n_all, max_tokens // context))
    starts = np.linspace(0, (n_all - 1) * context, n).astype(np.int64) if n_all > 0 else np.zeros(0, np.int64)
    if n_all == 0:
        return torch.from_numpy(np.asarray(tokens, dtype=np.int64))[None, :]
    return torch.stack([torch.from_numpy(np.asarray(tokens[s : s + context + 1], dtype=np.int64)) for s in starts])


@torch.no_grad()
def evaluate(model: LanguageModel, windows: torch.Tensor, batch_size: int = 32) -> tuple[float, int]:
    """(summed nats, tokens predicted) of ``model`` on windows (n, T+1), in eval mode."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for chunk in windows.split(batch_size):
        chunk = chunk.to(device)
        logits, _ = model(chunk[:, :-1])
        nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), chunk[:, 1:].flatten(), reduction="sum")
        total += float(nll)
        count += chunk[:, 1:].numel()
    model.train(was_training)
    return total, count


# --- the run ---------------------------------------------------------------------------------------


class Run:
    """A run directory and the objects a phase needs. Built by ``create_run`` or ``Run.open``."""

    def __init__(self, directory: Path, config: RunConfig, stream):
        self.dir = directory
        self.config = config
        self.stream = stream
        self.device = _device(config.train.device)
        self.model: LanguageModel | AttachedLM | None = None
        self._base = None  # an attach run's plain base model, loaded once (``base_model``)
        self.fisher: dict[str, torch.Tensor] = {}
        from .index import UsageLedger

        self.ledger = UsageLedger()
        self.growth_shock: dict | None = None  # this phase's (``index.growth_shock``), for its PhaseRecord

    # files ------------------------------------------------------------------------------------
    @property
    def checkpoints(self) -> Path:
        return self.dir / "checkpoints"

    def state(self) -> dict:
        """state.json, validated: ``completed_phases``, ``checkpoint`` (the latest, relative to the run
        directory), its ``phase`` and ``step``, and ``files``: {relative path: {"size", "sha256"}} of
        every checkpoint the run has written and still keeps (issue 10). No file: a run not started."""
        import re

        from .errors import CheckpointError

        path = self.dir / "state.json"
        if not path.exists():
            return {"completed_phases": 0, "checkpoint": None, "phase": None, "step": None, "files": {}}
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
            raise CheckpointError(f"{path}: corrupted, not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise CheckpointError(f"{path}: corrupted (not a JSON object)")
        data.setdefault("files", {})  # state files written before issue 10 have no listing
        ints = {k: data.get(k) for k in ("completed_phases", "phase", "step")}
        checkpoint, files = data.get("checkpoint"), data["files"]
        problem = next((k for k, v in ints.items() if v is not None and (type(v) is not int or v < 0)), None)
        if problem or not isinstance(ints["completed_phases"], int):
            problem = f"{problem or 'completed_phases'} is not a count"
        elif checkpoint is not None and not (
            isinstance(checkpoint, str)
            and re.fullmatch(r"checkpoints/phase-\d{3,}(-step-\d{6,})?\.safetensors", checkpoint)
        ):
            problem = f"checkpoint {checkpoint!r} is not a checkpoint of this run"
        elif not isinstance(files, dict) or not all(
            re.fullmatch(r"(checkpoints/)?[A-Za-z0-9_-][A-Za-z0-9._-]*", k)
            and isinstance(r, dict)
            and type(r.get("size")) is int
            and isinstance(r.get("sha256"), str)
            for k, r in files.items()
        ):
            problem = "files is not a listing of {path: {size, sha256}}"
        if problem:
            raise CheckpointError(f"{path}: corrupted ({problem})")
        return data

    def slice_data(self, name: str):
        return self.stream.slice(name)

    def windows(self, name: str, split: str, max_tokens: int) -> torch.Tensor:
        return eval_windows(self.slice_data(name).tokens(split), self.config.context, max_tokens)

    # checkpoints --------------------------------------------------------------------------------
    def save_checkpoint(self, phase: int, step: int | None, opt: PEEROptimizer | None, completed: int) -> Path:
        """Everything needed to continue; then the state pointer moves to it (both writes atomic)."""
        name = f"phase-{phase:03d}.safetensors" if step is None else f"phase-{phase:03d}-step-{step:06d}.safetensors"
        if not distributed.is_main():  # rank 0 writes; the others wait until it has (issue 9)
            distributed.barrier()
            return self.checkpoints / name
        model_tensors, model_meta = _model_record(self.model)
        tensors = {f"model::{k}": v for k, v in model_tensors.items()}
        tensors.update({f"fisher::{k}": v for k, v in self.fisher.items()})
        ledger_tensors, ledger_meta = self.ledger.to_tensors()
        tensors.update({f"ledger::{k}": v for k, v in ledger_tensors.items()})
        if opt is not None:
            tensors.update({f"opt::{k}": v for k, v in opt.state_tensors(dict(self.model.named_parameters())).items()})
        meta = {
            "format": RUN_CHECKPOINT_FORMAT,
            **model_meta,
            "phase": phase,
            "step": step,
            "completed_phases": completed,
            "ledger": ledger_meta,
            "growth_shock": self.growth_shock if step is not None else None,  # a mid-phase resume keeps it
        }
        path = self.checkpoints / name
        save_tensors(path, tensors, meta)
        # integrity listing (issue 10): size + sha256 of every checkpoint kept, published with the pointer
        from .checkpoint import file_record

        stale = [old for old in self.checkpoints.glob("phase-*-step-*.safetensors") if old.name != name]
        files = {k: r for k, r in self.state()["files"].items() if self.dir / k not in stale}
        base = self.checkpoints / "base.safetensors"
        if "checkpoints/base.safetensors" not in files and base.exists():
            files["checkpoints/base.safetensors"] = file_record(base)
        files[f"checkpoints/{name}"] = file_record(path)
        atomic_write_json(
            self.dir / "state.json",
            {
                "completed_phases": completed,
                "checkpoint": f"checkpoints/{name}",
                "phase": phase,
                "step": step,
                "files": files,
            },
        )
        # mid-phase checkpoints are superseded by the next one
        for old in stale:
            old.unlink(missing_ok=True)
        distributed.barrier()
        return path

    def load_checkpoint(self, path: Path) -> dict:
        """Restore model, Fisher and ledger from ``path``; returns its tensors and meta for the rest.

        The file must match its size and sha256 in state.json (when listed there) and its own content
        checksum; every tensor is checked against the saved config. Any problem is a CheckpointError
        naming the file, raised before the run's objects change."""
        from .checkpoint import check_optimizer_state, check_state, verify_file
        from .errors import CheckpointError
        from .index import UsageLedger

        path = Path(path)
        try:
            rel = path.resolve().relative_to(self.dir.resolve()).as_posix()
        except ValueError:
            rel = None
        record = self.state()["files"].get(rel)
        if record is not None:
            verify_file(path, record)
        tensors, meta = load_tensors(path)
        if meta.get("format") != RUN_CHECKPOINT_FORMAT:
            raise CheckpointError(f"{path}: not a run checkpoint (format {meta.get('format')!r})")
        for key, kinds in (("phase", (int,)), ("step", (int, type(None))), ("completed_phases", (int,))):
            if type(meta.get(key)) not in kinds or (meta[key] or 0) < 0:
                raise CheckpointError(f"{path}: metadata {key!r} is missing or not a count")
        if not isinstance(meta.get("ledger"), dict):
            raise CheckpointError(f"{path}: metadata 'ledger' is missing or not an object")
        model = self.read_model(path, tensors, meta)
        params = dict(model.named_parameters())
        part = lambda prefix: {k.split("::", 1)[1]: v for k, v in tensors.items() if k.startswith(prefix)}  # noqa: E731
        fisher = part("fisher::")
        check_state(path, {k: params[k] for k in fisher if k in params}, fisher)
        check_optimizer_state(path, params, part("opt::"))
        ledger = UsageLedger.from_tensors(part("ledger::"), meta["ledger"])
        self.model = model.to(self.device)
        self.fisher = {k: v.to(self.device) for k, v in fisher.items()}
        self.ledger = ledger
        self.growth_shock = meta.get("growth_shock") if isinstance(meta.get("growth_shock"), dict) else None
        return {"tensors": tensors, "meta": meta}

    def load_latest(self) -> dict:
        """Model, Fisher and ledger of the last finished phase (or the starting model) — for
        inspecting or editing a run between phases. Refuses a run stopped mid-phase."""
        state = self.state()
        if state["checkpoint"] is None:
            base = self.checkpoints / "base.safetensors"
            if not base.exists():
                raise UserError(
                    f"run {self.config.run!r} has no model yet; start it with lpeer run --resume {self.config.run}"
                )
            self.model = self.read_model(base).to(self.device)
            return {"phase": None, "checkpoint": base}
        if state.get("step") is not None:
            raise UserError(
                f"run {self.config.run!r} stopped in the middle of phase {state['phase']}; "
                f"finish it first with lpeer run --resume {self.config.run}"
            )
        self.load_checkpoint(self.dir / state["checkpoint"])
        return {"phase": state["phase"], "checkpoint": self.dir / state["checkpoint"]}

    def save_edit(self, what: dict) -> Path:
        """Publish the model edited after ``load_latest`` (growth or freezing by hand) in place of that
        checkpoint, atomically, and log the edit in edits.jsonl. The next phase starts from it."""
        state = self.state()
        if state["checkpoint"] is None:
            path = self.checkpoints / "base.safetensors"
            _save_model(self.model, path)
        else:
            path = self.save_checkpoint(state["phase"], None, None, completed=state["completed_phases"])
        with open(self.dir / "edits.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps({"time": time.time(), "checkpoint": path.name, **what}) + "\n")
        return path

    def previous_model(self, phase: int) -> LanguageModel | AttachedLM:
        """The model at the start of ``phase`` before growth: the anchor of L2-SP/EWC and the distillation teacher."""
        name = f"phase-{phase - 1:03d}.safetensors" if phase > 0 else "base.safetensors"
        return self.read_model(self.checkpoints / name).to(self.device).eval()

    def read_model(self, path: Path, tensors: dict | None = None, meta: dict | None = None):
        """The model stored in ``path`` (on the CPU): a run checkpoint's ``model::`` part or a base file,
        byte-level (``MODEL_FORMAT``) or attached (``ATTACHED_FORMAT``: its delta put on a copy of
        ``base_model``, refused when the base's fingerprint differs). Every reader of run files uses it.
        ``tensors``, ``meta``: the file's content when already read."""
        if tensors is None:
            tensors, meta = load_tensors(path)
        if meta.get("format") == RUN_CHECKPOINT_FORMAT:
            tensors = {k.split("::", 1)[1]: v for k, v in tensors.items() if k.startswith("model::")}
            kind = ATTACHED_FORMAT if "attach_config" in meta else MODEL_FORMAT
            meta = {k: v for k, v in meta.items() if k in ("model_config", "attach_config")} | {"format": kind}
        attached = meta.get("format") == ATTACHED_FORMAT
        if attached != (self.config.attach is not None):
            want = "an attached model" if self.config.attach is not None else "a byte-level model"
            raise CheckpointError(f"{path}: does not hold {want}, which is what run {self.config.run!r} trains")
        if attached:
            return attached_from_tensors(path, tensors, meta.get("attach_config"), self.base_model())
        return model_from_tensors(path, tensors, meta)

    def base_model(self):
        """A fresh copy of an attach run's plain base model (``load_base``, read once per run): what
        ``attach`` or ``attached_from_tensors`` modifies in place."""
        if self._base is None:
            from .attach import load_base

            self._base = load_base(self.config.attach.base_model)
        return copy.deepcopy(self._base)


def _model_record(model) -> tuple[dict, dict]:
    """(tensors, metadata entry) of what a checkpoint keeps of ``model``: all of a byte-level model; of an
    attached one only the delta (PEER layers + trainable base weights) and its ``AttachConfig``."""
    if isinstance(model, AttachedLM):
        return model.delta_state_dict(), {"attach_config": model.config.to_dict()}
    return model.state_dict(), {"model_config": model.config.to_dict()}


def _save_model(model, path: Path) -> None:
    """A run's base.safetensors: ``save_model`` or, for an attached model, ``save_attached`` (the delta)."""
    (save_attached if isinstance(model, AttachedLM) else save_model)(model, path)


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The context a training forward and loss run in (``TrainConfig.precision``): bf16 autocast, or none.

    Under autocast matrix products run in bfloat16 while the Parameters, their gradients and the
    optimizer stay float32 (no loss scaling: bf16 has float32's exponent range). auto means bf16
    on CUDA GPUs with native bf16 (compute capability 8.0, Ampere, or newer) and fp32 elsewhere;
    CPU autocast to bf16 works when asked for (slower here: it exists for tests).
    """
    if precision == "auto":
        native = device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)
        precision = "bf16" if native else "fp32"
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device cuda was asked for, but CUDA is not available on this machine")
    return torch.device(name)


def create_run(workspace, cfg: RunConfig, stream=None) -> Run:
    """Make the run directory, write config.json, register the run in the workspace.

    ``stream``: the data (default: ``cfg.stream`` opened from the workspace) — anything with
    ``tokenizer`` and ``slice(name)`` returning objects with ``tokens(split)`` / ``num_bytes(split)``.
    """
    stream_name = cfg.stream
    if stream is None:
        from .streams.store import open_stream

        stream = open_stream(workspace, stream_name)
    directory = workspace.run_dir(cfg.run)
    if directory.exists() and any(directory.iterdir()):
        raise UserError(f"run {cfg.run!r} already exists in {workspace.root}; resume it with --resume {cfg.run}")
    if cfg.attach is not None:
        _check_base_model(cfg.attach, stream_name, stream.tokenizer)
    elif cfg.model.vocab_size < stream.tokenizer.vocab_size:
        raise UserError(
            f"model vocab_size {cfg.model.vocab_size} is smaller than the stream's tokenizer ({stream.tokenizer.vocab_size})"
        )
    for name in cfg.slices:
        data = stream.slice(name)
        for split in ("train", "validation"):
            n = len(data.tokens(split))
            if n < 2 or (split == "train" and n <= cfg.context):
                raise UserError(
                    f"slice {name!r} of stream {stream_name!r} has only {n} {split} tokens; "
                    f"training needs more than the context ({cfg.context}) — use a coarser --slice"
                )
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_json(directory / "config.json", cfg.to_dict())
    workspace.register_run(cfg.run, {"stream": stream_name, "strategy": cfg.train.strategy, "dir": str(directory)})
    return Run(directory, cfg, stream)


def _check_base_model(opts: AttachOptions, stream_name: str, tokenizer) -> None:
    """An attach run's base fits its stream: the stream was tokenized by the base's own tokenizer (the
    same definition, however named), whose ids the base's vocabulary covers (Hugging Face models often
    pad it); sets ``opts.context`` when not given. Reads the base's config and tokenizer, not its weights."""
    from .attach import HFTokenizer, load_base_config

    base = opts.base_model
    hf_config = load_base_config(base)
    vocab = int(hf_config.vocab_size)
    max_pos = getattr(hf_config, "max_position_embeddings", None)
    again = f"ingest it again with --tokenizer hf:{base}"
    if not tokenizer.name.startswith("hf:"):
        raise UserError(
            f"stream {stream_name!r} was ingested with tokenizer {tokenizer.name!r}, but base model {base!r} "
            f"reads its own tokens; {again}"
        )
    if tokenizer.name != f"hf:{base}":
        try:
            own = HFTokenizer(base)
        except UserError:  # a base directory without tokenizer files: the stream's is taken as its own
            own = None
        if own is not None and own.fingerprint() != tokenizer.fingerprint():
            raise UserError(
                f"stream {stream_name!r} was ingested with tokenizer {tokenizer.name!r}, which is not the "
                f"tokenizer of base model {base!r}; {again}"
            )
    if tokenizer.vocab_size > vocab:
        raise UserError(
            f"stream {stream_name!r}: tokenizer {tokenizer.name!r} has {tokenizer.vocab_size:,} tokens, more than "
            f"the {vocab:,} rows of base model {base!r}'s vocabulary"
        )
    if opts.context is None:
        opts.context = min(int(max_pos), 1024) if max_pos else 1024
    if max_pos and opts.context > max_pos:
        raise UserError(f"context {opts.context} exceeds base model {base!r}'s max_position_embeddings ({max_pos})")


def open_run(workspace, run: str, stream=None) -> Run:
    """An existing run, for resuming or inspecting."""
    directory = workspace.resolve_run(run)
    try:
        cfg = RunConfig.from_dict(json.loads((directory / "config.json").read_text()))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{directory / 'config.json'}: cannot read the run's config ({e})") from None
    if stream is None:
        from .streams.store import open_stream

        stream = open_stream(workspace, cfg.stream)
    return Run(directory, cfg, stream)


def load_config_file(path: str | Path) -> dict:
    """A TOML run config: ``[train]`` (TrainConfig fields), ``[model]`` and ``[model.peer]``, or for a
    run on a base model ``[attach]`` (AttachOptions fields) and ``[attach.peer]``.

    Returns ``{"train": {...}, "model": {...}, "attach": {...}}``; unknown tables are a UserError naming the file.
    """
    import tomllib

    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: config file not found") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid TOML ({e})") from None
    unknown = sorted(set(data) - {"train", "model", "attach"})
    if unknown:
        raise UserError(
            f"{path}: unknown table(s) {', '.join(unknown)}; expected [train], [model], [model.peer], [attach]"
        )
    return {name: dict(data.get(name, {})) for name in ("train", "model", "attach")}


def new_run(
    workspace,
    stream_name: str,
    strategy: str = "naive",
    overrides: dict | None = None,
    model_overrides: dict | None = None,
    base: str | None = None,
    run_id: str | None = None,
    slices: list[str] | None = None,
    config_file: str | Path | None = None,
    attach: dict | None = None,
) -> Run:
    """Resolve a run's configuration (preset < config file < overrides) and create its directory.

    With a ``base`` checkpoint the model's shape comes from the checkpoint. With ``attach``
    (AttachOptions fields over the config file's ``[attach]`` table; either one names ``base_model``)
    the run starts from that Hugging Face model with PEER attached instead of a byte-level model.
    """
    from .checkpoint import read_meta
    from .streams.store import open_stream

    stream = open_stream(workspace, stream_name)
    slices = slices or [s.name for s in stream.slices]
    for name in slices:
        stream.slice(name)  # UserError listing the slices when unknown
    file_cfg = load_config_file(config_file) if config_file else {"train": {}, "model": {}, "attach": {}}
    train_over = {**file_cfg["train"], **(overrides or {})}
    model_over = {**file_cfg["model"], **(model_overrides or {})}
    run_id = run_id or _new_run_id(workspace, f"{stream_name}-{strategy}")
    if attach or file_cfg["attach"]:
        if base:
            raise UserError(
                "--base starts from a byte-level checkpoint and --base-model from a Hugging Face model; give one"
            )
        if model_over or strategy_overrides(strategy).get("model"):
            what = f"strategy {strategy!r}" if not model_over else "[model] options"
            raise UserError(f"{what} shape the byte-level model and do not apply with --base-model; use [attach]")
        options = AttachOptions.from_dict({**file_cfg["attach"], **(attach or {})})
        _, train_cfg = resolve_config(strategy, train_over)
        cfg = RunConfig(run=run_id, stream=stream_name, slices=slices, model=None, train=train_cfg, attach=options)
        return create_run(workspace, cfg, stream=stream)
    base_model = ModelConfig(vocab_size=stream.tokenizer.vocab_size)
    if base:
        meta = read_meta(base)
        try:
            base_model = ModelConfig.from_dict(meta["model_config"])
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"{base}: not a model checkpoint ({e})") from None
        if model_over:
            raise UserError("model options cannot be changed when starting from --base (its shape is fixed)")
    peer_over = model_over.pop("peer", {})
    if not isinstance(peer_over, dict):
        raise UserError(f"[model.peer] must be a table of PEER settings, got {peer_over!r}")
    model_over = {"peer": {**base_model.peer.to_dict(), **peer_over}, **model_over}
    model_cfg, train_cfg = resolve_config(strategy, {**train_over, "model": model_over}, base_model)
    cfg = RunConfig(run=run_id, stream=stream_name, slices=slices, model=model_cfg, train=train_cfg, base=base)
    return create_run(workspace, cfg, stream=stream)


def _new_run_id(workspace, prefix: str) -> str:
    n = 1
    while workspace.run_dir(f"{prefix}-{n}").exists():
        n += 1
    return f"{prefix}-{n}"


def add_slice(run: Run, slice_name: str) -> int:
    """Append a newly ingested slice to a run (data that arrives one slice at a time); returns its phase.

    Earlier models are evaluated on it from their phase-end checkpoints, so the matrix stays complete.
    """
    if slice_name in run.config.slices:
        phase = run.config.slices.index(slice_name)
        if phase < run.state()["completed_phases"]:
            raise UserError(f"run {run.config.run!r} has already trained on slice {slice_name!r}")
        return phase
    run.stream.slice(slice_name)
    run.config.slices.append(slice_name)
    if (run.dir / "results.json").exists():
        results = load_results(run.dir)
        results.slices.append(slice_name)
        for split, evals in results.eval.items():
            models = [run.checkpoints / "base.safetensors"]
            models += [run.checkpoints / f"phase-{i:03d}.safetensors" for i in range(len(evals.after))]
            for row, path in zip([evals.before, *evals.after], models, strict=True):
                model = run.read_model(path)
                _append_eval(row, run, model.to(run.device), slice_name, split)
        save_results(run.dir, results)
    atomic_write_json(run.dir / "config.json", run.config.to_dict())
    return len(run.config.slices) - 1


def _append_eval(row: EvalRow, run: Run, model: LanguageModel, slice_name: str, split: str) -> None:
    data = run.slice_data(slice_name)
    total, count = evaluate(model, run.windows(slice_name, split, run.config.train.eval_tokens))
    num_bytes = max(1, round(count * data.num_bytes(split) / max(1, len(data.tokens(split)))))
    new = EvalRow.from_totals([total], [count], [num_bytes])
    row.nll.append(new.nll[0])
    row.bpb.append(new.bpb[0])
    row.tokens.append(new.tokens[0])
    row.bytes.append(new.bytes[0])


def recompute_results(run: Run) -> RunResults:
    """Rebuild results.json from the run's base and phase-end checkpoints (when it was lost or deleted)."""
    state = run.state()
    base = run.checkpoints / "base.safetensors"
    if not base.exists():
        raise UserError(f"run {run.config.run!r} has no checkpoints to evaluate yet")
    run.model = run.read_model(base).to(run.device)
    # wall times are unknown (0) in a recomputed file
    results = _new_results(run, evaluate_all(run, lambda event: None), recomputed_from_checkpoints=True)
    for phase in range(state["completed_phases"]):
        path = run.checkpoints / f"phase-{phase:03d}.safetensors"
        run.model = run.read_model(path).to(run.device)
        tokens = _phase_steps(run.config.train, run.config.context) * run.config.train.batch_size
        record = _phase_record(run, run.config.slices[phase], tokens * run.config.context, 0.0)
        results.add_phase(record, evaluate_all(run, lambda event: None))
    if distributed.is_main():
        save_results(run.dir, results)
    return results


# --- the phase loop --------------------------------------------------------------------------------


def run_phases(run: Run, phases: list[int] | None = None, progress: Progress | None = None) -> RunResults:
    """Train ``run`` through its slices (or just ``phases``), resuming from where its state says.

    For each slice, in time order: grow → train → evaluate → record usage → (decide freezing for
    the next phase) → checkpoint.
    """
    cfg, tc = run.config, run.config.train
    emit = progress or (lambda event: None)
    state = run.state()
    resume = _restore(run, state, emit)
    results = _results(run, emit)
    for phase, slice_name in enumerate(cfg.slices):
        if phase < state["completed_phases"] or (phases is not None and phase not in phases):
            continue
        started = time.time()
        opt_state, start_step = (resume["opt"], resume["step"]) if resume and resume["phase"] == phase else (None, 0)
        if start_step == 0:
            grow_and_freeze(run, phase, emit)
            distributed.sync_decisions(run.model)  # every rank takes rank 0's growth and freezing
        tokens = train_phase(run, phase, slice_name, start_step, opt_state, emit)
        rows = evaluate_all(run, emit)
        record_usage(run, slice_name)
        if tc.ewc > 0:
            update_fisher(run, phase)
        results.add_phase(_phase_record(run, slice_name, tokens, time.time() - started), rows)
        run.growth_shock = None
        run.save_checkpoint(phase, None, None, completed=phase + 1)
        if distributed.is_main():
            save_results(run.dir, results)
            write_run_outputs(run.dir, results)
        distributed.barrier()
        emit({"event": "phase_end", "phase": phase, "slice": slice_name, "rows": rows})
        resume = None
    return results


def grow_and_freeze(run: Run, phase: int, emit: Progress) -> None:
    """Between phases: grow the pool (not before the very first training of a fresh model), then
    make the frozen set what the policy says for this phase (recomputed from scratch)."""
    from .index import UsageLedger, collect_usage, document_frequency, freeze_model, grow_model, growth_shock

    tc, model = run.config.train, run.model
    layers = model.peer_layers()
    if not layers:
        return
    new_slice, old_slices = run.config.slices[phase], run.config.slices[:phase]
    existed = [p.num_experts for p in layers]
    gen = torch.Generator().manual_seed(_seed(tc.seed, phase, -1))
    new_windows = eval_windows(run.slice_data(new_slice).tokens("train"), run.config.context, tc.usage_tokens)
    new_windows = new_windows[:, :-1]  # model inputs (the windows carry one extra target token)
    fresh = phase == 0 and run.config.base is None and tc.base_steps == 0
    if tc.grow != "none" and not fresh:
        # sampled layer inputs of the new slice (where to place sub-keys) and of old slices (what must not move)
        new_inputs = collect_usage(model, new_windows, None, sample_inputs=4096, generator=gen)["inputs"]
        old_inputs = None
        if old_slices:
            old_windows = torch.cat(
                [run.windows(s, "validation", tc.usage_tokens // len(old_slices)) for s in old_slices]
            )
            old_windows = old_windows[:, :-1]
            old_inputs = collect_usage(model, old_windows, None, sample_inputs=4096, generator=gen)["inputs"]
        k = "auto" if tc.grow == "auto" else int(tc.grow)
        seed = _seed(tc.seed, phase, -1)
        # the shock of this growth on every old slice's validation loss (issue 16), on the evaluation's windows
        old_eval = {s: run.windows(s, "validation", tc.eval_tokens) for s in old_slices}
        per_token = {
            s: run.slice_data(s).num_bytes("validation") / len(run.slice_data(s).tokens("validation"))
            for s in old_slices
        }
        reports, run.growth_shock = growth_shock(
            model,
            lambda: grow_model(
                model,
                k,
                new_inputs,
                old_inputs,
                seed=seed,
                mode=tc.grow_mode,
                generation_topk=tc.grow_topk or None,
                generation_gate=tc.grow_gate,
            ),
            old_eval,
            per_token,
        )
        emit({"event": "grow", "phase": phase, "layers": reports, "growth_shock": run.growth_shock})
    if tc.freeze != "none":
        ledger = UsageLedger()
        ledger.merge(run.ledger)
        background = None
        if tc.freeze.startswith("tfidf"):  # SMF ranks by the new slice's usage, measured before training on it
            collect_usage(model, new_windows, ledger, new_slice)
            if tc.tfidf_background == "base":
                background = document_frequency(model, base_windows(run))
        reports = freeze_model(
            model, tc.freeze, ledger, new_slice, old_slices, existed, tc.freeze_subkeys, background=background
        )
        emit({"event": "freeze", "phase": phase, "layers": reports})


def base_slices(run: Run) -> list[str]:
    """The slices the base model was trained on, as ``base_data`` says: the first (first) or all (mix)."""
    return run.config.slices[:1] if run.config.train.base_data == "first" else list(run.config.slices)


def base_windows(run: Run) -> torch.Tensor:
    """SMF's background documents (Lin et al. 2025: fixed batches of pretraining data): 4 × usage_tokens
    of the base's training data (``base_slices``, train split), evenly spaced (n, context) windows."""
    names = base_slices(run)
    tokens = 4 * run.config.train.usage_tokens // len(names)
    return torch.cat([run.windows(name, "train", tokens)[:, :-1] for name in names])


def train_phase(run: Run, phase: int, slice_name: str, start_step: int, opt_state, emit: Progress) -> int:
    """Train on one slice for the phase budget; returns the training tokens consumed."""
    cfg, tc, model = run.config, run.config.train, run.model
    context = cfg.context
    steps = _phase_steps(tc, context)
    for p in regularize.shared_parameters(model).values():
        p.requires_grad_(tc.train_shared)
    for layer in model.peer_layers():
        layer.subkeys.requires_grad_(tc.train_subkeys)
    opt = build_optimizer(
        model,
        lr=tc.lr,
        expert_lr=tc.expert_lr,
        weight_decay=tc.weight_decay,
        expert_weight_decay=tc.expert_weight_decay,
        moments=tc.expert_moments,
    )
    if opt_state is not None:
        opt.load_state_tensors(dict(model.named_parameters()), opt_state)
    previous = run.previous_model(phase) if (tc.l2sp or tc.ewc or tc.distill) else None
    anchor = regularize.snapshot(previous) if previous is not None else {}
    pools, replay_pools = _pools(run, phase)
    emit({"event": "phase_start", "phase": phase, "slice": slice_name, "steps": steps, "start": start_step})
    model.train()
    if not tc.train_shared:  # frozen shared weights: their normalisation statistics stay put too
        regularize.freeze_norm_statistics(model)
    # the module to call: DDP for the dense weights (+ BatchNorm over the global batch) when distributed
    replica = distributed.data_parallel(model)
    with _interrupt_at_step_boundary() as interrupted:
        for step in range(start_step, steps):
            gen = torch.Generator().manual_seed(_seed(tc.seed, phase, step))
            batch = sample_batch(pools, replay_pools, tc, context, gen)  # the global batch, the same on every rank
            torch.manual_seed(_seed(tc.seed, phase, step))  # dropout of a Hugging Face base: exact on resume too
            local = distributed.shard(batch).to(run.device)  # this rank's rows of it (issue 9)
            lr_scale = _lr_scale(step, steps, tc)
            for group in opt.param_groups:
                group["lr"] = group.setdefault("peak_lr", group["lr"]) * lr_scale
            t0 = time.perf_counter()
            with autocast(tc.precision, run.device):
                logits, loss = replica(local[:, :-1], local[:, 1:])
                total = loss
                if tc.l2sp:
                    total = total + tc.l2sp * regularize.l2sp(model, anchor)
                if tc.ewc and run.fisher:
                    total = total + tc.ewc * regularize.ewc(model, anchor, run.fisher)
                if tc.distill:
                    with torch.no_grad():
                        teacher_logits, _ = previous(local[:, :-1])
                    total = total + tc.distill * regularize.distillation(logits, teacher_logits, tc.distill_temperature)
            opt.zero_grad(set_to_none=True)
            total.backward()  # through DDP: dense gradients arrive averaged over ranks
            distributed.average_expert_gradients(model)  # expert rows, row-sparse: now the global-batch gradient
            if tc.grad_clip:  # clips the global-batch gradient (after both exchanges), the same on every rank
                opt.clip_grad_norm_(tc.grad_clip)
            opt.step()
            del logits, total
            elapsed = time.perf_counter() - t0
            _log_step(run, phase, step, distributed.mean(loss.item()), opt, batch, elapsed, emit)
            # Ctrl-C: save exactly after this step, then stop; decided together so every rank stops at once
            if distributed.mean(float(interrupted())) > 0 and step + 1 < steps:
                run.save_checkpoint(phase, step + 1, opt, completed=phase)
                raise UserError(
                    f"interrupted at phase {phase}, step {step + 1}; progress saved — continue with --resume"
                )
            if tc.checkpoint_every and (step + 1) % tc.checkpoint_every == 0 and step + 1 < steps:
                run.save_checkpoint(phase, step + 1, opt, completed=phase)
    return (steps - start_step) * tc.batch_size * context


@contextlib.contextmanager
def _interrupt_at_step_boundary():
    """Defer Ctrl-C (SIGINT) to the end of the current step, so the checkpoint written on it is exact —
    never a half-applied optimizer step. Yields a function telling whether Ctrl-C was pressed."""
    pressed = []
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    previous = signal.signal(signal.SIGINT, lambda signum, frame: pressed.append(signum))
    try:
        yield lambda: bool(pressed)
    finally:
        signal.signal(signal.SIGINT, previous)


def evaluate_all(run: Run, emit: Progress) -> dict[str, EvalRow]:
    """Mean NLL and bits per byte of the current model on every slice's validation and test split."""
    rows = {}
    for split in ("validation", "test"):
        sums, tokens, num_bytes = [], [], []
        for name in run.config.slices:
            data = run.slice_data(name)
            all_tokens = data.tokens(split)
            if len(all_tokens) < 2:  # a tiny slice with no held-out text: reported as missing
                sums.append(0.0)
                tokens.append(0)
                num_bytes.append(0)
                continue
            total, count = evaluate(run.model, run.windows(name, split, run.config.train.eval_tokens))
            sums.append(total)
            tokens.append(count)
            # bytes behind the scored tokens, at the split's bytes-per-token ratio
            num_bytes.append(max(1, round(count * data.num_bytes(split) / len(all_tokens))))
        rows[split] = EvalRow.from_totals(sums, tokens, num_bytes)
    emit({"event": "evaluated", "rows": rows})
    return rows


def record_usage(run: Run, slice_name: str) -> None:
    """Expert usage of the slice's validation split after its phase: what the index manager consumes."""
    if not run.model.peer_layers():
        return
    from .index import collect_usage

    windows = run.windows(slice_name, "validation", run.config.train.usage_tokens)
    collect_usage(run.model, windows[:, :-1], run.ledger, slice_name)


def update_fisher(run: Run, phase: int) -> None:
    """Online EWC: F ← F + F_phase, on batches of the slice just trained (Schwarz et al. 2018 without decay)."""
    tc = run.config.train
    pools, _ = _pools(run, phase)
    gen = torch.Generator().manual_seed(_seed(tc.seed, phase, -2))
    batches = [sample_batch(pools, [], tc, run.config.context, gen).to(run.device) for _ in range(tc.ewc_batches)]
    new = regularize.fisher_diagonal(run.model, batches)
    for name, f in new.items():
        run.fisher[name] = run.fisher.get(name, torch.zeros_like(f)) + f


# --- helpers -----------------------------------------------------------------------------------------


def _seed(seed: int, phase: int, step: int) -> int:
    return (seed * 1_000_003 + (phase + 7) * 10_007 + step + 3) % (2**63 - 1)


def _phase_steps(tc: TrainConfig, context: int) -> int:
    return max(1, math.ceil(tc.tokens / (tc.batch_size * context))) if tc.tokens else tc.steps


def _lr_scale(step: int, steps: int, tc: TrainConfig) -> float:
    if step < tc.warmup:
        return (step + 1) / (tc.warmup + 1)
    progress = (step - tc.warmup) / max(1, steps - tc.warmup)
    return tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _pools(run: Run, phase: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    names = run.config.slices
    if run.config.train.joint:
        return [run.slice_data(n).tokens("train") for n in names], []
    current = [run.slice_data(names[phase]).tokens("train")]
    replay = [run.slice_data(n).tokens("train") for n in names[:phase]] if run.config.train.replay else []
    return current, replay


def _log_step(run: Run, phase: int, step: int, loss: float, opt, batch, elapsed: float, emit: Progress) -> None:
    layers = run.model.peer_layers()
    experts = sum(p.num_experts for p in layers)
    frozen = sum(int(p.frozen.sum()) for p in layers) / experts if experts else 0.0
    record = {
        "phase": phase,
        "step": step,
        "loss": loss,
        "lr": opt.param_groups[0]["lr"],
        "tok_s": batch[:, 1:].numel() / max(elapsed, 1e-9),
        "experts": experts,
        "frozen_fraction": frozen,
    }
    if distributed.is_main():
        with open(run.dir / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
    emit({"event": "step", **record})


def _phase_record(run: Run, slice_name: str, tokens: int, wall: float) -> PhaseRecord:
    layers = run.model.peer_layers()
    experts = sum(p.num_experts for p in layers)
    frozen = sum(int(p.frozen.sum()) for p in layers)
    return PhaseRecord(
        slice=slice_name,
        train_tokens=tokens,
        wall_time_s=wall,
        num_experts=experts,
        frozen_fraction=frozen / experts if experts else 0.0,
        params=run.model.num_params(),
        active_params=run.model.active_params_per_token(),
        growth_shock_bpb=run.growth_shock["max_bpb"] if run.growth_shock else None,
        extra={"growth_shock_per_slice_bpb": run.growth_shock["per_slice_bpb"]} if run.growth_shock else {},
    )


def _new_results(run: Run, before: dict[str, EvalRow], **extra) -> RunResults:
    """An empty results.json for ``run`` holding the starting model's evaluation (the 'before' row)."""
    return RunResults(
        run=run.config.run,
        strategy=run.config.train.strategy,
        slices=list(run.config.slices),
        phases=[],
        eval={split: SplitEval(before=row, after=[]) for split, row in before.items()},
        extra=extra,
    )


def _results(run: Run, emit: Progress) -> RunResults:
    """results.json so far, or a new one holding the base model's evaluation ('before' row)."""
    if (run.dir / "results.json").exists():
        return load_results(run.dir)
    results = _new_results(run, evaluate_all(run, emit))
    if distributed.is_main():
        save_results(run.dir, results)
    return results


def _restore(run: Run, state: dict, emit: Progress) -> dict | None:
    """Load the latest intact checkpoint (or build the starting model); returns mid-phase resume info.

    Issue 10: a checkpoint that fails its recorded size/sha256 or its own checks is named in an
    ``IntegrityWarning`` and the next older one listed in state.json is tried (none left: start over,
    which is deterministic). A lost or damaged results.json is recomputed from the phase checkpoints.
    ``state`` is updated in place to the checkpoint used; results.json and metrics.jsonl are cut back
    to it, so a resumed run never mixes work from before and after the point it continues from.
    """
    import re
    import warnings

    from .checkpoint import IntegrityWarning
    from .errors import CheckpointError

    # left by a write cut short; only rank 0 writes (issue 9), so no other rank's write is in flight
    for tmp in [*run.dir.glob(".*.tmp"), *run.checkpoints.glob(".*.tmp")] if distributed.is_main() else []:
        tmp.unlink(missing_ok=True)
    results = None
    if state["checkpoint"] is not None:
        try:
            results = load_results(run.dir)
        except UserError as e:  # lost or damaged: rebuild it, its rows are deterministic evaluations
            warnings.warn(f"{e}; recomputing it from the phase checkpoints", IntegrityWarning, stacklevel=2)
            results = recompute_results(run)

    def order(rel: str) -> tuple[int, float]:
        m = re.fullmatch(r"checkpoints/phase-(\d+)(?:-step-(\d+))?\.safetensors", rel)
        return (int(m[1]), int(m[2]) if m[2] else math.inf) if m else (-1, -1)

    newest = order(state["checkpoint"]) if state["checkpoint"] else (-1, -1)
    older = sorted((k for k in state["files"] if (-1, -1) < order(k) < newest), key=order, reverse=True)
    loaded = None
    for rel in [state["checkpoint"], *older] if state["checkpoint"] else []:
        try:
            candidate = run.load_checkpoint(run.dir / rel)
        except CheckpointError as e:
            warnings.warn(f"{e}; falling back to the previous checkpoint", IntegrityWarning, stacklevel=2)
            continue
        if results is not None and candidate["meta"]["completed_phases"] > len(results.phases):
            continue  # stopped between this phase's checkpoint and its results: redo that phase
        loaded = candidate
        break
    if loaded is None:
        if state["checkpoint"] is not None:
            warnings.warn(f"run {run.config.run!r}: no intact checkpoint left; starting over", IntegrityWarning, 2)
            if distributed.is_main():
                (run.dir / "state.json").unlink()  # its listing describes files about to be rewritten
        state.update(completed_phases=0, checkpoint=None, phase=None, step=None, files={})
        _start_model(run, emit)
        meta = {"phase": 0, "step": 0, "completed_phases": 0}
    else:
        meta, tensors = loaded["meta"], loaded["tensors"]
        state.update(completed_phases=meta["completed_phases"], checkpoint=rel, phase=meta["phase"], step=meta["step"])
    if results is not None and len(results.phases) > meta["completed_phases"]:
        n = meta["completed_phases"]
        results.phases = results.phases[:n]
        for evals in results.eval.values():
            evals.after = evals.after[:n]
        if distributed.is_main():
            save_results(run.dir, results)
    _truncate_metrics(run, meta["phase"], meta["step"], meta["completed_phases"])
    if loaded is None or meta["step"] is None:
        return None
    opt = {k.split("::", 1)[1]: v for k, v in tensors.items() if k.startswith("opt::")}
    emit({"event": "resume", "phase": meta["phase"], "step": meta["step"]})
    return {"phase": meta["phase"], "step": meta["step"], "opt": opt}


def _start_model(run: Run, emit: Progress) -> None:
    """The model before phase 0: a base checkpoint, the Hugging Face base with PEER attached (issue 11),
    a freshly trained base, or a fresh init."""
    cfg, tc = run.config, run.config.train
    torch.manual_seed(tc.seed)
    if cfg.attach is not None:
        from .attach import attach

        o = cfg.attach
        run.model = attach(
            run.base_model(), o.layers, o.mode, o.peer, o.trainable, base=o.base_model, context=o.context
        ).to(run.device)
        if tc.base_steps:
            train_base(run, emit)
    elif cfg.base:
        run.model = load_model(cfg.base, device=run.device)
        if run.model.config.vocab_size != cfg.model.vocab_size:
            raise UserError(f"base {cfg.base}: vocab_size {run.model.config.vocab_size} does not match the stream's")
    else:
        run.model = LanguageModel(copy.deepcopy(cfg.model)).to(run.device)
        if tc.base_steps:
            train_base(run, emit)
        else:  # issue 16: from scratch every slice improves every phase and "forgetting" means nothing
            import warnings

            warnings.warn(
                f"run {cfg.run!r} starts from a random init (no --base, no --base-steps): forgetting measured "
                "from scratch is meaningless; give --base CHECKPOINT or --base-steps N",
                stacklevel=2,
            )
    run.checkpoints.mkdir(parents=True, exist_ok=True)
    if distributed.is_main():
        _save_model(run.model, run.checkpoints / "base.safetensors")
    distributed.barrier()


def train_base(run: Run, emit: Progress) -> None:
    """A longer first phase on a mix of all slices (or the first), so phases measure drift, not learning English."""
    cfg = run.config
    names = cfg.slices if cfg.train.base_data == "mix" else cfg.slices[:1]
    pools = [run.slice_data(n).tokens("train") for n in names]
    tc = dataclasses.replace(cfg.train, lr=cfg.train.base_lr, replay=0.0, steps=cfg.train.base_steps, tokens=None)
    opt = build_optimizer(run.model, lr=tc.lr, weight_decay=tc.weight_decay, moments=tc.expert_moments)
    emit({"event": "phase_start", "phase": -1, "slice": "base", "steps": tc.steps, "start": 0})
    run.model.train()
    replica = distributed.data_parallel(run.model)
    for step in range(tc.steps):
        gen = torch.Generator().manual_seed(_seed(tc.seed, -1, step))
        torch.manual_seed(_seed(tc.seed, -1, step))
        batch = distributed.shard(sample_batch(pools, [], tc, cfg.context, gen)).to(run.device)
        for group in opt.param_groups:
            group["lr"] = group.setdefault("peak_lr", group["lr"]) * _lr_scale(step, tc.steps, tc)
        with autocast(tc.precision, run.device):
            _, loss = replica(batch[:, :-1], batch[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        distributed.average_expert_gradients(run.model)
        opt.clip_grad_norm_(tc.grad_clip or math.inf)
        opt.step()
        emit({"event": "step", "phase": -1, "step": step, "loss": distributed.mean(loss.item())})


def _truncate_metrics(run: Run, phase: int, step: int | None, completed: int) -> None:
    """Drop metrics.jsonl lines written after the checkpoint we resume from (they will be redone)."""
    path = run.dir / "metrics.jsonl"
    if not path.exists() or not distributed.is_main():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a line cut by a crash
        if rec["phase"] < completed or (step is not None and rec["phase"] == phase and rec["step"] < step):
            keep.append(line)
    from .checkpoint import atomic_write_text

    atomic_write_text(path, "".join(x + "\n" for x in keep))
