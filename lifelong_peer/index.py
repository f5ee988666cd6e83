"""The index manager: a FAISS-backed view of the expert pool, used between phases (issue 5).

It decides *what* to grow or freeze; the PEER layer knows *how* (``PEER.grow``, ``PEER.freeze``).

* **Usage ledger.** For every (slice, PEER-layer position): how often each expert was retrieved
  and the router-weight mass (softmax gate, Eq. 8) it received. Sparse — memory ∝ experts used,
  not N — saved as safetensors + JSON, merged across phases. ``layer_stats`` turns it into the
  paper's Table 2 numbers: usage % and unevenness KL(z ‖ uniform) = log N + Σ z log z over the
  accumulated router mass z.
* **Coverage and growth.** ``coverage`` gives each token/head query's best sub-key score per half
  (FAISS inner-product search over the sub-keys). A new slice whose query halves score worse than
  the old slices' are *poorly served*; ``decide_growth`` turns their excess into K, and
  ``place_subkeys`` puts the K new sub-keys at ``faiss.Kmeans`` centroids of those halves instead
  of at random. ``grow_model`` does both and measures the fraction of old-slice tokens whose
  retrieved set the growth changed (``changed_fraction``).
* **Freezing policies** between phases: ``none``, ``all-old``, ``usage:P``, ``tfidf:T`` (Sparse
  Memory Finetuning, Lin et al. 2025) — ``freeze_ids`` picks the ids, ``set_frozen`` applies them.
* **ExpertIndex.** FAISS over expert vectors (keys [c_i; c'_j], or u / v rows): nearest experts
  and near-duplicates; exact flat index for small pools, IVF for large ones, on GPU when faiss has
  GPUs. Every FAISS result is tested against brute force in ``tests/test_index.py``.
* **Run-level commands.** ``inspect_run``, ``grow_run``, ``freeze_run``: what ``lpeer inspect``,
  ``lpeer grow`` and ``lpeer freeze`` call on a run between phases.

Layers are addressed by their position among the model's PEER layers (``model.peer_layers()``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal, TypeVar

import faiss
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .checkpoint import load_tensors, save_tensors
from .errors import CheckpointError, UserError
from .peer import PEER, pair_of

LEDGER_FORMAT = "lifelong-peer/usage/1"
T = TypeVar("T")

# --- usage ledger ---------------------------------------------------------------------------------


@dataclass
class Usage:
    """Usage of one PEER layer on one slice, stored sparsely: only experts retrieved at least once."""

    ids: Tensor
    """(u,) int64 expert ids, ascending and unique."""
    counts: Tensor
    """(u,) int64 retrievals: (token, head) pairs whose top-k held the expert."""
    mass: Tensor
    """(u,) float64 router weight (softmax gate, Eq. 8) accumulated over those retrievals."""
    tokens: int = 0
    """Tokens recorded."""

    @classmethod
    def empty(cls) -> Usage:
        return cls(
            torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.float64)
        )

    def __add__(self, other: Usage) -> Usage:
        ids, inv = torch.cat([self.ids, other.ids]).unique(return_inverse=True)
        counts = torch.zeros(len(ids), dtype=torch.long).index_add_(0, inv, torch.cat([self.counts, other.counts]))
        mass = torch.zeros(len(ids), dtype=torch.float64).index_add_(0, inv, torch.cat([self.mass, other.mass]))
        return Usage(ids, counts, mass, self.tokens + other.tokens)

    def dense(self, num_experts: int) -> tuple[Tensor, Tensor]:
        """(counts, mass), each (num_experts,), zeros for unused experts (ids ≥ num_experts dropped)."""
        keep = self.ids < num_experts
        counts = torch.zeros(num_experts, dtype=torch.long).index_put_((self.ids[keep],), self.counts[keep])
        mass = torch.zeros(num_experts, dtype=torch.float64).index_put_((self.ids[keep],), self.mass[keep])
        return counts, mass


class UsageLedger:
    """Per (slice, PEER-layer position) ``Usage``; slices keep the order they were first recorded in."""

    def __init__(self) -> None:
        self._usage: dict[tuple[str, int], Usage] = {}

    def record(self, slice_name: str, layer: int, ids: Tensor, gates: Tensor) -> None:
        """Add one batch: ``ids``, ``gates`` (..., heads, topk) from ``PEER.forward(x, return_retrieval=True)``."""
        if ids.shape != gates.shape or ids.dim() < 2:
            raise ValueError(
                f"record(): ids {tuple(ids.shape)} and gates {tuple(gates.shape)} must be equal (..., heads, topk)"
            )
        uniq, inv = ids.detach().reshape(-1).cpu().long().unique(return_inverse=True)
        counts = torch.bincount(inv, minlength=len(uniq))
        mass = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inv, gates.detach().reshape(-1).cpu().double())
        self.add(slice_name, layer, Usage(uniq, counts, mass, math.prod(ids.shape[:-2])))

    def add(self, slice_name: str, layer: int, usage: Usage) -> None:
        key = (str(slice_name), int(layer))
        self._usage[key] = self._usage.get(key, Usage.empty()) + usage

    def merge(self, other: UsageLedger) -> None:
        """Add every entry of ``other`` into this ledger (counts, mass and tokens sum)."""
        for (name, layer), usage in other._usage.items():
            self.add(name, layer, usage)

    def slices(self) -> list[str]:
        return list(dict.fromkeys(name for name, _ in self._usage))

    def layers(self) -> list[int]:
        return sorted({layer for _, layer in self._usage})

    def get(self, slice_name: str, layer: int) -> Usage:
        """The usage of one slice on one layer (empty if never recorded)."""
        return self._usage.get((slice_name, layer), Usage.empty())

    def total(self, layer: int, slices: Sequence[str] | None = None) -> Usage:
        """The usage of ``layer`` summed over ``slices`` (default: all)."""
        out = Usage.empty()
        for name in self.slices() if slices is None else slices:
            out = out + self.get(name, layer)
        return out

    def to_tensors(self) -> tuple[dict[str, Tensor], dict]:
        """(tensors, JSON-able meta) for ``checkpoint.save_tensors``; entry ``e`` is ``usage.{e}.ids|counts|mass``."""
        tensors, entries = {}, []
        for e, ((name, layer), usage) in enumerate(self._usage.items()):
            tensors[f"usage.{e}.ids"] = usage.ids
            tensors[f"usage.{e}.counts"] = usage.counts
            tensors[f"usage.{e}.mass"] = usage.mass
            entries.append({"slice": name, "layer": layer, "tokens": usage.tokens})
        return tensors, {"format": LEDGER_FORMAT, "entries": entries}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], meta: dict) -> UsageLedger:
        """Inverse of ``to_tensors``; a missing or inconsistent entry raises ``CheckpointError``."""
        if meta.get("format") != LEDGER_FORMAT:
            raise CheckpointError(f"not a usage ledger (format {meta.get('format')!r}, expected {LEDGER_FORMAT})")
        ledger = cls()
        for e, entry in enumerate(meta.get("entries", [])):
            try:
                ids, counts, mass = (tensors[f"usage.{e}.{part}"] for part in ("ids", "counts", "mass"))
                usage = Usage(ids.long(), counts.long(), mass.double(), int(entry["tokens"]))
                name, layer = str(entry["slice"]), int(entry["layer"])
            except (KeyError, TypeError, ValueError) as err:
                raise CheckpointError(f"usage ledger entry {e} is incomplete ({err})") from None
            if not (ids.dim() == 1 and ids.shape == counts.shape == mass.shape):
                raise CheckpointError(f"usage ledger entry {e} ({name}, layer {layer}) has mismatched tensor shapes")
            ledger.add(name, layer, usage)
        return ledger

    def save(self, path) -> None:
        save_tensors(path, *self.to_tensors())

    @classmethod
    def load(cls, path) -> UsageLedger:
        return cls.from_tensors(*load_tensors(path))


@contextmanager
def _eval(module: torch.nn.Module) -> Iterator[None]:
    """Eval mode (BatchNorm uses running statistics and is not updated) and no autograd, restored after."""
    was = module.training
    module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        module.train(was)


def collect_usage(
    model,
    windows: Tensor,
    ledger: UsageLedger | None,
    slice_name: str | None = None,
    batch_size: int = 16,
    sample_inputs: int = 0,
    generator: torch.Generator | None = None,
) -> dict:
    """Run ``model`` (a LanguageModel) in eval mode over token ``windows`` (n, T) and record retrievals.

    Forward hooks on ``model.peer_layers()`` see each PEER layer's input x and record its
    retrieval under (``slice_name``, layer position) in ``ledger`` (skipped if None). With
    ``sample_inputs`` > 0 a uniform sample of about that many tokens' layer inputs is kept per
    layer — what ``coverage``, ``decide_growth``, ``place_subkeys`` and ``changed_fraction`` take,
    since a layer's retrieval depends on nothing else. Returns
    ``{"tokens": int, "inputs": {layer: (m, dim) float CPU tensor}}``.
    """
    if ledger is not None and slice_name is None:
        raise ValueError("collect_usage(): recording into a ledger needs a slice_name")
    layers = model.peer_layers()
    total = max(windows.numel(), 1)
    kept: dict[int, list[Tensor]] = {pos: [] for pos in range(len(layers))}
    device = next(model.parameters()).device

    def hook(pos: int):
        def fn(module: PEER, args: tuple, output: Tensor) -> None:
            x = args[0].reshape(-1, module.config.dim)
            if ledger is not None:
                scores, ids = module.retrieve(x)
                ledger.record(slice_name, pos, ids, module.gates(scores))
            if sample_inputs > 0:
                m = min(x.shape[0], math.ceil(sample_inputs * x.shape[0] / total))
                pick = torch.randperm(x.shape[0], generator=generator)[:m]
                kept[pos].append(x[pick.to(x.device)].float().cpu())

        return fn

    handles = [layer.register_forward_hook(hook(pos)) for pos, layer in enumerate(layers)]
    try:
        with _eval(model):
            for start in range(0, len(windows), batch_size):
                model(windows[start : start + batch_size].to(device))
    finally:
        for h in handles:
            h.remove()
    inputs = {pos: torch.cat(xs)[:sample_inputs] for pos, xs in kept.items() if xs}
    return {"tokens": windows.numel(), "inputs": inputs}


# --- statistics (Table 2) -------------------------------------------------------------------------


def kl_unevenness(mass: Tensor, num_experts: int) -> float | None:
    """KL(z ‖ uniform) = log N + Σ z log z with z = mass / Σ mass (He 2024, Table 2); None without mass."""
    total = float(mass.sum())
    if total <= 0:
        return None
    z = mass.double() / total
    z = z[z > 0]  # 0 log 0 = 0: unused experts add nothing
    return math.log(num_experts) + float((z * z.log()).sum())


def _summary(usage: Usage, num_experts: int) -> dict:
    used = int((usage.ids < num_experts).sum())
    return {
        "usage_pct": 100.0 * used / num_experts,
        "kl_unevenness": kl_unevenness(usage.mass[usage.ids < num_experts], num_experts),
        "tokens": usage.tokens,
    }


def top_experts(usage: Usage, k: int = 10) -> list[dict]:
    """The ``k`` experts with the most router mass: [{id, count, mass_share}]."""
    total = float(usage.mass.sum()) or 1.0
    order = usage.mass.argsort(descending=True, stable=True)[:k]
    return [
        {"id": int(usage.ids[o]), "count": int(usage.counts[o]), "mass_share": float(usage.mass[o]) / total}
        for o in order
    ]


def layer_stats(
    ledger: UsageLedger, layer: int, num_experts: int, frozen: Tensor, slice_name: str | None = None
) -> dict:
    """Usage %, KL unevenness, dead experts, top experts and tokens of one layer (one slice or all).

    ``frozen`` is the layer's (N,) bool mask. ``dead`` counts experts none of the slices retrieved.
    With ``slice_name`` None the totals are over all slices and ``slices`` holds each one's
    {usage_pct, kl_unevenness, tokens}.
    """
    usage = ledger.total(layer) if slice_name is None else ledger.get(slice_name, layer)
    out = {"num_experts": num_experts, "frozen": int(frozen.sum()), "frozen_pct": 100.0 * float(frozen.float().mean())}
    out |= _summary(usage, num_experts)
    out["dead"] = num_experts - int((usage.ids < num_experts).sum())
    out["top"] = top_experts(usage)
    if slice_name is None:
        out["slices"] = {name: _summary(ledger.get(name, layer), num_experts) for name in ledger.slices()}
    return out


def overlap(ledger: UsageLedger, layer: int, a: str, b: str) -> float:
    """Jaccard |A ∩ B| / |A ∪ B| of the expert sets slices ``a`` and ``b`` retrieved (0 if both empty)."""
    ia, ib = ledger.get(a, layer).ids, ledger.get(b, layer).ids
    union = torch.cat([ia, ib]).unique().numel()
    return (ia.numel() + ib.numel() - union) / union if union else 0.0


# --- FAISS helpers ----------------------------------------------------------------------------------


def faiss_gpus() -> int:
    """GPUs FAISS can use (0 for faiss-cpu)."""
    return int(faiss.get_num_gpus()) if hasattr(faiss, "get_num_gpus") else 0


def _np(x: Tensor) -> np.ndarray:
    return np.ascontiguousarray(x.detach().float().cpu().numpy())


def _search_ip(base: Tensor, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Exact inner-product top-k of ``queries`` (m, d) over ``base`` (n, d): (scores, rows), each (m, k)."""
    index = faiss.IndexFlatIP(base.shape[1])
    index.add(_np(base))
    scores, rows = index.search(_np(queries), k)
    return torch.from_numpy(scores), torch.from_numpy(rows).long()


