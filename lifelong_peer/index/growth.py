"""Coverage and growth: where the new slice is poorly served, how many sub-keys, where they go, and the growth shock (issue 16)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import faiss
import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import UserError
from ..peer import PEER
from .core import T, _eval, _np, _search_ip

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


def growth_need(layer: PEER, new_x: Tensor, old_x: Tensor | None, rule: GrowthRule | None = None) -> dict:
    """The measured need behind ``--grow auto`` in one layer (issue 24: growth on demand, and why).

    With f the fraction of the new slice's query halves below the old slices' ``rule.quantile``
    score (taken on the worse half, since an expert needs both halves to match), the need is the
    excess over the old baseline, e = (f − q) / (1 − q). No growth if e < ``rule.min_excess`` (or
    without old slices, when there is nothing to compare with); else K = max(1, round(n·e / (1 − e)))
    sub-keys per half, so that the new keys' share K / (n + K) equals e, capped at ``rule.max_factor``·n.
    Returns ``{"k", "need": e (None without old slices), "min_excess", "poorly_served_new": f}``.
    """
    rule = rule or GrowthRule()
    out = {"k": 0, "need": None, "min_excess": rule.min_excess, "poorly_served_new": None}
    if old_x is None or len(old_x) == 0 or len(new_x) == 0:
        return out
    mask, _ = poorly_served(layer, new_x, old_x, rule.quantile)
    f = float(mask.float().flatten(0, 1).mean(0).max())
    e = max(0.0, (f - rule.quantile) / (1 - rule.quantile))
    return out | {"need": e, "poorly_served_new": f, "k": subkeys_for_need(layer.num_subkeys, e, rule)}


def subkeys_for_need(n: int, need: float, rule: GrowthRule | None = None) -> int:
    """K sub-keys per half for a measured ``need`` in [0, 1]: 0 below ``rule.min_excess``, else the K whose share
    of the grown sub-keys, K / (n + K), equals the need — max(1, round(n·e / (1 − e))) — at most ``rule.max_factor``·n."""
    rule = rule or GrowthRule()
    if need < rule.min_excess:
        return 0
    cap = max(1, int(rule.max_factor * n))
    return min(cap, max(1, round(n * need / (1 - need))) if need < 1 else cap)


def loss_need(model, new_windows: Tensor, old_windows: dict[str, Tensor], bytes_per_token: dict[str, float]) -> dict:
    """How poorly the model serves a new slice, from its loss (issue 24: growth on demand): the new slice's bits
    per byte against the old slices' (token-weighted over them), need = max(0, 1 − old / new). A slice that
    repeats old data scores like the old slices (need ≈ 0, no growth); text the model never saw scores far
    worse. ``new_windows`` (n, T+1) are keyed ``"new"`` in ``bytes_per_token``. Returns {new_bpb, old_bpb, need,
    old_per_slice: {name: bpb}} (need None without old slices)."""
    bpb = lambda name, w: model.nll(w)[0] / (w[:, 1:].numel() * bytes_per_token.get(name, 1.0) * math.log(2))  # noqa: E731
    new = bpb("new", new_windows)
    if not old_windows:
        return {"new_bpb": new, "old_bpb": None, "need": None, "old_per_slice": {}}
    weights = {name: w[:, 1:].numel() for name, w in old_windows.items()}
    per_slice = {name: bpb(name, w) for name, w in old_windows.items()}
    old = sum(per_slice[name] * weights[name] for name in old_windows) / max(sum(weights.values()), 1)
    need = max(0.0, 1 - old / new) if new > 0 else 0.0
    return {"new_bpb": new, "old_bpb": old, "need": need, "old_per_slice": per_slice}


def decide_growth(layer: PEER, new_x: Tensor, old_x: Tensor | None, rule: GrowthRule | None = None) -> int:
    """K for ``--grow auto``: sub-keys per half, from ``growth_need`` (0: the slice is served)."""
    return growth_need(layer, new_x, old_x, rule)["k"]


def budget_subkeys(n: int, k: int, max_experts: int | None) -> int:
    """``k`` sub-keys per half, cut so that the pool (n + K)² stays within ``max_experts`` per layer
    (None or 0: no budget). The budget is a hard cap (issue 24): growth that does not fit is cut, to 0."""
    if not max_experts:
        return k
    room = math.isqrt(max_experts) - n  # largest K with (n + K)² ≤ max_experts
    return max(0, min(k, room))


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
    max_experts: int | None = None,
    need: float | None = None,
) -> list[dict]:
    """Grow every PEER layer (or the ``layer``-th) of ``model``; returns one report per layer.

    ``mode``: one of ``GROW_MODES``. ``generation_topk``: experts per head each new generation
    retrieves in mode ``exact`` (default: the layer's topk; fewer cost less, see ``PEERConfig.slots``);
    ``generation_gate``: how they are weighted (``PEERConfig.generation_gate``).

    ``k``: sub-keys per half, or ``"auto"``: from ``need`` (a slice-level figure such as ``loss_need``'s) by
    ``subkeys_for_need``, or, without it, from each layer's query coverage (``growth_need``, needs both inputs).
    ``max_experts``: the memory budget, experts per layer (all generations); K is cut to fit it.
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
        decision = {"need": None, "min_excess": None, "k": None if k == "auto" else int(k)}
        if k == "auto" and need is not None:
            decision = {
                "need": need,
                "min_excess": rule.min_excess,
                "k": subkeys_for_need(peer.num_subkeys, need, rule),
            }
        elif k == "auto":
            if new_x is None:
                raise UserError(f"--grow auto needs a sample of the new slice's inputs for PEER layer {pos}")
            decision = growth_need(peer, new_x, old_x, rule)
        wanted = decision["k"]
        num = budget_subkeys(peer.num_subkeys, wanted, max_experts)
        report = {
            "layer": pos,
            "k": num,
            "subkeys_before": peer.num_subkeys,
            "experts_before": peer.num_experts,
            "need": decision["need"],
            "min_excess": decision["min_excess"],
            "budget": max_experts or None,
            "reason": _growth_reason(k, wanted, num, decision, max_experts, peer.num_experts),
        }
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


def _growth_reason(k, wanted: int, num: int, need: dict, max_experts: int | None, experts: int) -> str:
    """Why one layer grows ``num`` sub-keys per half: the measured figure and its threshold, the budget."""
    if k == "auto":
        if need["need"] is None:
            why = "no old slices to compare with: no growth"
        else:
            cmp = "<" if need["need"] < need["min_excess"] else "≥"
            why = f"need {need['need']:.3f} {cmp} {need['min_excess']:g}"
            why += f" → {wanted} sub-keys per half" if wanted else ": served, no growth"
    else:
        why = f"{wanted} sub-keys per half asked for"
    if num < wanted:
        why += f"; budget {max_experts:,} experts per layer ({experts:,} now) allows {num}"
    return why


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
    before = {name: model.nll(w)[0] for name, w in old_windows.items()}
    out = grow()
    per_slice = {}
    for name, w in old_windows.items():
        num_bytes = w[:, 1:].numel() * (bytes_per_token or {}).get(name, 1.0)
        per_slice[name] = (model.nll(w)[0] - before[name]) / (max(num_bytes, 1e-9) * math.log(2))
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
