"""The fast path of the PEER layer (issue 8), in pure PyTorch. ``peer.py`` reads without it.

Two pieces, each checked against the straightforward code in ``tests/test_fast_path.py``:

* ``product_key_topk`` — exact top-k of the n² sums s1[i] + s2[j] from each half's top-k,
  through a *pruned* candidate grid. If the pair of ranks (a, b) (0-based, in each half's sorted
  top-k) is among the k best, so are all (a', b') with a' ≤ a, b' ≤ b — (a + 1)(b + 1) pairs —
  hence only pairs with (a + 1)(b + 1) ≤ k can win: 50 candidates for k = 16 instead of k² = 256.
* ``ExpertMix`` — the experts' part of Eq. 6–8, y_t = Σ_s w_ts v_{e(t,s)} with
  w_ts = g_ts σ(u_{e(t,s)} · x_t), as one autograd Function. The straightforward version gathers
  u (T, h·k, dim) and keeps it for backward; this one keeps only (T, h·k) tensors and computes

      forward   hidden_ts = u_e · x_t          sampled dense-dense product (``sampled_addmm``)
                y_t = Σ_s w_ts v_e              ``embedding_bag`` with per-sample weights
      backward  dw_ts = v_e · dy_t              sampled product again
                dx_t = Σ_s dh_ts u_e            ``embedding_bag``
                dU_r = Σ_{e(t,s)=r} dh_ts x_t   entries sorted by expert id: ``embedding_bag``
                dV_r = Σ_{e(t,s)=r} w_ts dy_t   over x / dy with one bag per distinct row

  so U's and V's gradients arrive compact and coalesced: one row per distinct expert used
  (sparse COO with ``is_coalesced=True``; the optimizer's ``coalesce()`` is then free), or dense
  (N, dim) when the layer asks for dense gradients.

With ``native=True`` (``PEER(impl="native")``) both pieces run the C++ kernels of
``lifelong_peer.kernels`` when they are available and the tensors are CPU fp32/fp64 (same maths;
the product-key top-k by filtering instead of ``torch.topk``, the experts over entries sorted by
expert id with one fused backward), and this module's pure-PyTorch code otherwise.

``tune_allocator()`` sets glibc malloc so that big temporaries are not handed back to the OS
after every step (RESEARCH.md "PEER speed": the page faults cost about half the time of a
step). ``PEER`` calls it once when the first layer is built; ``LPEER_MALLOC_TUNE=0`` turns it off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from . import kernels


@functools.cache
def _pruned_grid(k: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Ranks (a, b) with (a + 1)(b + 1) ≤ k, as two index tensors (P,) — see the module docstring."""
    pairs = [(a, b) for a in range(k) for b in range(k // (a + 1))]
    a, b = torch.tensor(pairs, dtype=torch.long, device=device).T
    return a, b


def native_kernels(*tensors: Tensor):
    """The compiled kernels if they can take these tensors (CPU, one dtype of fp32/fp64, no autocast), else None."""
    dtype = tensors[0].dtype
    if dtype not in (torch.float32, torch.float64) or torch.is_autocast_enabled("cpu"):
        return None
    if any(t.device.type != "cpu" or (t.is_floating_point() and t.dtype != dtype) for t in tensors):
        return None
    return kernels.load()


def product_key_topk(
    q: Tensor, subkeys: Tensor, k: int, sparse_backward: bool = True, native: bool = False, lo: int = 0
) -> tuple[Tensor, Tensor, Tensor]:
    """Exact top-k of q1·c_i + q2·c'_j over all pairs (i, j): (scores, i, j), each (..., k), descending.

    q (..., dim_key) queries, subkeys (n, 2, dim_key/2). Differentiable in ``scores`` with respect
    to q and subkeys; with ``sparse_backward`` through ``SubkeyTopK``, whose backward costs O(k)
    per query instead of the O(n) of back-propagating through the full score matrix. ``native``:
    the C++ kernel (``NativeProductKeyTopK``) where available. ``lo`` > 0: only the pairs with
    max(i, j) ≥ lo, a grown generation's experts (issue 16; ``shell_topk``).
    """
    half = q.shape[-1] // 2
    lead = q.shape[:-1]
    if native and (ext := native_kernels(q, subkeys)) is not None:
        scores, i, j = NativeProductKeyTopK.apply(q.reshape(-1, q.shape[-1]), subkeys, k, ext, lo)
        return scores.view(*lead, k), i.view(*lead, k), j.view(*lead, k)
    if lo:
        return shell_topk(q, subkeys, lo, k)
    halves = []
    for h, qh in enumerate((q[..., :half], q[..., half:])):
        qh = qh.reshape(-1, half)  # (R, half)
        if sparse_backward:
            halves.append(SubkeyTopK.apply(qh, subkeys[:, h], k))
        else:
            halves.append((qh @ subkeys[:, h].T).topk(k, dim=-1))
    (v1, i1), (v2, i2) = ((v.view(*lead, k), i.view(*lead, k)) for v, i in halves)
    a, b = _pruned_grid(k, q.device)
    candidates = v1[..., a] + v2[..., b]  # (..., P)
    scores, best = candidates.topk(k, dim=-1)  # (..., k)
    return scores, i1.gather(-1, a[best]), i2.gather(-1, b[best])


class SubkeyTopK(torch.autograd.Function):
    """(values, indices) = top-k over n of the scores q · c_i, each (R, k); q (R, D), keys (n, D).

    Only the k selected scores carry gradient, so backward needs just those keys and queries:
    dq_r = Σ_a dv_ra c_{i_ra} and dc_i = Σ_{(r, a): i_ra = i} dv_ra q_r (O(R·k·D), not O(R·n·D)).
    """

    @staticmethod
    def forward(ctx, q, keys, k: int):
        values, indices = (q @ keys.T).topk(k, dim=-1)  # (R, k)
        ctx.save_for_backward(q, keys, indices)
        ctx.mark_non_differentiable(indices)
        return values, indices

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dv, _):
        q, keys, indices = ctx.saved_tensors
        # under autocast the scores (so dv) and q may be bf16: compute in the keys' dtype (autograd
        # casts dq back to q's)
        dv, q = dv.to(keys.dtype).contiguous(), q.to(keys.dtype)
        dq = F.embedding_bag(indices, keys, mode="sum", per_sample_weights=dv) if ctx.needs_input_grad[0] else None
        dkeys = None
        if ctx.needs_input_grad[1]:
            groups = _RowGroups(indices)
            dkeys = keys.new_zeros(keys.shape).index_copy_(0, groups.rows, groups.sum(dv, q))
        return dq, dkeys, None


class NativeProductKeyTopK(torch.autograd.Function):
    """``product_key_topk`` in C++: (scores, i, j) each (R, k) for q (R, dim_key), subkeys (n, 2, dim_key/2).

    Forward: per block of rows, sub-key scores by GEMM, each half's top-k by filtering, the pruned
    grid. Backward: scores[r, t] = q1_r · c_{i[r,t]} + q2_r · c'_{j[r,t]}, so dq and dsubkeys need
    only the k winners' sub-keys (O(k) per query, as ``SubkeyTopK``).
    """

    @staticmethod
    def forward(ctx, q, subkeys, k: int, ext, lo: int = 0):
        scores, i, j = ext.pk_topk_shell(q, subkeys, lo, k) if lo else ext.pk_topk(q, subkeys, k)
        ctx.save_for_backward(q, subkeys, i, j)
        ctx.ext = ext
        ctx.mark_non_differentiable(i, j)
        return scores, i, j

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, ds, _di, _dj):
        q, subkeys, i, j = ctx.saved_tensors
        dq, dsubkeys = ctx.ext.pk_topk_backward(ds, q, subkeys, i, j, *ctx.needs_input_grad[:2])
        return dq, dsubkeys, None, None, None