# --- coverage and growth ---------------------------------------------------------------------------


def coverage(layer: PEER, x: Tensor) -> Tensor:
    """Layer inputs x (T, dim) → (T, heads, 2): each query half's best sub-key score, q_half · c (Eq. 4).

    How well the layer's current sub-keys serve the data: a low score means no sub-key points
    where the query half does. Searched with a FAISS inner-product index over each half's sub-keys.
    """
    c = layer.config
    half = c.dim_key // 2
    with _eval(layer):
        q = layer.queries(x.reshape(-1, c.dim))  # (T, h, dk)
        out = torch.empty(*q.shape[:2], 2)
        for side in range(2):
            halves = q[..., side * half : (side + 1) * half].reshape(-1, half)
            best, _ = _search_ip(layer.subkeys[:, side], halves, 1)
            out[..., side] = best.view(q.shape[:2])
    return out


@dataclass
class GrowthRule:
    """How ``decide_growth`` turns coverage into K, the sub-keys added per half (``--grow auto``),
    and how ``grow_model`` places them."""

    quantile: float = 0.1
    """A new query half is poorly served if its best sub-key score is below this quantile of the old
    slices' best scores (per half) — so, by construction, this fraction of old halves is too."""
    min_excess: float = 0.02
    """Grow only if the new slice's excess of poorly served halves over that baseline is at least this."""
    max_factor: float = 1.0
    """At most this × n new sub-keys per half in one growth (1.0: n at most doubles, N at most ×4)."""
    budget: float = 0.05
    """Placed sub-keys are shortened until each side's new keys enter at most this fraction of the old
    slices' (token, head) top-k sets (``place_subkeys``), protecting old retrievals."""


