"""The optimizer: AdamW for dense weights, a lazy row-sparse AdamW for expert tables and sub-keys.

Why not plain ``torch.optim.AdamW`` everywhere (RESEARCH.md, "pitfalls"):

* Expert tables are N × dim with N up to millions, but a step touches at most tokens·h·k rows.
  A dense update zero-fills and rewrites all N rows every step; the row-sparse update here reads
  and writes only the rows in the step's (sparse) gradient — product-key memories train their
  values this way, with their own learning rate (Lample et al. 2019).
* Freezing must be exact per row. Zeroed gradients do not stop AdamW (decoupled weight decay and
  leftover moments still move the row) and ``requires_grad`` is per tensor. Here every row
  parameter comes with a bool mask (``PEER.row_masks()``): masked rows are dropped from the update
  before anything is written, so frozen rows — weights and Adam moments — stay bit-identical.

Growth appends state rows in place (the state has spare rows like the tables, ``peer.extend_rows``)
and writes only their step counts (``_row_state``).

Lazy Adam keeps a step count per row, so a row first used late still gets the right bias
correction (torch's SparseAdam uses one count per tensor, which makes a late row's first update
~3× too large).

The expert tables' moments are most of the optimizer's memory (2 × N × dim, as much as U and V
together). ``Moments`` says how they are stored — ``fp32`` (exact AdamW), ``bf16`` or ``rowwise``
(one second moment per row) — at the same maths (issue 8; measured in ``BENCHMARKS.md``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .errors import CheckpointError
from .peer import PEER, extend_rows
from .peer_ops import native_kernels


@dataclass(frozen=True)
class Moments:
    """How a row-sparse group stores each row's Adam moments m and v (issue 8: memory).

    The maths is the same for every storage: the touched rows' moments are gathered, converted to
    the gradient's dtype (fp32), updated there, and written back (rounded to nearest when the
    storage is narrower). What differs is the bytes per row of width D:

    * ``fp32``: m, v as the parameter (8·D bytes; exactly AdamW).
    * ``bf16``: m, v as bfloat16 (4·D bytes).
    * ``rowwise``: m as the parameter, v one number per row, the row's mean of g² — row-wise Adam,
      as row-wise AdaGrad for embedding tables (Mudigere et al. 2021, "Software-Hardware Co-design
      for ... Recommendation Models", §4): every element of a row shares one step size (4·D + 4
      bytes). The rows are experts' u and v vectors, updated only together, so one scale per row
      loses little (loss measured in ``benchmarks/moments.py``).
    """

    name: str
    m_dtype: torch.dtype | None
    """Storage dtype of m (None: the parameter's dtype)."""
    v_dtype: torch.dtype | None
    """Storage dtype of v (None: the parameter's dtype)."""
    rowwise: bool = False
    """v is (R, 1), the mean of g² over the row, instead of (R, D)."""

    def new(self, p: Tensor, width: int) -> dict[str, Tensor]:
        """Empty (0-row) m (0, D) and v (0, D) or (0, 1) for a row parameter ``p`` of row width D."""
        return {
            "exp_avg": p.new_empty(0, width, dtype=self.m_dtype or p.dtype),
            "exp_avg_sq": p.new_empty(0, 1 if self.rowwise else width, dtype=self.v_dtype or p.dtype),
        }

    def update(self, state: dict, rows: Tensor, grad: Tensor, first: Tensor, b1: float, b2: float):
        """m ← β₁m + (1−β₁)g, v ← β₂v + (1−β₂)g² on ``rows`` (r,), stored back; returns m (r, D) and
        v (r, D) or (r, 1) in ``grad``'s dtype, unrounded and free to modify in place.

        ``first`` (r, 1): rows updated for the first time, whose stored moments are not read.
        """
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        # .to() returns the gathered copy itself when the storage has grad's dtype (fp32: no copy)
        m = exp_avg.index_select(0, rows).to(grad.dtype).masked_fill_(first, 0).mul_(b1).add_(grad, alpha=1 - b1)
        v = exp_avg_sq.index_select(0, rows).to(grad.dtype).masked_fill_(first, 0).mul_(b2)
        if self.rowwise:  # the row's mean of g², without an (r, D) temporary
            v.add_(torch.linalg.vector_norm(grad, dim=1, keepdim=True).square_(), alpha=(1 - b2) / grad.shape[1])
        else:
            v.addcmul_(grad, grad, value=1 - b2)  # torch.optim.AdamW's operation
        exp_avg.index_copy_(0, rows, m.to(exp_avg.dtype))
        exp_avg_sq.index_copy_(0, rows, v.to(exp_avg_sq.dtype))
        return m, v

    def adopt(self, state: dict[str, Tensor], p: Tensor, name: str) -> dict[str, Tensor]:
        """A loaded state (``state_tensors``) in this storage. Converts what can be converted: dtypes
        (a cast; to bf16 it rounds) and a per-element v to its row's mean (exact: the mean of the
        EMAs is the EMA of the means); a row-wise v cannot give back per-element ones."""
        want = self.new(p, state["exp_avg"].shape[1])
        for key, like in want.items():
            value = state[key]
            if value.shape[1] != like.shape[1]:
                if like.shape[1] != 1:
                    raise CheckpointError(
                        f"optimizer state of {name} has row-wise second moments; they cannot be "
                        f"resumed as {self.name!r} moments (resume with the row-wise setting)"
                    )
                value = value.to(p.dtype).mean(1, keepdim=True)  # the mean of EMAs = EMA of means
            state[key] = value.to(like.dtype)
        return state


#: The storages ``build_optimizer(moments=...)`` and ``TrainConfig.expert_moments`` accept.
MOMENTS = {
    "fp32": Moments("fp32", None, None),
    "bf16": Moments("bf16", torch.bfloat16, torch.bfloat16),
    "rowwise": Moments("rowwise", None, None, rowwise=True),
}


class PEEROptimizer(torch.optim.Optimizer):
    """One optimizer over a model with PEER layers; see the module docstring.

    Param groups carry ``rows=True`` (row-sparse, masked) or ``rows=False`` (dense AdamW, delegated
    to ``torch.optim.AdamW`` that shares the very same group dicts, so LR schedulers see one list).
    A plain ``opt.zero_grad(); loss.backward(); opt.step()`` loop honours the frozen masks.
    """

    def __init__(
        self,
        dense_groups: list[dict],
        row_groups: list[dict],
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ):
        """``row_groups`` name their parameters by ``sources``: [(PEER layer, "U" | "V" | "subkeys")]
        and may set ``moments``: a ``MOMENTS`` name or a ``Moments`` (default ``"fp32"``).

        Growth gives a layer new Parameter objects; the optimizer looks them up by source before
        every use (``_sync``), carrying their Adam state over, so it survives any number of grows.
        """
        for g in dense_groups:
            g["rows"] = False
        for g in row_groups:
            g["rows"] = True
            g["params"] = [getattr(layer, name) for layer, name in g["sources"]]
            g.setdefault("betas", betas)
            g.setdefault("eps", eps)
            g["moments"] = _moments(g.get("moments", "fp32"))
        dense_groups = [g for g in dense_groups if g["params"]]
        self._dense = torch.optim.AdamW(dense_groups, lr=lr, betas=betas, eps=eps) if dense_groups else None
        super().__init__([*dense_groups, *[g for g in row_groups if g["params"]]], {"lr": lr})

    def _sync(self) -> None:
        """Re-bind row parameters replaced by growth, moving their state to the new objects."""
        for group in self.param_groups:
            if not group["rows"]:
                continue
            current = [getattr(layer, name) for layer, name in group["sources"]]
            for old, new in zip(group["params"], current, strict=True):
                if old is not new and old in self.state:
                    self.state[new] = self.state.pop(old)
            group["params"] = current

    def _impl(self, group: dict, index: int) -> str:
        """The owning layer's ``PEER.impl``: ``"native"`` layers get the fused update."""
        return getattr(group["sources"][index][0], "impl", "fast")

    def _mask(self, group: dict, index: int) -> Tensor:
        layer, name = group["sources"][index]
        return layer.row_masks()[name]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._sync()
        if self._dense is not None:
            self._dense.step()
        for group in self.param_groups:
            if group["rows"]:
                for index, p in enumerate(group["params"]):
                    if p.grad is not None:
                        self._row_step(p, self._mask(group, index), group, self._impl(group, index))
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._sync()
        super().zero_grad(set_to_none=set_to_none)

    def _row_step(self, p: Tensor, mask: Tensor, group: dict, impl: str = "fast") -> None:
        """Lazy AdamW on p's touched, unfrozen rows; ``impl`` is the owning layer's (``PEER.impl``)."""
        mask = mask.reshape(-1)  # (R,) one flag per row
        rows_total = mask.numel()
        pv = p.data.view(rows_total, -1)  # (R, D)
        rows, grad = _touched_rows(p.grad, rows_total)  # (r,), (r, D)
        keep = ~mask[rows]
        if not bool(keep.all()):  # drop frozen rows (copies the gradient only when some are frozen)
            rows, grad = rows[keep], grad[keep]
        state = self._row_state(p, rows_total, pv.shape[1], group["moments"])
        if rows.numel() == 0:
            return
        b1, b2 = group["betas"]
        lr, wd, eps = group["lr"], group.get("weight_decay", 0.0), group["eps"]
        # the same update in one pass over the rows (issue 8): no (r, D) temporaries
        fused = impl == "native" and group["moments"].name == "fp32" and pv.dtype == torch.float32
        if fused and (ext := native_kernels(pv, grad)) is not None:
            ext.row_adamw_(pv, state["exp_avg"], state["exp_avg_sq"], state["step"], rows, grad, lr, b1, b2, eps, wd)
            return
        t = state["step"].index_select(0, rows) + 1  # (r,) per-row step counts
        state["step"].index_copy_(0, rows, t)
        # A row's first update starts from zero moments whatever is stored: growth leaves the new
        # rows' moments unwritten (``_row_state``), which saves touching 2 × rows × D of memory.
        first = (t == 1).unsqueeze(1)  # (r, 1)
        m, v = group["moments"].update(state, rows, grad, first, b1, b2)  # (r, D), (r, D) or (r, 1)
        # bias corrections in float64: 1 - 0.999**t loses ~1e-5 relative in float32
        td = t.double().unsqueeze(1)
        bc1, bc2 = (1 - b1**td).to(grad.dtype), (1 - b2**td).sqrt().to(grad.dtype)
        # in place on the gathered copies (m and v are stored already): fewer passes over r × D
        denom = v.sqrt_().div_(bc2).add_(eps)  # torch.optim.AdamW's order of operations
        w = pv.index_select(0, rows)
        if wd:
            w.mul_(1 - lr * wd)  # decoupled weight decay, on the touched, unfrozen rows only
        w.addcdiv_(m.div_(bc1), denom, value=-lr)
        pv.index_copy_(0, rows, w)

    def _row_state(self, p: Tensor, rows_total: int, width: int, moments: Moments) -> dict:
        """Adam state of a row parameter: per-row step counts (R,), m and v (R, D) or as ``moments``
        stores them; extended after growth.

        Kept like the expert tables (``peer.extend_rows``): in storage with spare rows, so growth
        copies no old row (or, when the room runs out, each once). Growth writes only the new rows'
        step counts (0): moments of a row whose count is 0 are never read (``_row_step``) and are
        saved as zeros (``state_tensors``), so they need not be written — the pages of the new rows
        are first touched when a row is first used, not all at once in the step after growth.
        """
        state = self.state[p]
        if not state:
            state["step"] = p.new_empty(0, dtype=torch.int32)
            state.update(moments.new(p, width))
        had = state["step"].shape[0]
        if rows_total > had:
            for key in ("step", "exp_avg", "exp_avg_sq"):
                state[key] = extend_rows(state[key], rows_total)
            state["step"][had:].zero_()
            if had == 0:  # a new state is all zeros (deterministic contents, as torch's Adam)
                state["exp_avg"].zero_()
                state["exp_avg_sq"].zero_()
        return state

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> Tensor:
        """Clip the global gradient norm over all groups, sparse gradients included.

        ``torch.nn.utils.clip_grad_norm_`` does not take sparse gradients, and an uncoalesced sparse
        gradient's values would double count repeated rows — so they are coalesced first.
        """
        self._sync()
        grads = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    p.grad = p.grad.coalesce()
                    grads.append(p.grad._values())
                else:
                    grads.append(p.grad)
        if not grads:
            return torch.tensor(0.0)
        total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        coef = max_norm / (total + 1e-6)
        if coef < 1:
            for g in grads:
                g.mul_(coef)
        return total

    # --- checkpointing without pickle: flat name → tensor ------------------------------------------

    def state_tensors(self, named_params: dict[str, Tensor]) -> dict[str, Tensor]:
        """Optimizer state as ``{"<param name>::<key>": tensor}`` (safetensors-ready, no pickle)."""
        self._sync()
        out = {}
        for name, p in named_params.items():
            state = self.state.get(p) or (self._dense.state.get(p) if self._dense else None) or {}
            rows = self.state.get(p) is state  # a row parameter's state (``_row_state``)
            for key, value in state.items():
                value = torch.as_tensor(value).detach()
                if rows and key != "step":  # moments of never-updated rows are unset: save zeros
                    used = state["step"].view(-1, *[1] * (value.ndim - 1)) > 0
                    out[f"{name}::{key}"] = torch.where(used, value, 0)
                else:
                    out[f"{name}::{key}"] = value.clone()
        return out

    def load_state_tensors(self, named_params: dict[str, Tensor], tensors: dict[str, Tensor]) -> None:
        """Inverse of ``state_tensors`` for the parameters of the model being resumed.

        Row parameters' moments are converted to their group's ``Moments`` where that is exact
        (``Moments.adopt``); otherwise a ``CheckpointError`` says so.
        """
        self._sync()
        row_moments = {id(p): g["moments"] for g in self.param_groups if g["rows"] for p in g["params"]}
        for name, p in named_params.items():
            prefix = f"{name}::"
            state = {k[len(prefix) :]: v.to(p.device).clone() for k, v in tensors.items() if k.startswith(prefix)}
            if state and id(p) in row_moments:
                self.state[p] = row_moments[id(p)].adopt(state, p, name)
            elif state:
                self._dense.state[p] = state


def _touched_rows(grad: Tensor, rows_total: int) -> tuple[Tensor, Tensor]:
    """(rows, values): the distinct rows a gradient touches and their summed gradient (r,), (r, D)."""
    if grad.is_sparse:
        rows = grad._indices()[0]
        # The fast PEER path hands over sorted, distinct rows, but autograd's accumulation drops
        # the is_coalesced flag; checking is O(r) where coalescing again would sort and copy.
        if not (grad.is_coalesced() or rows.numel() < 2 or bool((rows[1:] > rows[:-1]).all())):
            grad = grad.coalesce()
            rows = grad._indices()[0]
        return rows, grad._values().reshape(rows.shape[0], -1)
    g = grad.reshape(rows_total, -1)
    rows = g.ne(0).any(dim=1).nonzero().squeeze(1)  # lazy: a row with no gradient is not "used"
    return rows, g.index_select(0, rows)


def build_optimizer(
    model: nn.Module,
    lr: float = 1e-3,
    expert_lr: float | None = None,
    weight_decay: float = 0.0,
    expert_weight_decay: float | None = None,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    moments: str | Moments = "fp32",
) -> PEEROptimizer:
    """The optimizer the trainer uses: dense AdamW + row-sparse AdamW for every PEER layer's tables.

    ``expert_lr`` / ``expert_weight_decay`` default to ``lr`` / ``weight_decay``. Weight decay on
    dense weights applies to matrices only (not norms, biases); sub-keys get none.
    ``moments`` stores the expert tables' Adam moments (``MOMENTS``: fp32, bf16, rowwise); the
    sub-keys' stay fp32 (n × dim_key numbers, nothing to save, and they route every token).
    Parameters with ``requires_grad=False`` are left out.
    """
    expert_lr = lr if expert_lr is None else expert_lr
    expert_weight_decay = weight_decay if expert_weight_decay is None else expert_weight_decay
    row_ids: set[int] = set()
    experts, subkeys = [], []
    for layer in (m for m in model.modules() if isinstance(m, PEER)):
        for name in layer.row_masks():
            p = getattr(layer, name)
            row_ids.add(id(p))
            if p.requires_grad:
                (subkeys if name == "subkeys" else experts).append((layer, name))
    dense = [p for p in model.parameters() if p.requires_grad and id(p) not in row_ids]
    dense_groups = [
        {"params": [p for p in dense if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in dense if p.ndim < 2], "weight_decay": 0.0},
    ]
    row_groups = [
        {"sources": experts, "lr": expert_lr, "weight_decay": expert_weight_decay, "moments": moments},
        {"sources": subkeys, "lr": expert_lr, "weight_decay": 0.0},
    ]
    return PEEROptimizer(dense_groups, row_groups, lr=lr, betas=betas, eps=eps)


def _moments(moments: str | Moments) -> Moments:
    if isinstance(moments, Moments):
        return moments
    if moments not in MOMENTS:
        raise ValueError(f"moments must be one of {', '.join(MOMENTS)}; got {moments!r}")
    return MOMENTS[moments]