def shell_topk(q: Tensor, subkeys: Tensor, lo: int, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """The exact top-k over the experts (i, j) with lo ≤ max(i, j) < n — a grown generation's, ids
    [lo², n²) in shell order — as two product-key grids: rows [lo, n) × columns [0, n) and rows
    [0, lo) × columns [lo, n), each reduced to its halves' top-k (Eq. 5). q (..., dk), subkeys
    (n, 2, dk/2) → (scores, i, j), each (..., k), descending. Pure PyTorch, autograd through it; the
    native kernel ``pk_topk_shell`` computes the same."""
    half, n = q.shape[-1] // 2, subkeys.shape[0]
    scores, rows, cols = [], [], []
    for r0, r1, c0, c1 in ((lo, n, 0, n), (0, lo, lo, n)):
        v1, i1 = (q[..., :half] @ subkeys[r0:r1, 0].T).topk(min(k, r1 - r0), dim=-1)  # (..., k1)
        v2, i2 = (q[..., half:] @ subkeys[c0:c1, 1].T).topk(min(k, c1 - c0), dim=-1)  # (..., k2)
        grid = v1.unsqueeze(-1) + v2.unsqueeze(-2)  # (..., k1, k2): contains the grid's top-k
        scores.append(grid.flatten(-2))
        rows.append((i1 + r0).unsqueeze(-1).expand_as(grid).flatten(-2))
        cols.append((i2 + c0).unsqueeze(-2).expand_as(grid).flatten(-2))
    top, pick = torch.cat(scores, -1).topk(k, dim=-1)
    return top, torch.cat(rows, -1).gather(-1, pick), torch.cat(cols, -1).gather(-1, pick)


# --- experts ----------------------------------------------------------------------------------


def _rows_dot(table: Tensor, ids: Tensor, z: Tensor) -> Tensor:
    """out[t, s] = table[ids[t, s]] · z[t] for ids (T, S), z (T, D) → (T, S), without a (T, S, D) gather."""
    T, S = ids.shape
    if table.device.type != "cpu" or T == 0 or table.shape[0] < S or table.dtype not in (torch.float32, torch.float64):
        # gathers are cheap on GPUs; sampled_addmm cannot hold more entries than the (T × N) matrix
        # and has no bf16/fp16 CPU kernel
        return torch.einsum("tsd,td->ts", table[ids], z)
    # a CSR pattern (T × N) with S entries per row; sampled_addmm computes just those dot products
    crow = torch.arange(0, T * S + 1, S, device=ids.device)
    with warnings.catch_warnings():  # torch warns that CSR support is "beta"
        warnings.simplefilter("ignore")
        pattern = torch.sparse_csr_tensor(crow, ids.reshape(-1), z.new_zeros(T * S), (T, table.shape[0]))
    return torch.sparse.sampled_addmm(pattern, z, table.T, beta=0.0).values().view(T, S)


class _RowGroups:
    """The (T, S) entries of ``ids`` grouped by expert id, sorted once and shared by dU and dV."""

    def __init__(self, ids: Tensor):
        S = ids.shape[1]
        sorted_ids, self.order = ids.reshape(-1).sort()  # (T·S,)
        self.rows, counts = torch.unique_consecutive(sorted_ids, return_counts=True)  # (r,) distinct ids
        self.offsets = counts.cumsum(0) - counts  # (r,) start of each row's entries in ``order``
        self.tokens = self.order // S  # (T·S,) token of each sorted entry

    def sum(self, weights: Tensor, z: Tensor) -> Tensor:
        """(r, D): for each distinct id r, Σ over its entries (t, s) of weights[t, s] · z[t]. z (T, D)."""
        w = weights.reshape(-1)[self.order]
        return F.embedding_bag(self.tokens, z, self.offsets, mode="sum", per_sample_weights=w)


def _table_grad(rows: Tensor, values: Tensor, table: Tensor, sparse: bool) -> Tensor:
    if sparse:
        return torch.sparse_coo_tensor(
            rows.unsqueeze(0), values, table.shape, is_coalesced=True, check_invariants=False
        )
    return table.new_zeros(table.shape).index_copy_(0, rows, values)


def _activation(hidden: Tensor, activation: str) -> Tensor:
    return F.gelu(hidden) if activation == "gelu" else F.relu(hidden)


def _activation_grad(grad: Tensor, hidden: Tensor, activation: str) -> Tensor:
    if activation == "gelu":
        return torch.ops.aten.gelu_backward(grad, hidden)
    return grad * (hidden > 0)


class ExpertMix(torch.autograd.Function):
    """y = Σ_s gates[t, s] σ(U[ids[t, s]] · x_t) V[ids[t, s]] — see the module docstring.

    x (T, dim), ids (T, S) int64, gates (T, S), U and V (N, dim) → y (T, dim).
    """

    @staticmethod
    def forward(ctx, x, ids, gates, U, V, activation: str, sparse: bool):
        # under autocast x, gates and the dot products may be bf16: the tables' dtype throughout, so
        # backward is consistent and U's and V's gradients come in their dtype
        x, gates = x.to(V.dtype), gates.to(V.dtype)
        hidden = _rows_dot(U, ids, x).to(V.dtype)  # (T, S)
        weights = _activation(hidden, activation) * gates  # (T, S)
        y = F.embedding_bag(ids, V, mode="sum", per_sample_weights=weights)  # (T, dim)
        ctx.save_for_backward(x, ids, gates, hidden, U, V)
        ctx.activation, ctx.sparse = activation, sparse
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, ids, gates, hidden, U, V = ctx.saved_tensors
        need_x, _, need_gates, need_U, need_V = ctx.needs_input_grad[:5]
        dy = dy.contiguous()
        act = _activation(hidden, ctx.activation)  # (T, S)
        dx = dgates = dU = dV = None
        if need_x or need_gates or need_U:
            dw = _rows_dot(V, ids, dy)  # (T, S): ∂L/∂weights
            dgates = dw * act if need_gates else None
            dh = _activation_grad(dw * gates, hidden, ctx.activation)  # ∂L/∂hidden
            if need_x:
                dx = F.embedding_bag(ids, U, mode="sum", per_sample_weights=dh)
        if need_U or need_V:
            groups = _RowGroups(ids)
            if need_U:
                dU = _table_grad(groups.rows, groups.sum(dh, x), U, ctx.sparse)
            if need_V:
                dV = _table_grad(groups.rows, groups.sum(act * gates, dy), V, ctx.sparse)
        return dx, None, dgates, dU, dV, None, None


class NativeExpertMix(torch.autograd.Function):
    """``ExpertMix`` in C++: the (token, slot) entries sorted by expert id once in forward (kept for
    backward), so each retrieved row of U and V is read once per pass; backward is one fused pass
    giving dx, dgates and compact dU/dV rows. Same arguments and result as ``ExpertMix``.
    """

    @staticmethod
    def forward(ctx, x, ids, gates, U, V, activation: str, sparse: bool, ext):
        act = 0 if activation == "gelu" else 1
        y, hidden, order, rows, starts = ext.mix_forward(x, ids, gates, U, V, act)
        ctx.save_for_backward(x, gates, hidden, U, V, order, rows, starts)
        ctx.act, ctx.sparse, ctx.ext = act, sparse, ext
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, gates, hidden, U, V, order, rows, starts = ctx.saved_tensors
        need_x, _, need_gates, need_U, need_V = ctx.needs_input_grad[:5]
        dx, dgates, dU, dV = ctx.ext.mix_backward(dy, x, gates, hidden, U, V, order, rows, starts, ctx.act)
        return (
            dx if need_x else None,
            None,
            dgates if need_gates else None,
            _table_grad(rows, dU, U, ctx.sparse) if need_U else None,
            _table_grad(rows, dV, V, ctx.sparse) if need_V else None,
            None,
            None,
            None,
        )


def expert_mix(
    x: Tensor, ids: Tensor, gates: Tensor, U: Tensor, V: Tensor, activation: str, sparse: bool, native: bool = False
) -> Tensor:
    """Functional form of ``ExpertMix``: x (T, dim), ids/gates (T, S), U/V (N, dim) → (T, dim).

    ``native``: ``NativeExpertMix`` where the compiled kernels are available.
    """
    if native and (ext := native_kernels(x, gates, U, V)) is not None:
        return NativeExpertMix.apply(x, ids, gates, U, V, activation, sparse, ext)
    return ExpertMix.apply(x, ids, gates, U, V, activation, sparse)


# --- allocator ---------------------------------------------------------------------------------

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc <malloc.h>
_MMAP_THRESHOLD = 256 << 20
_TRIM_THRESHOLD = 1 << 30


@functools.cache
def tune_allocator() -> bool:
    """Keep a step's freed temporaries in the process (glibc only); returns whether it was applied.

    By default glibc serves blocks over ~32 MB (a (tokens, h·k, dim) gather is 134 MB) with fresh
    mmaps and unmaps them on free, so every step page-faults them in again. Here blocks up to
    256 MB come from the heap and up to 1 GiB of freed heap is kept for reuse; bigger blocks
    (the expert tables of a large pool) still use mmap, so freeing a pool returns its memory.
    """
    if os.environ.get("LPEER_MALLOC_TUNE", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl): nothing to tune
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