def poorly_served(layer: PEER, new_x: Tensor, old_x: Tensor | None, quantile: float = 0.1) -> tuple[Tensor, Tensor]:
    """(mask (T_new, heads, 2), thresholds (2,)): which new query halves score below the old ``quantile``.

    Without old inputs (first phase) every new half counts as poorly served (thresholds +inf).
    """
    new_cov = coverage(layer, new_x)
    if old_x is None or len(old_x) == 0:
        thresholds = torch.full((2,), math.inf)
    else:
        thresholds = coverage(layer, old_x).flatten(0, 1).quantile(quantile, dim=0)  # (2,)
    return new_cov < thresholds, thresholds


def decide_growth(layer: PEER, new_x: Tensor, old_x: Tensor | None, rule: GrowthRule | None = None) -> int:
    """K for ``--grow auto``: sub-keys per half such that the new keys' share K / (n + K) equals the
    new slice's excess share of poorly served query halves.

    With f the fraction of the new slice's query halves below the old slices' ``rule.quantile``
    score (taken on the worse half, since an expert needs both halves to match), the excess over
    the old baseline is e = (f − q) / (1 − q). No growth if e < ``rule.min_excess`` (or without
    old slices, when there is nothing to compare with); else K = max(1, round(n·e / (1 − e))),
    capped at ``rule.max_factor``·n.
    """
    rule = rule or GrowthRule()
    if old_x is None or len(old_x) == 0 or len(new_x) == 0:
        return 0
    mask, _ = poorly_served(layer, new_x, old_x, rule.quantile)
    f = float(mask.float().flatten(0, 1).mean(0).max())
    e = max(0.0, (f - rule.quantile) / (1 - rule.quantile))
    if e < rule.min_excess:
        return 0
    n = layer.num_subkeys
    cap = max(1, int(rule.max_factor * n))
    return min(cap, max(1, round(n * e / (1 - e))) if e < 1 else cap)


def place_subkeys(
    layer: PEER,
    query_halves: Sequence[Tensor] | Tensor,
    k: int,
    generator: torch.Generator | None = None,
    seed: int = 0,
    old_x: Tensor | None = None,
    budget: float = 0.05,
    steps_per_octave: int = 2,
) -> Tensor:
    """(k, 2, dim_key/2) new sub-keys at spherical ``faiss.Kmeans`` centroids of each half's query halves.

    ``query_halves``: two tensors (m_side, dim_key/2), the (poorly served) halves of each side, or
    one (m, 2, dim_key/2) tensor. A side with fewer than k halves keeps them all and fills the rest
    like ``PEER.grow`` does by default, from the existing sub-keys' per-dimension mean and std.

    Length: scores are inner products, so a key longer than the old ones would outscore them on
    old queries too. Each key gets the median length of its half's existing sub-keys, or, with a
    sample of old-slice layer inputs ``old_x``, the longest length (at most that median) at which
    the k keys of a side together enter the top-k of at most ``budget`` of the old (token, head)
    retrievals (``_safe_norms``, trying ``steps_per_octave`` lengths per halving over 8 halvings).
    """
    if isinstance(query_halves, Tensor):
        query_halves = query_halves.unbind(1)
    if len(query_halves) != 2:
        raise ValueError("place_subkeys(): need the query halves of both sides")
    old = layer.subkeys.detach().float().cpu()  # (n, 2, half)
    half = old.shape[-1]
    out = torch.empty(k, 2, half)
    for side, pts in enumerate(query_halves):
        pts = F.normalize(pts.detach().float().cpu().reshape(-1, half), dim=-1)
        if len(pts) >= k:
            km = faiss.Kmeans(half, k, niter=20, nredo=5, seed=seed, spherical=True, min_points_per_centroid=1)
            km.train(_np(pts))
            dirs = torch.from_numpy(km.centroids).float()
        else:
            mean, std = old[:, side].mean(0), old[:, side].std(0) if len(old) > 1 else old[:, side].abs()[0]
            fill = mean + std * torch.randn(k - len(pts), half, generator=generator)
            dirs = torch.cat([pts, F.normalize(fill, dim=-1)])
        out[:, side] = F.normalize(dirs, dim=-1) * old[:, side].norm(dim=-1).median()
    if old_x is not None and len(old_x):
        norms = _safe_norms(layer, out, old_x, budget, steps=8 * steps_per_octave, per_octave=steps_per_octave)
        out = out * norms[:, :, None] / out.norm(dim=-1, keepdim=True)
    return out.to(layer.subkeys)


def _safe_norms(layer: PEER, new: Tensor, old_x: Tensor, budget: float, steps: int = 16, per_octave: int = 2) -> Tensor:
    """(k, 2) lengths for new sub-keys ``new`` (k, 2, half): per side, the longest of
    len·2^(-i/``per_octave``), i < ``steps``, at which at most ``budget`` of old (token, head) pairs get
    a new expert — where none does, the longest of those letting in the fewest.

    A new sub-key d on side 1 brings experts (d, j); the best of them scores q1·d + best2, and it
    enters the top-k iff that beats the k-th old score: q1·d > kth − best2 =: margin. (Pairs of two
    new sub-keys are ignored here; ``changed_fraction`` measures everything.)
    """
    c = layer.config
    half = c.dim_key // 2
    with _eval(layer):
        q = layer.queries(old_x.reshape(-1, c.dim)).float().cpu()  # (T, h, dk)
        kth = layer.retrieve(old_x)[0][..., -1].float().cpu()  # (T, h): the last generation's k-th score
    best = coverage(layer, old_x)  # (T, h, 2)
    lengths = new.norm(dim=-1)  # (k, 2)
    out = torch.empty_like(lengths)
    factors = 2 ** (-torch.arange(steps) / per_octave)  # (S,) 1, 0.71, 0.5, … (per_octave 2)
    for side in range(2):
        margin = (kth - best[..., 1 - side]).flatten()  # (T·h,)
        proj = q[..., side * half : (side + 1) * half].reshape(-1, half) @ F.normalize(new[:, side], dim=-1).T
        # intruded[s, t]: some new key of this side, at length factor s, enters pair t's top-k
        scaled = proj[None] * (lengths[:, side] * factors[:, None])[:, None, :]  # (S, T·h, k)
        intruded = (scaled > margin[None, :, None]).any(-1).float().mean(-1)  # (S,)
        ok = (intruded <= budget).nonzero()
        out[:, side] = lengths[:, side] * factors[ok[0, 0] if len(ok) else int(intruded.argmin())]
    return out


def changed_fraction(before: Tensor, after: Tensor, per: Literal["token", "head"] = "token") -> float:
    """Fraction of tokens whose retrieved expert set changed in any head (``per="head"``: of
    (token, head) pairs whose set changed); ids (T, heads, S) before and after a growth. A growth that
    adds a generation (``PEER.grow(generation_topk=...)``) appends slots: the slots that existed
    before are compared."""
    if before.numel() == 0:
        return 0.0
    after = after[..., : before.shape[-1]]
    diff = (before.sort(dim=-1).values != after.sort(dim=-1).values).any(dim=-1)  # (T, h)
    return float((diff.any(dim=-1) if per == "token" else diff).float().mean())


