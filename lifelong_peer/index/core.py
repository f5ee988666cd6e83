"""Usage ledgers, Table-2 statistics, inspection and the FAISS expert index (``lifelong_peer.index``)."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal, TypeVar

import faiss
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..checkpoint import load_tensors, save_tensors
from ..errors import CheckpointError, UserError
from ..peer import PEER, pair_of

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
