"""Freezing policies: all-old, usage:P, tfidf:T (SMF), applied as the layers' freeze masks."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..errors import UserError
from ..peer import PEER
from ..policies import FreezePolicy, parse_policy
from .core import UsageLedger, _eval

# --- freezing policies --------------------------------------------------------------------------------


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
        report = frozen_report(pos, layer, str(parse_policy(policy)))
        if new_slice is not None and new_slice in ledger.slices():
            report |= claim_report(layer, ledger, pos, new_slice, old_slices)
        reports.append(report)
    return reports


def claim_report(layer: PEER, ledger: UsageLedger, pos: int, new_slice: str, old_slices: Sequence[str]) -> dict:
    """What the new slice takes of the pool (issue 24), from its usage in ``ledger`` (recorded before training on it):
    ``retrieved``, the experts its queries retrieve; ``claimed``, those of them left trainable (not protected
    for the old slices); ``unused``, experts that neither it nor any old slice retrieves."""
    new_ids = ledger.get(new_slice, pos).ids
    new_ids = new_ids[new_ids < layer.num_experts]
    used = torch.zeros(layer.num_experts, dtype=torch.bool)
    used[new_ids] = True
    old = ledger.total(pos, old_slices).ids
    used[old[old < layer.num_experts]] = True
    claimed = int((~layer.frozen[new_ids].cpu()).sum())
    return {"retrieved": len(new_ids), "claimed": claimed, "unused": int((~used).sum())}


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