#: How ``grow_model`` adds experts (``TrainConfig.grow_mode``; issue 16, "function-preserving growth"):
#: ``exact`` — a new generation with its own retrieval (``PEER.grow(generation_topk=...)``): old routing
#: and gates untouched, new v = 0, so the function is exactly unchanged; sub-keys at k-means centroids
#: of the new slice's query halves. ``safe`` — new sub-keys join the shared retrieval, k-means placed
#: and shortened (8 lengths per halving) until they enter none of the sampled old retrievals: approximate.
#: ``budget`` — the earlier behaviour: the same, shortened only until at most ``GrowthRule.budget`` (5%)
#: of old retrievals take a new expert (2 lengths per halving).
GROW_MODES = ("exact", "safe", "budget")


def grow_model(
    model,
    k: int | Literal["auto"],
    new_inputs: dict[int, Tensor] | None = None,
    old_inputs: dict[int, Tensor] | None = None,
    placement: Literal["kmeans", "random"] = "kmeans",
    layer: int | None = None,
    rule: GrowthRule | None = None,
    seed: int = 0,
    mode: str = "budget",
    generation_topk: int | None = None,
    generation_gate: str = "own",
) -> list[dict]:
    """Grow every PEER layer (or the ``layer``-th) of ``model``; returns one report per layer.

    ``mode``: one of ``GROW_MODES``. ``generation_topk``: experts per head each new generation
    retrieves in mode ``exact`` (default: the layer's topk; fewer cost less, see ``PEERConfig.slots``);
    ``generation_gate``: how they are weighted (``PEERConfig.generation_gate``).

    ``k``: sub-keys per half, or ``"auto"`` (``decide_growth`` per layer, needs both inputs).
    ``new_inputs`` / ``old_inputs``: per layer position, sampled layer inputs of the new slice and
    of the old slices (``collect_usage(..., sample_inputs=m)["inputs"]``). With ``placement``
    ``kmeans`` and new inputs, new sub-keys go to centroids of the poorly served new halves,
    otherwise they are drawn at random (``PEER.grow``'s default). Each report: layer, k,
    subkeys/experts before and after, poorly_served_new (fraction, worse half), placement,
    ``changed_old`` — the fraction of old-slice tokens whose retrieved set the growth changed
    (should be small) — and ``new_hit``: the fraction of new-slice tokens now retrieving a new expert
    (in mode ``exact`` every token does, through the new generation: 1).
    """
    if mode not in GROW_MODES:
        raise ValueError(f"grow mode must be one of {', '.join(GROW_MODES)}; got {mode!r}")
    rule = rule or GrowthRule()
    layers = model.peer_layers()
    positions = range(len(layers)) if layer is None else [layer]
    generator = torch.Generator().manual_seed(seed)
    reports = []
    for pos in positions:
        peer = layers[pos]
        new_x = (new_inputs or {}).get(pos)
        old_x = (old_inputs or {}).get(pos)
        if k == "auto":
            if new_x is None:
                raise UserError(f"--grow auto needs a sample of the new slice's inputs for PEER layer {pos}")
            num = decide_growth(peer, new_x, old_x, rule)
        else:
            num = int(k)
        report = {"layer": pos, "k": num, "subkeys_before": peer.num_subkeys, "experts_before": peer.num_experts}
        poor = None
        if new_x is not None:
            poor, _ = poorly_served(peer, new_x, old_x, rule.quantile)
            report["poorly_served_new"] = float(poor.float().flatten(0, 1).mean(0).max())
        subkeys = None
        if num > 0 and placement == "kmeans" and new_x is not None:
            half = peer.config.dim_key // 2
            with _eval(peer):
                q = peer.queries(new_x)  # (T, h, dk)
            if mode == "exact":  # a retrieval of its own: serve all of the new slice, old tokens are not at stake
                halves = [q[..., s * half : (s + 1) * half] for s in range(2)]
                subkeys = place_subkeys(peer, halves, num, generator, seed)
            else:
                halves = [q[..., s * half : (s + 1) * half][poor[..., s]] for s in range(2)]
                budget, per_octave = (0.0, 8) if mode == "safe" else (rule.budget, 2)
                subkeys = place_subkeys(peer, halves, num, generator, seed, old_x, budget, per_octave)
        before_old = retrieved_ids(peer, old_x)
        if num > 0:
            exact = mode == "exact"
            gen_k = (generation_topk or peer.config.topk) if exact else None
            gate = generation_gate if exact else None
            model.grow(
                num, layer=pos, subkeys=subkeys, generator=generator, generation_topk=gen_k, generation_gate=gate
            )
        report |= {
            "subkeys_after": peer.num_subkeys,
            "experts_after": peer.num_experts,
            "placement": "kmeans" if subkeys is not None else "random",
            "mode": mode,
            "changed_old": changed_fraction(before_old, retrieved_ids(peer, old_x)) if old_x is not None else None,
            "new_hit": new_hit(peer, new_x, report["experts_before"]) if new_x is not None else None,
        }
        reports.append(report)
    return reports


@torch.no_grad()
def _nats(model, windows: Tensor, batch_size: int = 16) -> float:
    """Summed NLL (nats) of ``model`` on token windows (n, T + 1), in eval mode."""
    device = next(model.parameters()).device
    total = 0.0
    with _eval(model):
        for chunk in windows.split(batch_size):
            chunk = chunk.to(device)
            logits, _ = model(chunk[:, :-1])
            total += float(F.cross_entropy(logits.flatten(0, 1).float(), chunk[:, 1:].flatten(), reduction="sum"))
    return total


def growth_shock(
    model,
    grow: Callable[[], T],
    old_windows: dict[str, Tensor],
    bytes_per_token: dict[str, float] | None = None,
) -> tuple[T, dict]:
    """Run ``grow()`` — a growth of ``model`` in place — and measure its shock: the change of each old
    slice's loss right after growth, before any training step (issue 16: function-preserving growth).

    ``old_windows``: per old slice, held-out token windows (n, T + 1); ``bytes_per_token``: per slice,
    its held-out bytes per token (default 1, the byte tokenizer). The model is scored on them in eval
    mode before and after ``grow()`` — the same as comparing with an un-grown copy. Returns (what
    ``grow()`` returned, shock): ``per_slice_bpb`` {slice: after − before, bits per byte; positive = worse},
    ``max_bpb`` = max over slices of |change| (the target: ≤ 0.002), ``mean_bpb`` = mean change;
    ``max_bpb`` and ``mean_bpb`` are None without old slices.
    """
    before = {name: _nats(model, w) for name, w in old_windows.items()}
    out = grow()
    per_slice = {}
    for name, w in old_windows.items():
        num_bytes = w[:, 1:].numel() * (bytes_per_token or {}).get(name, 1.0)
        per_slice[name] = (_nats(model, w) - before[name]) / (max(num_bytes, 1e-9) * math.log(2))
    changes = list(per_slice.values())
    shock = {
        "max_bpb": max((abs(c) for c in changes), default=None),
        "mean_bpb": sum(changes) / len(changes) if changes else None,
        "per_slice_bpb": per_slice,
    }
    return out, shock


def retrieved_ids(layer: PEER, x: Tensor | None) -> Tensor:
    """Expert ids (T, heads, topk) the layer retrieves for inputs x (T, dim), in eval mode; empty for None."""
    if x is None:
        return torch.zeros(0, dtype=torch.long)
    with _eval(layer):
        return layer.retrieve(x)[1]


