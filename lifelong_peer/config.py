"""A run's configuration: ``TrainConfig`` (how it trains), ``AttachOptions`` (bring your own model),
``RunConfig`` (everything config.json holds), strategy presets resolved into them, TOML config files.

Field docstrings document themselves: they are the ``lpeer run`` options' help and the README's
configuration reference (``config_docs``; tests keep them in sync).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from . import advice
from .errors import UserError
from .policies import parse_policy
from .strategies import strategy_overrides

if TYPE_CHECKING:  # imported where used: `lpeer` reads TrainConfig's fields at start-up, without torch (issue 25)
    from .model import ModelConfig
    from .peer import PEERConfig

PRECISIONS = ("auto", "fp32", "bf16")


@dataclass
class TrainConfig:
    """How a run trains. Strategy presets set some of these; every field can be overridden."""

    strategy: str = "naive"
    """Preset this config started from: naive, lifelong, lifelong-grow, replay, ewc, mas, smf, smf-shared, dense, joint."""
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
    max_experts: int = 0
    """Memory budget: experts per PEER layer (all generations) growth may reach; growth that does not fit is cut,
    to none (0: no budget). Each phase reports what it grew and why."""
    grow_mode: str = "exact"
    """How growth adds experts: exact (a new generation with its own retrieval and v = 0: the function is
    unchanged, old routing untouched; each generation adds grow_topk experts per head), safe (new sub-keys
    join the shared retrieval, shortened to enter no sampled old retrieval: near-unchanged), budget (the
    earlier behaviour: shortened to enter at most 5% of old retrievals)."""
    grow_topk: int = 0
    """Experts per head each grown generation retrieves in grow_mode exact (0: the layer's topk)."""
    grow_gate: str = "nested"
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
    """Batches used to estimate the Fisher (EWC) or the importance (MAS) at the end of each phase."""
    mas: float = 0.0
    """Weight of MAS on shared weights (importance: mean |∂‖f(x)‖²/∂θ| of the logits, accumulated across phases)."""
    distill: float = 0.0
    """Weight of distillation: KL to the previous phase's model on the current batch."""
    distill_temperature: float = 2.0
    """Softmax temperature of distillation."""
    distill_on: str = "all"
    """Rows distillation applies to: all (the whole batch) or replay (the replayed rows only: old slices' outputs
    are held, the new slice learns freely)."""
    distill_tokens: str = "all"
    """Tokens of those rows distillation applies to: all, or forgotten (only where the previous model gave the
    true next byte more probability than the model does now: what is being lost is held, what improves runs
    free; issue 24)."""
    replay: float = 0.0
    """Fraction of each batch drawn from earlier slices' train splits (with one earlier slice; see replay_growth)."""
    replay_growth: float = 0.0
    """How the replay share grows with the number k of earlier slices: 1 − (1 − replay)·k^−replay_growth, so the
    new slice's share of each batch shrinks as a power of k (0: the share stays ``replay``). A long stream has
    many more slices to hold than a short one (issue 24: over 59 SOTU slices the lifelong preset
    forgets 16% of what naive forgets at 0.1, 28% at 0)."""
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
    keep_checkpoints: str = "latest"
    """Phase checkpoints kept: latest (the newest phase's and the base, so disk use grows with the pool, not with
    the number of slices) or all (every phase's model stays loadable)."""
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
        if self.distill_on not in ("all", "replay"):
            raise UserError(f"distill_on must be all or replay, got {self.distill_on!r}")
        if self.distill_tokens not in ("all", "forgotten"):
            raise UserError(f"distill_tokens must be all or forgotten, got {self.distill_tokens!r}")
        if self.keep_checkpoints not in ("latest", "all"):
            raise UserError(f"keep_checkpoints must be latest or all, got {self.keep_checkpoints!r}")
        for name in (
            "max_experts",
            "weight_decay",
            "expert_weight_decay",
            "l2sp",
            "ewc",
            "mas",
            "distill",
            "warmup",
            "base_steps",
        ):
            if getattr(self, name) < 0:
                raise UserError(f"{name} must be ≥ 0, got {getattr(self, name)}")
        if not 0 <= self.replay < 1:
            raise UserError(f"replay must lie in [0, 1), got {self.replay}")
        if not 0 <= self.replay_growth < float("inf"):
            raise UserError(f"replay_growth must be a finite number ≥ 0, got {self.replay_growth}")
        if self.replay_growth and not self.replay:
            raise UserError("replay_growth grows the replay share: it needs replay > 0")
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
        from .optim import MOMENTS

        if self.expert_moments not in MOMENTS:
            raise UserError(f"expert_moments must be one of {', '.join(MOMENTS)}, got {self.expert_moments!r}")
        if self.precision not in PRECISIONS:
            raise UserError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        grow = str(self.grow)
        if grow not in ("none", "auto") and not (grow.isdigit() and int(grow) > 0):
            raise UserError(f"grow must be none, auto or a positive number of sub-keys, got {self.grow!r}")
        self.grow = grow

    def replay_share(self, n_old: int) -> float:
        """Fraction of a batch replayed in a phase with ``n_old`` earlier slices (0 when there are none)."""
        if not n_old or not self.replay:
            return 0.0
        return 1 - (1 - self.replay) * n_old**-self.replay_growth


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


def _peer_config(**fields) -> PEERConfig:
    from .peer import PEERConfig

    return PEERConfig(**fields)


@dataclass
class AttachOptions:
    """Bring your own model (issue 11): start from a Hugging Face causal LM with PEER layers attached."""

    base_model: str
    """Hugging Face model name or local directory, loaded through transformers (nothing fetched when local)."""
    layers: list[int] | None = None
    """Decoder blocks (0-based, negative from the end) that get a PEER layer; None: the middle block (§3)."""
    mode: str = "add"
    """add: PEER beside the block's MLP (the base's own logits until trained); replace: PEER instead of it."""
    peer: PEERConfig = field(default_factory=_peer_config)
    """PEER layer template; its dim is set to the base's hidden size."""
    trainable: list[str] = field(default_factory=list)
    """fnmatch patterns of base parameters left trainable (e.g. "*.ln_2.*"); every other base weight is frozen."""
    context: int | None = None
    """Training window in tokens; None: the base's max_position_embeddings, at most 1024 (set by create_run)."""

    def __post_init__(self) -> None:
        if isinstance(self.peer, dict):
            try:
                self.peer = _peer_config(**self.peer)
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
            raise UserError(f"attach: base_model is required ({advice.command(advice.BASE_MODEL)})")
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
    def base_slices(self) -> list[str]:
        """The slices a base trained here sees (``base_data``): the first (first) or all (mix)."""
        return self.slices[:1] if self.train.base_data == "first" else list(self.slices)

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
        from .model import ModelConfig

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
    from .model import ModelConfig

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


def phase_steps(tc: TrainConfig, context: int) -> int:
    """Optimizer steps of one phase: ``steps``, or ``tokens`` / (batch_size · context) when set."""
    return max(1, math.ceil(tc.tokens / (tc.batch_size * context))) if tc.tokens else tc.steps


BASE_FIELDS = (
    "batch_size",
    "weight_decay",
    "expert_moments",
    "warmup",
    "min_lr_ratio",
    "grad_clip",
    "base_data",
    "checkpoint_every",
    "seed",
    "device",
    "precision",
)
"""The ``TrainConfig`` fields base training takes from a run's config (besides base_steps and base_lr)."""


def base_train_config(tc: TrainConfig) -> TrainConfig:
    """The config base training runs under: ``BASE_FIELDS`` of ``tc``, ``base_lr`` and ``base_steps`` as
    its lr and steps, every other field at its default. A strategy's protections (growth, freezing,
    replay, regularisers, expert_weight_decay) are for the phases: all strategies of a stream start from
    one base (so a run can reuse another's, issue 17)."""
    kept = {name: getattr(tc, name) for name in BASE_FIELDS}
    return TrainConfig(**kept, lr=tc.base_lr, base_lr=tc.base_lr, steps=max(tc.base_steps, 1), base_steps=tc.base_steps)


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
