"""Forgetting metrics from the loss matrix and the run's ``results.json`` (its CSV/JSON files: ``run_outputs``).

The loss matrix of one split: ``L[i][j]`` = mean loss on slice j's held-out split after phase i,
where phase i trains on slice i (``slices`` are in time order). Lower is better, so the signs of
the classification-accuracy definitions flip (RESEARCH.md "Forgetting metrics"). With T the last
finished phase (0-based; a partial run has T + 1 < len(slices) phases):

- final average: Σ_j w_j L[T][j] / Σ_j w_j over the seen slices j ≤ T, weighted by held-out size
  (tokens for nll, bytes for bpb — the loss on the pooled held-out sets; for the byte tokenizer
  tokens = bytes), plus the unweighted mean;
- forgetting of slice j (Chaudhry et al. 2018, flipped): F_j = L[T][j] − min_{l∈[j, T−1]} L[l][j];
  averaged over j < T; positive = forgot;
- BWT (Lopez-Paz & Ranzato 2017, flipped): mean_{j<T} (L[j][j] − L[T][j]); negative = forgot;
- FWT: mean_{1≤j≤T} (B[j] − L[j−1][j]), where B is the model before phase 0 (the base model,
  not a random init — issue 6); positive = earlier phases helped on slices not yet trained on;
- plasticity: the diagonal L[j][j]; newest: L[T][T];
- base average: the base model's loss B averaged like the final average (same slices j ≤ T, same
  weights); gain = base average − final average: what the phases bought (issue 16: a strategy that
  barely moves shows little forgetting; its gain shows it learned little too).

Forgetting, BWT and FWT are plain means over slices, as in the papers; they are ``None`` when
undefined (one phase: nothing to forget yet).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import UserError
from .files import atomic_write_json

RESULTS_FILE = "results.json"
RESULTS_FORMAT = "lifelong-peer/results/1"
SPLITS = ("validation", "test")
UNITS = ("bpb", "nll")

DEFINITIONS = {
    "matrix": "L[i][j]: mean loss on slice j's held-out split after phase i (phase i trains on slice i); "
    "'before' is the base model before phase 0. Lower is better.",
    "nll": "nats per token; bpb: bits per byte = total nats / (bytes · ln 2)",
    "final_avg": "Σ_j w_j L[T][j] / Σ_j w_j over seen slices j ≤ T, weighted by held-out tokens (nll) "
    "or bytes (bpb): the loss on the pooled held-out sets; final_avg_unweighted: plain mean",
    "forgetting": "F_j = L[T][j] − min_{l∈[j,T−1]} L[l][j] for j < T; avg_forgetting = mean_j F_j; "
    "positive = forgot (Chaudhry et al. 2018, flipped for loss)",
    "bwt": "mean_{j<T} (L[j][j] − L[T][j]); negative = forgot (Lopez-Paz & Ranzato 2017, flipped for loss)",
    "fwt": "mean_{1≤j≤T} (before[j] − L[j−1][j]); positive = earlier phases helped on the next slice "
    "(reference: the base model, not a random init)",
    "plasticity": "the diagonal L[j][j]: loss on a slice right after training on it",
    "newest": "L[T][T]: loss on the newest trained slice after the last phase",
    "base_avg": "the base model's loss (before phase 0) averaged like final_avg: seen slices j ≤ T, same weights",
    "gain": "base_avg − final_avg: how much lower the loss ends than the untouched base; > 0 = learned",
}


# ---------------------------------------------------------------------------------------------
# results.json: the contract between the trainer (writer) and eval / report (readers)


@dataclass
class EvalRow:
    """One evaluation of one model on every slice's held-out split; lists are indexed by slice.

    A slice whose held-out split is empty has tokens = bytes = 0 and NaN losses (``null`` in JSON);
    averages leave it out.
    """

    nll: list[float]
    """mean negative log-likelihood per token, in nats"""
    bpb: list[float]
    """bits per byte: total nats / (bytes · ln 2)"""
    tokens: list[int]
    """held-out tokens scored (the weights of nll averages)"""
    bytes: list[int]
    """held-out UTF-8 bytes scored (the weights of bpb averages)"""

    @classmethod
    def from_totals(cls, nll_sum: list[float], tokens: list[int], num_bytes: list[int]) -> EvalRow:
        """Per-slice summed nats, token and byte counts → a row (the one place bpb is defined).

        A slice with an empty held-out split (0 tokens or bytes) gets NaN and counts 0.
        """
        empty = [t == 0 or b == 0 for t, b in zip(tokens, num_bytes, strict=True)]
        return cls(
            nll=[math.nan if e else s / t for s, t, e in zip(nll_sum, tokens, empty, strict=True)],
            bpb=[math.nan if e else s / (b * math.log(2)) for s, b, e in zip(nll_sum, num_bytes, empty, strict=True)],
            tokens=[0 if e else int(t) for t, e in zip(tokens, empty, strict=True)],
            bytes=[0 if e else int(b) for b, e in zip(num_bytes, empty, strict=True)],
        )


@dataclass
class SplitEval:
    """All evaluations of one split (validation or test) in a run."""

    before: EvalRow
    """the base model, before phase 0: the reference for forward transfer"""
    after: list[EvalRow] = field(default_factory=list)
    """one row per finished phase: row i is the model after phase i"""


@dataclass
class PhaseRecord:
    """What one finished phase did, and the model it left."""

    slice: str
    """name of the slice trained on in this phase"""
    train_tokens: int
    """training tokens consumed in this phase"""
    wall_time_s: float
    """wall-clock seconds of the phase (training and its evaluation)"""
    num_experts: int
    """experts in the pool(s) after the phase, summed over PEER layers (0 for a dense model)"""
    frozen_fraction: float
    """fraction of those experts frozen after the phase, in [0, 1]"""
    params: int
    """total parameters after the phase"""
    active_params: int
    """parameters used per token (retrieved experts only)"""
    extra: dict = field(default_factory=dict)
    """further keys the trainer records; kept as they are"""
    growth_shock_bpb: float | None = None
    """max over old slices of |validation bits per byte right after this phase's growth − before it|,
    before any step (``index.growth_shock``); None when nothing grew. Per slice (signed, positive =
    worse) in ``extra["growth_shock_per_slice_bpb"]``"""


@dataclass
class RunResults:
    """The contents of ``results.json``: written by the trainer after every phase, read by eval/report."""

    run: str
    """run id"""
    strategy: str
    """strategy name (naive, lifelong, replay, ...)"""
    slices: list[str]
    """slice names in time order; phase i trains on slices[i]"""
    phases: list[PhaseRecord] = field(default_factory=list)
    """one record per finished phase (fewer than slices while a run is in progress)"""
    eval: dict[str, SplitEval] = field(default_factory=dict)
    """split name (validation / test) → its evaluations"""
    extra: dict = field(default_factory=dict)
    """further top-level keys (config, seed, ...); kept as they are"""

    def __post_init__(self):
        # one split order however the results were built: results.json stores its keys sorted, so a
        # resumed run would otherwise write matrix.csv / metrics.csv rows in another order (issue 17)
        self.eval = dict(sorted(self.eval.items(), key=lambda kv: _split_order(kv[0])))

    def add_phase(self, phase: PhaseRecord, rows: dict[str, EvalRow]) -> None:
        """Record a finished phase and its evaluation on every split (the trainer's one call per phase)."""
        if set(rows) != set(self.eval):
            raise UserError(f"phase {len(self.phases)}: evaluated splits {sorted(rows)}, expected {sorted(self.eval)}")
        self.phases.append(phase)
        for name, row in rows.items():
            self.eval[name].after.append(row)
        self.validate()

    def validate(self, where: str = RESULTS_FILE) -> None:
        """Raise UserError when anything is malformed: one set of checks, by a round trip through from_dict."""
        RunResults.from_dict(self.to_dict(), where)

    def to_dict(self) -> dict:
        def row(r: EvalRow) -> dict:
            return {"nll": _nulls(r.nll), "bpb": _nulls(r.bpb), "tokens": list(r.tokens), "bytes": list(r.bytes)}

        phases = []
        for p in self.phases:
            d = {k: getattr(p, k) for k in (*_PHASE_KEYS, "growth_shock_bpb")}
            phases.append({**p.extra, **d})
        return {
            **self.extra,
            "format": RESULTS_FORMAT,
            "run": self.run,
            "strategy": self.strategy,
            "slices": list(self.slices),
            "phases": phases,
            "eval": {s: {"before": row(e.before), "after": [row(r) for r in e.after]} for s, e in self.eval.items()},
        }

    @classmethod
    def from_dict(cls, data: object, where: str = RESULTS_FILE) -> RunResults:
        """Parse and validate; every problem is a UserError naming the file and the key."""
        d = _typed(data, dict, where)
        fmt = d.get("format", RESULTS_FORMAT)
        if fmt != RESULTS_FORMAT:
            raise UserError(f"{where}: format {fmt!r} is not {RESULTS_FORMAT!r}")
        slices = [
            _typed(s, str, f"{where}: slices[{j}]")
            for j, s in enumerate(_typed(_key(d, "slices", where), list, f"{where}: slices"))
        ]
        if not slices or len(set(slices)) != len(slices):
            raise UserError(f"{where}: slices must be a non-empty list of distinct names, got {slices}")
        phases = [
            _phase(p, f"{where}: phases[{i}]")
            for i, p in enumerate(_typed(_key(d, "phases", where), list, f"{where}: phases"))
        ]
        if len(phases) > len(slices):
            raise UserError(f"{where}: {len(phases)} phases but only {len(slices)} slices")
        for i, p in enumerate(phases):
            if p.slice != slices[i]:
                raise UserError(
                    f"{where}: phases[{i}].slice is {p.slice!r}, expected {slices[i]!r} (phase i trains on slices[i])"
                )
        evals = _typed(_key(d, "eval", where), dict, f"{where}: eval")
        if not evals:
            raise UserError(f"{where}: eval has no split")
        parsed = {}
        for name, e in evals.items():
            w = f"{where}: eval.{name}"
            e = _typed(e, dict, w)
            after = _typed(_key(e, "after", w), list, f"{w}.after")
            if len(after) != len(phases):
                raise UserError(f"{w}.after has {len(after)} rows but there are {len(phases)} phases")
            parsed[name] = SplitEval(
                before=_row(_key(e, "before", w), len(slices), f"{w}.before"),
                after=[_row(r, len(slices), f"{w}.after[{i}]", unscored=True) for i, r in enumerate(after)],
            )
            for i, r in enumerate(parsed[name].after):
                if (r.tokens, r.bytes) != (parsed[name].before.tokens, parsed[name].before.bytes):
                    raise UserError(
                        f"{w}.after[{i}] scored other tokens/bytes than {w}.before (held-out sets are fixed)"
                    )
        extra = {k: v for k, v in d.items() if k not in ("format", "run", "strategy", "slices", "phases", "eval")}
        return cls(
            run=_typed(_key(d, "run", where), str, f"{where}: run"),
            strategy=_typed(_key(d, "strategy", where), str, f"{where}: strategy"),
            slices=slices,
            phases=phases,
            eval=parsed,
            extra=extra,
        )


def _split_order(split: str) -> tuple[int, str]:
    """validation, test (the trainer's order), then any other split by name."""
    return (SPLITS.index(split) if split in SPLITS else len(SPLITS), split)


_PHASE_KEYS = ("slice", "train_tokens", "wall_time_s", "num_experts", "frozen_fraction", "params", "active_params")


def _key(d: dict, key: str, where: str):
    if key not in d:
        raise UserError(f"{where}: missing key {key!r}")
    return d[key]


def _typed(value, kind: type, where: str):
    if not isinstance(value, kind):
        raise UserError(f"{where}: expected {kind.__name__}, got {value!r}")
    return value


def _count(value, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise UserError(f"{where}: expected a non-negative integer, got {value!r}")
    return value


def _number(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UserError(f"{where}: expected a finite number, got {value!r}")
    return float(value)


def _phase(data, where: str) -> PhaseRecord:
    d = _typed(data, dict, where)
    frozen = _number(_key(d, "frozen_fraction", where), f"{where}.frozen_fraction")
    shock = f"{where}.growth_shock_bpb"
    if not 0.0 <= frozen <= 1.0:
        raise UserError(f"{where}.frozen_fraction: expected a fraction in [0, 1], got {frozen}")
    return PhaseRecord(
        slice=_typed(_key(d, "slice", where), str, f"{where}.slice"),
        train_tokens=_count(_key(d, "train_tokens", where), f"{where}.train_tokens"),
        wall_time_s=_number(_key(d, "wall_time_s", where), f"{where}.wall_time_s"),
        num_experts=_count(_key(d, "num_experts", where), f"{where}.num_experts"),
        frozen_fraction=frozen,
        params=_count(_key(d, "params", where), f"{where}.params"),
        active_params=_count(_key(d, "active_params", where), f"{where}.active_params"),
        extra={k: v for k, v in d.items() if k not in (*_PHASE_KEYS, "growth_shock_bpb")},
        growth_shock_bpb=None if d.get("growth_shock_bpb") is None else _number(d["growth_shock_bpb"], shock),
    )


def _row(data, num_slices: int, where: str, unscored: bool = False) -> EvalRow:
    """One row; ``unscored``: a null loss on a non-empty split is allowed (an after-phase row whose model was
    pruned before a slice was added, ``runops.add_slice``)."""
    d = _typed(data, dict, where)
    lists = {}
    for key in ("nll", "bpb", "tokens", "bytes"):
        lists[key] = _typed(_key(d, key, where), list, f"{where}.{key}")
        if len(lists[key]) != num_slices:
            raise UserError(f"{where}.{key} has {len(lists[key])} values but there are {num_slices} slices")
    values = {key: [_count(x, f"{where}.{key}[{j}]") for j, x in enumerate(lists[key])] for key in ("tokens", "bytes")}
    empty = [t == 0 or b == 0 for t, b in zip(values["tokens"], values["bytes"], strict=True)]
    for key in ("nll", "bpb"):
        values[key] = []
        for j, x in enumerate(lists[key]):
            if not empty[j] and not (unscored and x is None):
                values[key].append(_number(x, f"{where}.{key}[{j}]"))
            elif x is None or (isinstance(x, float) and math.isnan(x)):
                values[key].append(math.nan)
            else:
                raise UserError(f"{where}.{key}[{j}]: slice {j} was scored on 0 tokens or bytes but has loss {x!r}")
    return EvalRow(**values)


def _nulls(values: list[float]) -> list[float | None]:
    """NaN (an empty held-out split) → None, so that the JSON we write is standard JSON."""
    return [None if isinstance(v, float) and math.isnan(v) else v for v in values]


def _clean(data):
    """A summary with every NaN replaced by None (recursively through dicts and lists)."""
    if isinstance(data, dict):
        return {k: _clean(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_clean(v) for v in data]
    return None if isinstance(data, float) and math.isnan(data) else data


def save_results(run_dir: str | Path, results: RunResults) -> Path:
    """Validate and write ``run_dir/results.json`` atomically."""
    results.validate()
    path = Path(run_dir) / RESULTS_FILE
    atomic_write_json(path, results.to_dict())
    return path


def load_results(run_dir: str | Path) -> RunResults:
    """Read ``run_dir/results.json`` (or that file itself); a missing or malformed file is a UserError."""
    path = Path(run_dir)
    if path.is_dir():
        path = path / RESULTS_FILE
    if not path.is_file():
        raise UserError(f"{path}: no results file; the run has not finished a phase")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    return RunResults.from_dict(data, str(path))


# ---------------------------------------------------------------------------------------------
# metrics of one loss matrix


def forgetting_table(matrix: np.ndarray) -> np.ndarray:
    """F[i][j] = L[i][j] − min_{l∈[j, i−1]} L[l][j] for j < i, NaN elsewhere.

    matrix: (P, S) losses after each of P phases, P ≤ S. Returns (P, S); its last row holds the
    forgetting of the run so far; earlier rows are the forgetting after each phase (metrics.csv).
    """
    L = np.asarray(matrix, dtype=float)
    F = np.full(L.shape, np.nan)
    for i in range(L.shape[0]):
        for j in range(min(i, L.shape[1])):
            F[i, j] = L[i, j] - L[j:i, j].min()
    return F


def _mean(values: np.ndarray, weights: np.ndarray | None = None) -> float | None:
    """Mean of the finite values (weighted if ``weights``); None when there is none (nothing defined)."""
    v = np.asarray(values, dtype=float)
    w = np.ones_like(v) if weights is None else np.asarray(weights, dtype=float)
    ok = np.isfinite(v) & (w > 0)
    return float((v[ok] * w[ok]).sum() / w[ok].sum()) if ok.any() else None


def matrix_metrics(matrix: np.ndarray, before: np.ndarray, weights: np.ndarray) -> dict:
    """Forgetting metrics of one loss matrix (definitions in the module docstring).

    matrix: (P, S) loss after phase i on slice j, 0 ≤ P ≤ S; before: (S,) the base model's loss;
    weights: (S,) held-out sizes. NaN marks a slice without held-out data: averages leave it out.
    Returns final_avg, final_avg_unweighted, forgetting (list over j < T), avg_forgetting, bwt,
    fwt, plasticity (list over j ≤ T), newest, base_avg (the base's loss averaged like final_avg)
    and gain (base_avg − final_avg); averages are None where nothing is defined (e.g. forgetting,
    BWT and FWT after a single phase; every average before any phase).
    """
    before = np.asarray(before, dtype=float)
    L = np.asarray(matrix, dtype=float).reshape(-1, before.shape[0])
    P = L.shape[0]
    T = P - 1
    final = L[T, :P] if P else np.zeros(0)
    diagonal = L[np.arange(P), np.arange(P)]
    forgetting = forgetting_table(L)[T, :T] if P else np.zeros(0)
    previous = L[np.arange(T), np.arange(1, P)] if P else np.zeros(0)  # L[j−1][j] for 1 ≤ j ≤ T
    final_avg = _mean(final, np.asarray(weights)[:P])
    base_avg = _mean(before[:P], np.asarray(weights)[:P])
    return {
        "final_avg": final_avg,
        "base_avg": base_avg,
        "gain": base_avg - final_avg if base_avg is not None and final_avg is not None else None,
        "final_avg_unweighted": _mean(final),
        "forgetting": forgetting.tolist(),
        "avg_forgetting": _mean(forgetting),
        "bwt": _mean(diagonal[:T] - L[T, :T]) if P else None,
        "fwt": _mean(before[1:P] - previous),
        "plasticity": diagonal.tolist(),
        "newest": float(L[T, T]) if P else None,
    }


def base_size(results: RunResults) -> dict:
    """``num_experts``, ``params`` and ``active_params`` of the model the run started from (the 'before' row):
    recorded at the run's start (``base``, since issue 25), else its experts from phase 0's growth record
    (experts before growth), else phase 0's own count when phase 0 did not grow; None where unknown. Never
    phase 0's count after growth: the base row showed 2,304 experts for a 1,024-expert base (issue 25)."""
    base = results.extra.get("base")
    if isinstance(base, dict):
        return {k: base.get(k) for k in ("num_experts", "params", "active_params")}
    size = {"num_experts": None, "params": None, "active_params": None}
    if results.phases:
        grown = results.phases[0].extra.get("grow")
        if isinstance(grown, list):
            size["num_experts"] = sum(int(r.get("experts_before") or 0) for r in grown)
        else:
            size["num_experts"] = results.phases[0].num_experts
    return size


def summarize(results: RunResults, split: str = "test") -> dict:
    """The loss matrices and every metric of one split, in bpb and nll, plus growth per phase.

    Metric keys are ``<name>_<unit>`` (``avg_forgetting_bpb``, ``final_avg_nll``, ...); matrices are
    ``matrix_bpb`` / ``matrix_nll`` as lists of rows, one row per finished phase.
    """
    if split not in results.eval:
        raise UserError(f"run {results.run!r} has no {split!r} evaluation (it has {', '.join(results.eval)})")
    e = results.eval[split]
    out: dict = {
        "run": results.run,
        "strategy": results.strategy,
        "split": split,
        "slices": list(results.slices),
        "phases_done": len(results.phases),
        "complete": len(results.phases) == len(results.slices),
    }
    for unit, weight_key in (("bpb", "bytes"), ("nll", "tokens")):
        matrix = [getattr(r, unit) for r in e.after]
        before = getattr(e.before, unit)
        out[f"matrix_{unit}"] = matrix
        out[f"before_{unit}"] = before
        for name, value in matrix_metrics(np.array(matrix), np.array(before), getattr(e.before, weight_key)).items():
            out[f"{name}_{unit}"] = value
    out["eval_tokens"] = list(e.before.tokens)
    out["eval_bytes"] = list(e.before.bytes)
    out["weighting"] = "final_avg_* weighted by held-out tokens (nll) / bytes (bpb); other averages are plain means"
    for key in ("num_experts", "frozen_fraction", "params", "active_params", "train_tokens", "wall_time_s"):
        out[key] = [getattr(p, key) for p in results.phases]
    out["growth_shock_bpb"] = [p.growth_shock_bpb for p in results.phases]
    out["ms_per_step"] = [p.extra.get("ms_per_step") for p in results.phases]  # None in runs before issue 24
    out |= {f"base_{k}": v for k, v in base_size(results).items()}
    out["total_train_tokens"] = sum(out["train_tokens"])
    out["total_wall_time_s"] = sum(out["wall_time_s"])
    return _clean(out)