def new_hit(layer: PEER, x: Tensor, first_new_id: int) -> float:
    """Fraction of tokens (inputs x (T, dim)) retrieving at least one expert with id ≥ ``first_new_id``."""
    ids = retrieved_ids(layer, x)
    return float((ids >= first_new_id).flatten(1).any(dim=1).float().mean()) if len(ids) else 0.0


# --- freezing policies --------------------------------------------------------------------------------


@dataclass(frozen=True)
class FreezePolicy:
    """A parsed freezing policy; ``str()`` gives back its text form."""

    kind: Literal["none", "all-old", "usage", "tfidf"]
    """none | all-old | usage (freeze the experts carrying the top P% of old mass) | tfidf (train the top T)."""
    value: float = 0.0
    """P (percent, 0 < P ≤ 100) for usage, T (experts, a positive integer) for tfidf."""

    def __str__(self) -> str:
        if self.kind == "usage":
            return f"usage:{self.value:g}"
        if self.kind == "tfidf":
            return f"tfidf:{int(self.value)}"
        return self.kind


POLICY_HELP = "none | all-old | usage:P (0<P≤100) | tfidf:T (T>0 experts)"


def parse_policy(text: str | FreezePolicy) -> FreezePolicy:
    """Parse ``none``, ``all-old``, ``usage:P`` or ``tfidf:T``; anything else raises ``UserError``."""
    if isinstance(text, FreezePolicy):
        return text
    spec = str(text).strip().lower()
    if spec in ("none", "all-old"):
        return FreezePolicy(spec)  # type: ignore[arg-type]
    kind, _, arg = spec.partition(":")
    try:
        if kind == "usage":
            p = float(arg)
            if 0 < p <= 100:
                return FreezePolicy("usage", p)
        elif kind == "tfidf":
            t = int(arg)
            if t > 0:
                return FreezePolicy("tfidf", t)
    except ValueError:
        pass
    raise UserError(f"invalid freezing policy {text!r}; expected {POLICY_HELP}")


def tfidf_scores(
    ledger: UsageLedger,
    layer: int,
    new_slice: str,
    old_slices: Sequence[str],
    background: tuple[Tensor, int] | None = None,
) -> tuple[Tensor, Tensor]:
    """(ids, scores) over the experts ``new_slice`` retrieved: Sparse Memory Finetuning's TF-IDF.

    tf = the expert's retrievals on the new slice / all its retrievals there; idf =
    log((D + 1) / (df + 1)) with df the number of the D background documents that retrieved it.
    ``background``: (df (N,) int, D) from ``document_frequency`` over the base model's data — Lin et
    al. 2025's fixed background batches; without it the documents are the old slices (the earlier
    behaviour). High: used by the new slice, rarely in the background.
    """
    new = ledger.get(new_slice, layer)
    tf = new.counts.double() / max(int(new.counts.sum()), 1)
    if background is not None:
        bg_df, docs = background
        keep = new.ids < len(bg_df)
        df = torch.zeros(len(new.ids), dtype=torch.float64)
        df[keep] = bg_df[new.ids[keep]].double()
    else:
        docs = len(old_slices)
        df = torch.zeros(len(new.ids), dtype=torch.float64)
        for name in old_slices:
            df += torch.isin(new.ids, ledger.get(name, layer).ids).double()
    idf = torch.log(torch.tensor(docs + 1.0, dtype=torch.float64) / (df + 1))
    return new.ids, tf * idf


def document_frequency(model, windows: Tensor, batch_size: int = 16) -> dict[int, tuple[Tensor, int]]:
    """Per PEER-layer position: (df (N,) int64, D): in how many of the D token ``windows`` (D, T) each
    expert was retrieved at least once — SMF's background statistics (Lin et al. 2025), in eval mode."""
    layers = model.peer_layers()
    df = {pos: torch.zeros(p.num_experts, dtype=torch.long) for pos, p in enumerate(layers)}
    rows = [0]

    def hook(pos: int):
        def fn(module: PEER, args: tuple, output: Tensor) -> None:
            ids = module.retrieve(args[0].reshape(-1, module.config.dim))[1].reshape(rows[0], -1).cpu()
            seen = torch.zeros(rows[0], module.num_experts, dtype=torch.bool).scatter_(1, ids, True)
            df[pos] += seen.sum(0)

        return fn

    handles = [layer.register_forward_hook(hook(pos)) for pos, layer in enumerate(layers)]
    device = next(model.parameters()).device
    try:
        with _eval(model):
            for start in range(0, len(windows), batch_size):
                chunk = windows[start : start + batch_size]
                rows[0] = len(chunk)
                model(chunk.to(device))
    finally:
        for h in handles:
            h.remove()
    return {pos: (counts, len(windows)) for pos, counts in df.items()}


def freeze_ids(
    policy: str | FreezePolicy,
    layer_obj: PEER,
    ledger: UsageLedger,
    layer: int,
    new_slice: str | None,
    old_slices: Sequence[str],
    existed_before: int,
    background: tuple[Tensor, int] | None = None,
) -> Tensor:
    """The expert ids (ascending int64) ``policy`` freezes in one layer before training on ``new_slice``.

    Policies only ever freeze *old* experts, ids < ``existed_before`` (N before this phase's
    growth); experts grown this phase stay trainable.

    * ``none``: nothing. ``all-old``: every old expert.
    * ``usage:P``: the fewest old experts whose router mass, summed over ``old_slices``, reaches
      P% of the total (largest first, ties by id).
    * ``tfidf:T``: every old expert except the T with the highest ``tfidf_scores`` among those the
      new slice retrieved (ties: higher tf, then lower id) — only those are trained. Without
      growth this is Sparse Memory Finetuning's selection. Needs the new slice's usage in the ledger
      (recorded on its training data before the phase); ``background``: ``tfidf_scores``'.
    """
    p = parse_policy(policy)
    existed_before = min(existed_before, layer_obj.num_experts)
    if p.kind == "none":
        return torch.zeros(0, dtype=torch.long)
    if p.kind == "all-old":
        return torch.arange(existed_before)
    if p.kind == "usage":
        usage = ledger.total(layer, old_slices)
        keep = usage.ids < existed_before
        ids, mass = usage.ids[keep], usage.mass[keep]
        if mass.sum() <= 0:
            return torch.zeros(0, dtype=torch.long)
        order = _ranked(ids, mass)
        cum = mass[order].cumsum(0)
        target = p.value / 100 * float(cum[-1])
        count = int(torch.searchsorted(cum, torch.tensor([target * (1 - 1e-12)], dtype=cum.dtype))[0]) + 1
        return ids[order[: min(count, len(order))]].sort().values
    # tfidf
    if new_slice is None or ledger.get(new_slice, layer).ids.numel() == 0:
        raise UserError(
            f"tfidf freezing needs the usage of the new slice {new_slice!r} on PEER layer {layer}; none recorded"
        )
    ids, scores = tfidf_scores(ledger, layer, new_slice, old_slices, background)
    tf = ledger.get(new_slice, layer).counts.double()
    order = _ranked(ids, scores, tf)
    trained = ids[order[: int(p.value)]]
    frozen = torch.ones(existed_before, dtype=torch.bool)
    frozen[trained[trained < existed_before]] = False
    return frozen.nonzero().flatten()


def _ranked(ids: Tensor, key: Tensor, tiebreak: Tensor | None = None) -> Tensor:
    """Positions sorting by ``key`` descending, then ``tiebreak`` descending, then id ascending."""
    order = ids.argsort(stable=True)
    if tiebreak is not None:
        order = order[tiebreak[order].argsort(descending=True, stable=True)]
    return order[key[order].argsort(descending=True, stable=True)]


def set_frozen(layer: PEER, ids: Tensor, subkeys: bool = False) -> None:
    """Make the layer's frozen set exactly ``ids`` (and, with ``subkeys``, exactly their sub-keys)."""
    layer.frozen.zero_()
    layer.frozen_subkeys.zero_()
    layer.freeze(ids, subkeys=subkeys)


def freeze_model(
    model,
    policy: str | FreezePolicy,
    ledger: UsageLedger,
    new_slice: str | None,
    old_slices: Sequence[str],
    existed_before: Sequence[int] | None = None,
    subkeys: bool = False,
    background: dict[int, tuple[Tensor, int]] | None = None,
) -> list[dict]:
    """Apply ``policy`` to every PEER layer (``set_frozen``); one report per layer.

    ``existed_before``: N of each layer before this phase's growth (default: the current N).
    ``background``: per layer, ``document_frequency`` of the base's data (``tfidf:T``'s idf).
    Reports: layer, policy, frozen, frozen_pct, frozen_subkeys_pct, trainable.
    """
    reports = []
    for pos, layer in enumerate(model.peer_layers()):
        before = layer.num_experts if existed_before is None else existed_before[pos]
        bg = background.get(pos) if background else None
        ids = freeze_ids(policy, layer, ledger, pos, new_slice, old_slices, before, bg)
        set_frozen(layer, ids, subkeys=subkeys)
        reports.append(frozen_report(pos, layer, str(parse_policy(policy))))
    return reports


def frozen_report(pos: int, layer: PEER, policy: str) -> dict:
    """What is frozen in one layer: layer, policy, frozen, frozen_pct, frozen_subkeys_pct, trainable."""
    frozen = int(layer.frozen.sum())
    return {
        "layer": pos,
        "policy": policy,
        "frozen": frozen,
        "frozen_pct": 100.0 * frozen / layer.num_experts,
        "frozen_subkeys_pct": 100.0 * float(layer.frozen_subkeys.float().mean()),
        "trainable": layer.num_experts - frozen,
    }


# --- inspection (``lpeer inspect``) -----------------------------------------------------------------


def inspect_model(model, ledger: UsageLedger, layer: int | None = None) -> dict:
    """Per PEER layer (or just ``layer``): ``layer_stats`` over all slices, sub-keys, frozen sub-keys,
    and the Jaccard ``overlap`` of every pair of slices. JSON-able: ``{"layers": [...]}``."""
    layers = model.peer_layers()
    out = []
    for pos in range(len(layers)) if layer is None else [layer]:
        if not 0 <= pos < len(layers):
            raise UserError(f"PEER layer {pos} does not exist; this model has {len(layers)} (0..{len(layers) - 1})")
        peer = layers[pos]
        stats = {"layer": pos, "num_subkeys": peer.num_subkeys}
        stats |= layer_stats(ledger, pos, peer.num_experts, peer.frozen.cpu())
        stats["frozen_subkeys_pct"] = 100.0 * float(peer.frozen_subkeys.float().mean())
        names = ledger.slices()
        stats["overlap"] = {a: {b: overlap(ledger, pos, a, b) for b in names} for a in names}
        out.append(stats)
    return {"layers": out}


def inspect_expert(model, ledger: UsageLedger, layer: int, expert: int, k: int = 5) -> dict:
    """One expert: its sub-key pair (i, j), frozen flag, each slice's use of it, its ``k`` nearest
    experts by key (cosine, ``ExpertIndex``)."""
    layers = model.peer_layers()
    if not 0 <= layer < len(layers):
        raise UserError(f"PEER layer {layer} does not exist; this model has {len(layers)}")
    peer = layers[layer]
    if not 0 <= expert < peer.num_experts:
        raise UserError(f"expert {expert} does not exist; PEER layer {layer} has ids 0..{peer.num_experts - 1}")
    i, j = pair_of(torch.tensor(expert))
    slices = {}
    for name in ledger.slices():
        u = ledger.get(name, layer)
        hit = (u.ids == expert).nonzero().flatten()
        if len(hit):
            slices[name] = {"count": int(u.counts[hit[0]]), "mass": float(u.mass[hit[0]])}
    scores, ids = ExpertIndex(peer, kind="keys").nearest(torch.tensor([expert]), k=min(k, peer.num_experts - 1))
    return {
        "layer": layer,
        "id": expert,
        "pair": [int(i), int(j)],
        "frozen": bool(peer.frozen[expert]),
        "slices": slices,
        "nearest": [{"id": int(e), "score": float(sc)} for e, sc in zip(ids[0], scores[0], strict=True) if e >= 0],
    }


def inspect_text(model, tokens: Tensor, layer: int | None = None) -> dict:
    """Which experts each head retrieves for each token of ``tokens`` (T,) int, and their gates.

    ``{"layers": [{"layer", "ids": (T, heads, topk) nested lists, "gates": same}]}`` — eval mode.
    """
    layers = model.peer_layers()
    seen: dict[int, tuple[Tensor, Tensor]] = {}

    def hook(pos: int):
        def fn(module: PEER, args: tuple, output: Tensor) -> None:
            scores, ids = module.retrieve(args[0].reshape(-1, module.config.dim))
            seen[pos] = (ids, module.gates(scores))

        return fn

    positions = range(len(layers)) if layer is None else [layer]
    handles = [layers[pos].register_forward_hook(hook(pos)) for pos in positions]
    try:
        with _eval(model):
            model(tokens.reshape(1, -1).to(next(model.parameters()).device))
    finally:
        for h in handles:
            h.remove()
    return {
        "layers": [
            {"layer": pos, "ids": seen[pos][0].tolist(), "gates": seen[pos][1].float().cpu().tolist()}
            for pos in positions
        ]
    }


# --- FAISS over expert vectors ------------------------------------------------------------------------

VectorKind = Literal["keys", "u", "v"]


def expert_vectors(layer: PEER, kind: VectorKind = "keys", ids: Tensor | None = None) -> Tensor:
    """(m, d) float32 vectors of experts ``ids`` (default all): keys [c_i; c'_j] (Eq. 4), or u / v rows."""
    ids = torch.arange(layer.num_experts) if ids is None else ids.long().cpu()
    with torch.no_grad():
        if kind == "keys":
            i, j = pair_of(ids)
            sk = layer.subkeys.detach().float().cpu()
            return torch.cat([sk[i, 0], sk[j, 1]], dim=-1)
        if kind in ("u", "v"):
            return getattr(layer, kind.upper()).detach().float().cpu()[ids]
    raise ValueError(f"expert vector kind must be keys, u or v; got {kind!r}")


class ExpertIndex:
    """FAISS index over one layer's expert vectors: nearest experts and near-duplicates.

    Exact ``IndexFlatIP`` below ``exact_below`` experts, else ``IndexIVFFlat`` with ``nlist`` ≈ 4√m
    lists (trained on the vectors themselves) probing ``nprobe`` of them — approximate; nprobe =
    nlist is exact. ``metric="cosine"`` normalises the vectors, ``"ip"`` uses raw inner products (the
    retrieval score for keys). On a GPU when faiss has one (``use_gpu`` None: auto); range search
    for ``duplicates`` runs on the CPU copy (FAISS GPU indexes have none).
    """

    def __init__(
        self,
        layer: PEER,
        kind: VectorKind = "keys",
        ids: Tensor | None = None,
        metric: Literal["cosine", "ip"] = "cosine",
        exact_below: int = 1 << 16,
        nlist: int | None = None,
        nprobe: int = 16,
        use_gpu: bool | None = None,
    ):
        ids = torch.arange(layer.num_experts) if ids is None else ids.long().cpu().unique()
        vectors = expert_vectors(layer, kind, ids)
        if metric == "cosine":
            vectors = F.normalize(vectors, dim=-1)
        elif metric != "ip":
            raise ValueError(f"metric must be cosine or ip, got {metric!r}")
        self.ids, self.vectors, self.metric = ids, vectors, metric
        m, d = vectors.shape
        if m < exact_below:
            index = faiss.IndexFlatIP(d)
        else:
            nlist = nlist or max(1, int(4 * math.sqrt(m)))
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
            index.train(_np(vectors))
            index.nprobe = min(nprobe, nlist)
        index.add(_np(vectors))
        self.cpu_index = index
        self.index = index
        self._gpu_resources = None
        if (use_gpu is None or use_gpu) and faiss_gpus() > 0:
            self._gpu_resources = faiss.StandardGpuResources()
            self.index = faiss.index_cpu_to_gpu(self._gpu_resources, 0, index)
        elif use_gpu:
            raise UserError("a GPU index was requested but FAISS sees no GPU (install faiss-gpu and check CUDA)")

    def _rows(self, expert_ids: Tensor) -> Tensor:
        rows = torch.searchsorted(self.ids, expert_ids)
        if (rows >= len(self.ids)).any() or (self.ids[rows.clamp(max=len(self.ids) - 1)] != expert_ids).any():
            raise UserError("expert id not in this index")
        return rows

    def _map(self, rows: Tensor) -> Tensor:
        return torch.where(rows >= 0, self.ids[rows.clamp(min=0)], rows)

    def nearest(self, query: Tensor, k: int = 5) -> tuple[Tensor, Tensor]:
        """(scores, expert ids), each (m, k), best first; ids -1 where fewer were found.

        ``query``: expert ids (m,) int — their own id is left out of their results — or vectors
        (m, d) float in the indexed space (normalised here for cosine).
        """
        if query.dtype in (torch.int32, torch.int64):
            query = query.long().flatten().cpu()
            vectors = self.vectors[self._rows(query)]
            scores, rows = self.index.search(_np(vectors), min(k + 1, len(self.ids)))
            scores, ids = torch.from_numpy(scores), self._map(torch.from_numpy(rows).long())
            # drop each query's own id (wherever it ranks; ties may put it second)
            order = (ids == query[:, None]).int().argsort(dim=1, stable=True)[:, :k]
            return scores.gather(1, order), ids.gather(1, order)
        vectors = F.normalize(query.float(), dim=-1) if self.metric == "cosine" else query.float()
        scores, rows = self.index.search(_np(vectors), min(k, len(self.ids)))
        return torch.from_numpy(scores), self._map(torch.from_numpy(rows).long())

    def duplicates(self, threshold: float) -> tuple[Tensor, Tensor]:
        """Pairs of experts with similarity > ``threshold``: (pairs (P, 2) ids a < b, scores (P,)), by score."""
        lims, scores, rows = self.cpu_index.range_search(_np(self.vectors), float(threshold))
        lims = torch.from_numpy(lims.astype(np.int64))
        a = torch.repeat_interleave(torch.arange(len(self.ids)), lims[1:] - lims[:-1])
        b = torch.from_numpy(rows).long()
        scores = torch.from_numpy(scores)
        keep = a < b
        pairs = torch.stack([self.ids[a[keep]], self.ids[b[keep]]], dim=1)
        scores = scores[keep]
        order = scores.argsort(descending=True, stable=True)
        return pairs[order], scores[order]


# --- run-level commands (``lpeer inspect``, ``lpeer grow``, ``lpeer freeze``) ---------------------------
#
# Each takes an opened run (``lifelong_peer.train.open_run``), loads the model and ledger of its last
# finished phase (``Run.load_latest``), checks every argument before doing any work, and returns a
# JSON-able dict. ``grow_run`` and ``freeze_run`` publish the edited model with ``Run.save_edit``.


def _run_layers(run) -> list[PEER]:
    layers = run.model.peer_layers()
    if not layers:
        raise UserError(f"run {run.config.run!r} has no PEER layers (a dense model); nothing to inspect or edit")
    return layers


def _positions(layers: Sequence[PEER], layer: int | None) -> list[int]:
    """The PEER-layer positions a command acts on: all, or ``layer`` after a range check."""
    if layer is None:
        return list(range(len(layers)))
    if not 0 <= layer < len(layers):
        raise UserError(f"PEER layer {layer} does not exist; this model has {len(layers)} (0..{len(layers) - 1})")
    return [layer]


def _check_ids(layers: Sequence[PEER], positions: Sequence[int], ids: Tensor) -> None:
    for pos in positions:
        n = layers[pos].num_experts
        bad = ids[(ids < 0) | (ids >= n)]
        if len(bad):
            raise UserError(f"expert {int(bad[0])} does not exist; PEER layer {pos} has ids 0..{n - 1}")


def _trained_slices(run, exclude: str | None = None) -> list[str]:
    """The slices the run's model has finished training on (in time order), less ``exclude``."""
    done = run.config.slices[: run.state()["completed_phases"]]
    return [s for s in done if s != exclude]


def _check_slice(run, slice_name: str | None) -> None:
    if slice_name is not None:
        run.stream.slice(slice_name)  # UserError naming the stream's slices


def _layer_inputs(run, slices: Sequence[str], split: str, sample: int, generator: torch.Generator) -> dict | None:
    """Sampled PEER-layer inputs {position: (m, dim)} over ``split`` windows of ``slices`` (None if none)."""
    if not slices:
        return None
    budget = run.config.train.usage_tokens
    parts: dict[int, list[Tensor]] = {}
    for name in slices:  # one pass per slice: a short split gives shorter windows than the others
        windows = run.windows(name, split, max(budget // len(slices), 1))[:, :-1]
        got = collect_usage(run.model, windows, None, sample_inputs=max(sample // len(slices), 1), generator=generator)
        for pos, x in got["inputs"].items():
            parts.setdefault(pos, []).append(x)
    return {pos: torch.cat(xs) for pos, xs in parts.items()}


def inspect_run(
    run, layer: int | None = None, expert: int | None = None, text: str | None = None, nearest: int = 5
) -> dict:
    """``lpeer inspect``: per-layer usage (``inspect_model``), one expert (``inspect_expert``, in every
    layer or just ``layer``), or what each head retrieves for ``text`` (``inspect_text``).

    Returns ``{"run", "phase", "mode": "layers"|"expert"|"text", ...}``: mode layers adds
    ``layers`` (per layer: num_experts, frozen, usage_pct, kl_unevenness, dead, top, slices,
    overlap, ...); expert adds ``experts`` (one per layer); text adds ``tokens``, ``pieces`` (each
    token decoded), ``truncated`` (the text was cut to the model's context) and ``layers`` (ids,
    gates: (T, heads, topk) nested lists).
    """
    if expert is not None and text is not None:
        raise UserError("give either --expert ID or --text TEXT, not both")
    loaded = run.load_latest()
    layers = _run_layers(run)
    positions = _positions(layers, layer)
    head = {"run": run.config.run, "phase": loaded["phase"]}
    if expert is not None:
        _check_ids(layers, positions, torch.tensor([expert]))
        experts = [inspect_expert(run.model, run.ledger, pos, expert, k=nearest) for pos in positions]
        return head | {"mode": "expert", "experts": experts}
    if text is not None:
        tokenizer = run.stream.tokenizer
        tokens = list(tokenizer.encode(text))
        if not tokens:
            raise UserError("--text is empty; give some text to look up")
        context = run.model.config.context
        truncated = len(tokens) > context
        tokens = tokens[:context]
        out = inspect_text(run.model, torch.tensor(tokens), layer)
        pieces = [tokenizer.decode([t]) for t in tokens]
        return head | {"mode": "text", "tokens": tokens, "pieces": pieces, "truncated": truncated} | out
    return head | {"mode": "layers"} | inspect_model(run.model, run.ledger, layer)


def grow_run(
    run,
    subkeys: int | None = None,
    auto: bool = False,
    slice_name: str | None = None,
    layer: int | None = None,
    sample_inputs: int = 4096,
) -> dict:
    """``lpeer grow``: add ``subkeys`` sub-keys per half (or, with ``auto``, as many as
    ``decide_growth`` finds the new slice ``slice_name`` needs) to every PEER layer or ``layer``.

    As the phase loop does (``train.grow_and_freeze``): with a slice, layer inputs sampled from its
    train split place the new sub-keys (``grow_model``, k-means on poorly served query halves);
    without one they are drawn at random. Inputs sampled from the trained slices' validation
    splits measure ``changed_old``. The model is saved (``Run.save_edit``) only if some layer grew.
    Returns ``{"run", "phase", "slice", "old_slices", "checkpoint" (None if nothing grew), "layers"}``.
    """
    if auto == (subkeys is not None):
        raise UserError("give either --subkeys K or --auto --slice S")
    if subkeys is not None and subkeys <= 0:
        raise UserError(f"--subkeys must be a positive number of sub-keys per half, got {subkeys}")
    if auto and slice_name is None:
        raise UserError("--auto needs --slice S: the new slice whose coverage decides how much to grow")
    _check_slice(run, slice_name)
    loaded = run.load_latest()
    layers = _run_layers(run)
    _positions(layers, layer)
    seed = run.config.train.seed * 1_000_003 + sum(p.num_experts for p in layers)  # repeated grows differ
    generator = torch.Generator().manual_seed(seed)
    old = _trained_slices(run, exclude=slice_name)
    new_inputs = _layer_inputs(run, [slice_name] if slice_name else [], "train", sample_inputs, generator)
    old_inputs = _layer_inputs(run, old, "validation", sample_inputs, generator)
    reports = grow_model(run.model, "auto" if auto else subkeys, new_inputs, old_inputs, layer=layer, seed=seed)
    out = {"run": run.config.run, "phase": loaded["phase"], "slice": slice_name, "old_slices": old}
    checkpoint = None
    if any(r["k"] > 0 for r in reports):
        edit = {"command": "grow", "subkeys": "auto" if auto else subkeys, "slice": slice_name, "layers": reports}
        checkpoint = str(run.save_edit(edit))
    return out | {"checkpoint": checkpoint, "layers": reports}


def parse_expert_ids(text: str) -> Tensor | None:
    """``all`` → None; ``3,7,10-12`` → tensor([3, 7, 10, 11, 12]) (sorted, unique); else UserError."""
    spec = text.strip().lower()
    if spec == "all":
        return None
    ids: list[int] = []
    try:
        for part in spec.split(","):
            lo, dash, hi = part.strip().partition("-")
            a, b = int(lo), int(hi) if dash else int(lo)
            if a < 0 or b < a:
                raise ValueError
            ids.extend(range(a, b + 1))
    except ValueError:
        raise UserError(f"invalid expert ids {text!r}; expected all, or ids and ranges like 3,7,10-12") from None
    return torch.tensor(sorted(set(ids)), dtype=torch.long)


def freeze_run(
    run,
    policy: str | None = None,
    unfreeze: str | None = None,
    slice_name: str | None = None,
    subkeys: bool = False,
    layer: int | None = None,
) -> dict:
    """``lpeer freeze``: make every PEER layer's frozen set what ``policy`` says, or ``unfreeze``
    experts (``all`` or ids, in every layer or ``layer``); ``subkeys`` also (un)freezes their sub-keys.

    Policies (``freeze_model``) count every current expert as old and the trained slices (less
    ``slice_name``) as the old slices; ``tfidf:T`` ranks experts by ``slice_name``'s usage,
    recorded here on its train split as the phase loop does. Saves with ``Run.save_edit``.
    Returns ``{"run", "phase", "action", "checkpoint", "layers": [frozen_report, ...], "note"}``;
    ``note`` warns when the run's own policy will recompute the frozen set before its next phase.
    """
    if (policy is None) == (unfreeze is None):
        raise UserError("give either --policy POLICY or --unfreeze all|IDS")
    parsed = parse_policy(policy) if policy is not None else None
    ids = parse_expert_ids(unfreeze) if unfreeze is not None else None
    if parsed is not None and layer is not None:
        raise UserError("--layer applies to --unfreeze only; a --policy is applied to every PEER layer")
    if parsed is not None and parsed.kind == "tfidf" and slice_name is None:
        raise UserError(f"{parsed} ranks experts by a new slice's usage; give --slice S")
    _check_slice(run, slice_name)
    loaded = run.load_latest()
    layers = _run_layers(run)
    positions = _positions(layers, layer)
    if ids is not None:
        _check_ids(layers, positions, ids)
    if parsed is not None:
        action = str(parsed)
        ledger = UsageLedger()
        ledger.merge(run.ledger)  # a copy: the new slice's train usage is for ranking only, not saved
        if parsed.kind == "tfidf":
            windows = run.windows(slice_name, "train", run.config.train.usage_tokens)[:, :-1]
            collect_usage(run.model, windows, ledger, slice_name)
        old = _trained_slices(run, exclude=slice_name)
        reports = freeze_model(run.model, parsed, ledger, slice_name, old, subkeys=subkeys)
    else:
        action = f"unfreeze {unfreeze.strip()}"
        reports = []
        for pos in positions:
            peer = layers[pos]
            if ids is None:
                set_frozen(peer, torch.zeros(0, dtype=torch.long))
            else:
                peer.unfreeze(ids, subkeys=subkeys)
            reports.append(frozen_report(pos, peer, action))
    edit = {"command": "freeze", "action": action, "slice": slice_name, "subkeys": subkeys, "layers": reports}
    checkpoint = str(run.save_edit(edit))
    own = run.config.train.freeze
    note = (
        f"run {run.config.run!r} applies its own policy {own} before each phase, which recomputes this frozen set"
        if own != "none"
        else None
    )
    head = {"run": run.config.run, "phase": loaded["phase"], "action": action, "checkpoint": checkpoint}
    return head | {"layers": reports, "note": note}


__all__ = [
    "GROW_MODES",
    "ExpertIndex",
    "FreezePolicy",
    "GrowthRule",
    "Usage",
    "UsageLedger",
    "changed_fraction",
    "collect_usage",
    "coverage",
    "decide_growth",
    "document_frequency",
    "expert_vectors",
    "freeze_ids",
    "freeze_model",
    "freeze_run",
    "frozen_report",
    "grow_model",
    "grow_run",
    "growth_shock",
    "inspect_expert",
    "inspect_model",
    "inspect_run",
    "inspect_text",
    "kl_unevenness",
    "layer_stats",
    "new_hit",
    "overlap",
    "parse_expert_ids",
    "parse_policy",
    "place_subkeys",
    "poorly_served",
    "retrieved_ids",
    "set_frozen",
    "tfidf_scores",
    "top_experts",
]
