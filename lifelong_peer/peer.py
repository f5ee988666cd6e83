"""PEER: Parameter Efficient Expert Retrieval (He 2024, "Mixture of A Million Experts", §2, Alg. 1).

A PEER layer replaces a transformer FFN with a pool of N = n² single-neuron experts

    e_i(x) = σ(u_iᵀ x) · v_i                        (Eq. 6, u_i, v_i ∈ R^dim, no biases)

retrieved per token through product keys (Eq. 4–5, Lample et al. 2019). Each of h heads
projects x to a query q ∈ R^dim_key, splits it into halves q1, q2 and scores them against two
sets of n sub-keys C, C' (dimension dim_key/2). The key of expert (i, j) is [c_i ; c'_j], so
its score is q1·c_i + q2·c'_j and the exact top-k over all N experts lies among the k × k
sums of each half's own top-k. The k winners are mixed by a softmax over their scores
(Eq. 7–8) and the heads' outputs are summed.

What this file adds for continual learning:

* **Stable ids under growth.** ``grow(K)`` appends K sub-keys to each half: n → n + K. Expert
  (i, j) gets id ``id_of(i, j)`` by *shell order* — all pairs with max(i, j) = m occupy ids
  [m², (m+1)²):

      id(m, j) = m² + j          for j ≤ m      (row m, left to right, then the corner)
      id(i, m) = m² + m + 1 + i  for i < m      (column m, top to bottom)

  so growing n → n' gives the new experts exactly the ids [n², n'²) and the expert tables U, V
  only ever append rows. Old ids, rows, sub-keys, the query network and BatchNorm statistics
  are untouched; new experts start with v = 0 and so add nothing until trained.
* **Growth in place.** U and V live in storage with spare rows behind them (``ROW_HEADROOM``,
  ``empty_rows`` / ``extend_rows``; the optimizer keeps its per-row Adam state the same way), so
  growth writes only the new rows: no copy of the old ones, no new N-row allocation (issue 8).
  The Parameters are views of the first N rows, so ``state_dict`` and checkpoints hold exactly N.
* **Function-preserving growth (issue 16).** ``grow(K, generation_topk=k')`` makes the new experts a
  generation with its own exact top-k' retrieval (``config.generations``), summed into the output:
  older experts' routing and gates never change, and with v = 0 the function is bit-identical after
  growth. Each generation adds h·k' experts per token.
* **Per-expert freezing.** ``frozen`` (N,) and ``frozen_subkeys`` (n, 2) are persistent bool
  buffers. They are data, honoured by the row-sparse optimizer (``lifelong_peer.optim``), which
  never writes a frozen row — not its weights, not its Adam moments, not weight decay.
* **Row-sparse gradients.** With ``sparse_grad`` (default) U's and V's gradients are sparse and
  hold only the rows retrieved in the step, so the backward pass and the optimizer cost
  O(rows used), not O(N).

Three implementations compute the same function: ``impl="naive"``, the plain code in this file
(the reference: U and V read through ``F.embedding`` / ``F.embedding_bag(sparse=True)``);
``impl="fast"``, ``lifelong_peer.peer_ops``: a pruned top-k candidate grid and one autograd
Function for the experts that keeps no (tokens, h·k, dim) tensors for backward and returns
compact, coalesced row gradients (issue 8); and ``impl="native"`` (default), the same two pieces
and the optimizer's row update as C++ kernels (``lifelong_peer.kernels``, compiled once per machine
at first use and cached), which falls back to ``"fast"`` by itself where they are unavailable (no
compiler, ``LPEER_NATIVE=0``, CUDA, autocast, bf16).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import peer_ops

QueryNorm = Literal["batchnorm", "layernorm", "none"]
Activation = Literal["gelu", "relu"]
ExpertInit = Literal["zero", "random"]
GenerationGate = Literal["own", "nested"]

#: Largest pool a config may describe; beyond it a typo (10^12 experts) would try to allocate terabytes.
MAX_EXPERTS = 1 << 34

#: Rows reserved behind a growable table (U, V and the optimizer's per-row state), as a multiple of the
#: rows in use, so growth appends in place (issue 8: 1024² → 1200² experts had to copy 6 N × dim
#: tables). On CPU the spare rows are address space only: pages nobody has written are not resident,
#: so they cost no memory until growth reaches them. Other devices allocate eagerly and get exact
#: tables (a copy per growth there runs at device bandwidth).
ROW_HEADROOM = 2.0


@dataclass
class PEERConfig:
    """Shape and behaviour of one PEER layer. Defaults follow the paper where it states them."""

    dim: int = 256
    """Model width: the layer maps (..., dim) → (..., dim)."""
    num_subkeys: int = 256
    """Sub-keys per half, n; the pool holds N = n² experts. Follows growth."""
    heads: int = 8
    """Retrieval heads h, each with its own query, all sharing experts and sub-keys (Eq. 7–8)."""
    topk: int = 16
    """Experts retrieved per head, k (≤ num_subkeys)."""
    dim_key: int = 128
    """Query and key dimension (even: split into two halves of dim_key/2)."""
    query_norm: QueryNorm = "batchnorm"
    """Normalisation of queries: batchnorm (paper default, evens out usage, Table 2), layernorm, none."""
    activation: Activation = "gelu"
    """Expert non-linearity σ in e_i(x) = σ(u_i·x) v_i."""
    new_expert_init: ExpertInit = "zero"
    """Init of grown experts' v rows: zero (they add nothing until trained) or random (like the originals)."""
    generations: list[list[int]] = field(default_factory=list)
    """Grown generations with their own retrieval, [first sub-key, top-k] each (function-preserving growth,
    issue 16); empty: one retrieval over the whole pool. Follows growth."""
    generation_gate: GenerationGate = "own"
    """Router weights of a grown generation: own (a softmax over its own top-k, total weight 1) or nested (its
    share of a softmax over its and all earlier generations' retrieved scores: low where old experts score
    higher). Generation 0 keeps its softmax either way."""

    def __post_init__(self) -> None:
        for name in ("dim", "num_subkeys", "heads", "topk", "dim_key"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"PEERConfig.{name} must be a positive integer, got {value!r}")
        if self.dim_key % 2:
            raise ValueError(f"PEERConfig.dim_key must be even (it is split into two halves), got {self.dim_key}")
        if self.topk > self.num_subkeys:
            raise ValueError(f"PEERConfig.topk must be at most num_subkeys ({self.num_subkeys}), got {self.topk}")
        if self.num_subkeys**2 > MAX_EXPERTS:
            raise ValueError(
                f"PEERConfig.num_subkeys={self.num_subkeys} gives {self.num_subkeys**2:,} experts, "
                f"more than the supported {MAX_EXPERTS:,}"
            )
        _check_choice("query_norm", self.query_norm, QueryNorm)
        _check_choice("activation", self.activation, Activation)
        _check_choice("new_expert_init", self.new_expert_init, ExpertInit)
        _check_choice("generation_gate", self.generation_gate, GenerationGate)
        self.generations = [list(g) for g in self.generations]  # own lists: growth appends to them
        ends = [g[0] for g in self.generations[1:]] + [self.num_subkeys] if self.generations else []
        previous = 0
        for g, hi in zip(self.generations, ends, strict=True):
            if not (len(g) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in g)):
                raise ValueError(f"PEERConfig.generations entries must be [first sub-key, top-k], got {g!r}")
            lo, k = g
            if not previous < lo < hi:
                raise ValueError(
                    f"PEERConfig.generations must start at increasing sub-keys in (0, {self.num_subkeys}), "
                    f"got {self.generations}"
                )
            if not 0 < k <= hi * hi - lo * lo:
                raise ValueError(
                    f"PEERConfig.generations: top-k {k} is not in [1, {hi * hi - lo * lo}] for sub-keys [{lo}, {hi})"
                )
            previous = lo
        if self.generations and self.topk > self.generations[0][0]:
            raise ValueError(f"PEERConfig.topk {self.topk} exceeds the {self.generations[0][0]} sub-keys before growth")

    @property
    def num_experts(self) -> int:
        return self.num_subkeys**2

    def slots(self) -> list[int]:
        """Experts retrieved per head by each generation: [topk, top-k of each grown generation]."""
        return [self.topk, *(k for _, k in self.generations)]

    def to_dict(self) -> dict:
        return asdict(self)


def _check_choice(name: str, value: object, choices: object) -> None:
    allowed = choices.__args__  # type: ignore[attr-defined]
    if value not in allowed:
        raise ValueError(f"PEERConfig.{name} must be one of {', '.join(allowed)}; got {value!r}")


# --- expert id <-> sub-key pair (shell order, see module docstring) ---------------------------


def id_of(i: Tensor, j: Tensor) -> Tensor:
    """Expert id of sub-key pair (i, j); any shapes that broadcast. Inverse of ``pair_of``."""
    m = torch.maximum(i, j)
    return torch.where(i == m, m * m + j, m * m + m + 1 + i)


def pair_of(ids: Tensor) -> tuple[Tensor, Tensor]:
    """Sub-key pair (i, j) of expert ids (int64 tensor, any shape). Inverse of ``id_of``."""
    ids = ids.long()
    m = torch.sqrt(ids.double()).floor().long()
    # float sqrt can be off by one for large ids; correct it exactly in integers
    m = m - (m * m > ids).long()
    m = m + ((m + 1) * (m + 1) <= ids).long()
    r = ids - m * m
    row = r <= m
    return torch.where(row, m, r - m - 1), torch.where(row, r, m)


@dataclass
class Retrieval:
    """What one forward pass retrieved; all tensors (..., heads, topk), sorted by score descending."""

    scores: Tensor
    ids: Tensor
    gates: Tensor = field(repr=False)


class PEER(nn.Module):
    """A growable PEER layer with per-expert freezing. See the module docstring.

    Parameters: ``query`` (Linear dim → heads·dim_key), ``subkeys`` (n, 2, dim_key/2) — row r
    holds sub-key r of both halves, so growth appends rows —, ``U`` and ``V`` (N, dim), each the
    first N rows of a storage with spare rows for growth (``extend_rows``).
    """

    #: Implementations of the same function (module docstring); ``layer.impl`` may be switched at any time.
    IMPLS = ("fast", "naive", "native")

    def __init__(self, config: PEERConfig, impl: str = "native"):
        super().__init__()
        if impl not in self.IMPLS:
            raise ValueError(f"PEER impl must be one of {', '.join(self.IMPLS)}; got {impl!r}")
        self.config = config
        self.impl = impl
        peer_ops.tune_allocator()  # once per process; ~1.5–2× on fwd+bwd here (BENCHMARKS.md)
        c = config
        self.query = nn.Linear(c.dim, c.heads * c.dim_key, bias=False)
        if c.query_norm == "batchnorm":
            self.norm: nn.Module = nn.BatchNorm1d(c.heads * c.dim_key)
        elif c.query_norm == "layernorm":
            self.norm = nn.LayerNorm(c.dim_key)
        else:
            self.norm = nn.Identity()
        half = c.dim_key // 2
        # Lample et al. 2019: keys uniform ±1/√dim
        self.subkeys = nn.Parameter(torch.empty(c.num_subkeys, 2, half).uniform_(-(half**-0.5), half**-0.5))
        # views of the first N rows of a storage with room for growth (``empty_rows``)
        self.U = nn.Parameter(empty_rows(c.num_experts, c.dim).normal_(0, c.dim**-0.5))
        self.V = nn.Parameter(empty_rows(c.num_experts, c.dim).normal_(0, c.dim**-0.5))
        self.register_buffer("frozen", torch.zeros(c.num_experts, dtype=torch.bool))
        self.register_buffer("frozen_subkeys", torch.zeros(c.num_subkeys, 2, dtype=torch.bool))
        # sparse=True gives U and V row-sparse gradients (see module docstring); turn it off for
        # optimizers and tools that need dense gradients (gradcheck, plain torch.optim.AdamW).
        self.sparse_grad = True

    # --- shapes -------------------------------------------------------------------------------

    @property
    def num_experts(self) -> int:
        return self.config.num_experts

    @property
    def num_subkeys(self) -> int:
        return self.config.num_subkeys

    # --- retrieval (Eq. 4–5) --------------------------------------------------------------------

    def queries(self, x: Tensor) -> Tensor:
        """(T, dim) → normalised queries (T, heads, dim_key)."""
        c = self.config
        q = self.query(x)  # (T, h·dk)
        if c.query_norm == "batchnorm":
            q = self.norm(q)  # statistics over the tokens of the batch in training mode (Lample)
        q = q.view(-1, c.heads, c.dim_key)
        if c.query_norm == "layernorm":
            q = self.norm(q)
        return q

    def retrieve_queries(self, q: Tensor) -> tuple[Tensor, Tensor]:
        """Queries (T, h, dk) → (scores, ids), each (T, h, S), S = Σ ``config.slots()``: each generation's
        top-k (scores descending within it), generation 0 first. ``retrieve`` starts from hidden states;
        this from queries (``queries(x)`` or hand-made ones, as ``benchmarks/paper_usage.py`` does)."""
        c = self.config
        if not c.generations:
            return self._retrieve_square(q, self.subkeys)
        # generation 0: exactly the computation of the layer before its first such growth
        parts = [self._retrieve_square(q, self.subkeys[: c.generations[0][0]])]
        ends = [g[0] for g in c.generations[1:]] + [c.num_subkeys]
        parts += [self._retrieve_generation(q, lo, hi, k) for (lo, k), hi in zip(c.generations, ends, strict=True)]
        return torch.cat([p[0] for p in parts], -1), torch.cat([p[1] for p in parts], -1)

    def gates(self, scores: Tensor) -> Tensor:
        """Router weights (..., S) of retrieved ``scores`` (..., S): the softmax of Eq. 8 over generation 0's
        slots; a grown generation's slots by ``config.generation_gate``."""
        c = self.config
        parts = scores.split(c.slots(), dim=-1)
        if len(parts) == 1:
            return scores.softmax(dim=-1)
        if c.generation_gate == "own":
            return torch.cat([s.softmax(dim=-1) for s in parts], -1)
        # nested: generation g's slots get exp(s) / Σ exp over generations 0..g — later ones never enter
        # an earlier generation's weights, so growth leaves them exactly as they were
        out, lse = [parts[0].softmax(dim=-1)], parts[0].logsumexp(dim=-1, keepdim=True)
        for s in parts[1:]:
            lse = torch.logaddexp(lse, s.logsumexp(dim=-1, keepdim=True))
            out.append((s - lse).exp())
        return torch.cat(out, -1)

    def _retrieve_generation(self, q: Tensor, lo: int, hi: int, k: int) -> tuple[Tensor, Tensor]:
        """Exact top-k over a grown generation, the experts (i, j) with lo ≤ max(i, j) < hi — ids
        [lo², hi²) in shell order: (T, h, dk) → (scores, ids), each (T, h, k), descending. Two
        product-key grids (``peer_ops.shell_topk``), in C++ with ``impl="native"``."""
        scores, i, j = peer_ops.product_key_topk(q, self.subkeys[:hi], k, native=self.impl == "native", lo=lo)
        return scores, id_of(i, j)

    def _retrieve_square(self, q: Tensor, subkeys: Tensor) -> tuple[Tensor, Tensor]:
        """Queries (T, h, dk) → (scores, ids), each (T, h, k), scores descending, over the experts of ``subkeys``."""
        k, half = self.config.topk, self.config.dim_key // 2
        if self.impl != "naive":  # the same result from a pruned grid, with an O(k) backward
            scores, i, j = peer_ops.product_key_topk(q, subkeys, k, native=self.impl == "native")
            return scores, id_of(i, j)
        s1 = q[..., :half] @ subkeys[:, 0].T  # (T, h, n)
        s2 = q[..., half:] @ subkeys[:, 1].T  # (T, h, n)
        v1, i1 = s1.topk(k, dim=-1)  # (T, h, k)
        v2, i2 = s2.topk(k, dim=-1)
        # Eq. 5: the exact top-k of all n² sums lies among the k × k sums of the halves' top-k
        grid = v1.unsqueeze(-1) + v2.unsqueeze(-2)  # (T, h, k, k)
        scores, flat = grid.flatten(-2).topk(k, dim=-1)  # (T, h, k)
        i = i1.gather(-1, flat // k)
        j = i2.gather(-1, flat % k)
        return scores, id_of(i, j)

    def retrieve(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (..., dim) → (scores, ids), each (..., heads, S) (S = topk without grown generations); ids in
        [0, N), scores descending within each generation. Router weights: ``gates(scores)``."""
        lead = x.shape[:-1]
        scores, ids = self.retrieve_queries(self.queries(x.reshape(-1, self.config.dim)))
        return scores.view(*lead, *scores.shape[1:]), ids.view(*lead, *ids.shape[1:])

    def all_scores(self, x: Tensor) -> Tensor:
        """x (..., dim) → (..., heads, N): the score of every expert, by id. O(N): for inspection and tests."""
        lead = x.shape[:-1]
        q = self.queries(x.reshape(-1, self.config.dim))
        half = self.config.dim_key // 2
        s1 = q[..., :half] @ self.subkeys[:, 0].T  # (T, h, n)
        s2 = q[..., half:] @ self.subkeys[:, 1].T
        i, j = pair_of(torch.arange(self.num_experts, device=x.device))
        out = s1[..., i] + s2[..., j]  # (T, h, N)
        return out.view(*lead, *out.shape[1:])

    # --- experts (Eq. 6–8) ----------------------------------------------------------------------

    def forward(self, x: Tensor, return_retrieval: bool = False) -> Tensor | tuple[Tensor, Retrieval]:
        """x (..., dim) → (..., dim); with ``return_retrieval`` also the ``Retrieval`` of each token."""
        c = self.config
        lead = x.shape[:-1]
        x2 = x.reshape(-1, c.dim)  # (T, d)
        # The router in full precision, whatever autocast says (as Switch Transformer's, Fedus et al.
        # 2021 §2.4): bf16 sub-key scores pick a different expert in ~1 of 3 top-k slots (issue 9).
        with torch.autocast(x.device.type, enabled=False):
            scores, ids = self.retrieve_queries(self.queries(x2.to(self.query.weight.dtype)))  # (T, h, S)
            gates = self.gates(scores)  # (T, h, S)
        # one mix per generation, summed: generation 0's output is bit-identical to the layer's before
        # its first function-preserving growth, and a generation born with v = 0 adds exactly zero
        y = None
        for g_ids, g_gates in zip(ids.split(c.slots(), -1), gates.split(c.slots(), -1), strict=True):
            flat = g_ids.reshape(x2.shape[0], c.heads * g_ids.shape[-1])  # (T, h·k)
            if self.impl != "naive":
                native = self.impl == "native"
                part = peer_ops.expert_mix(
                    x2, flat, g_gates.reshape(flat.shape), self.U, self.V, c.activation, self.sparse_grad, native
                )
            else:
                part = self._experts_naive(x2, flat, g_gates)
            y = part if y is None else y + part
        y = y.view(*lead, c.dim)
        if return_retrieval:
            shape = (*lead, c.heads, scores.shape[-1])
            return y, Retrieval(scores.view(shape), ids.view(shape), gates.view(shape))
        return y

    def _experts_naive(self, x2: Tensor, flat: Tensor, gates: Tensor) -> Tensor:
        """The reference for ``peer_ops.expert_mix``: x2 (T, d), flat ids (T, h·k), gates (T, h, k) → (T, d)."""
        c = self.config
        u = F.embedding(flat, self.U, sparse=self.sparse_grad)  # (T, h·k, d)
        hidden = torch.einsum("thd,td->th", u, x2)  # (T, h·k): u_i · x
        act = F.gelu(hidden) if c.activation == "gelu" else F.relu(hidden)
        weights = act * gates.reshape(act.shape)  # (T, h·k)
        # Σ over heads and slots of weight · v_i, without materialising (T, h·k, d) for V
        return F.embedding_bag(flat, self.V, per_sample_weights=weights, mode="sum", sparse=self.sparse_grad)

    # --- growth ----------------------------------------------------------------------------------

    @torch.no_grad()
    def grow(
        self,
        num_new: int,
        subkeys: Tensor | None = None,
        generator: torch.Generator | None = None,
        generation_topk: int | None = None,
        generation_gate: GenerationGate | None = None,
    ) -> Tensor:
        """Append ``num_new`` sub-keys to each half: N = n² → (n + num_new)². Returns the new ids.

        ``generation_topk``: the new experts form a generation with its own retrieval of this top-k
        (``config.generations``): the old experts' routing and gates stay exactly as they were, the new
        ones are mixed in by gates of their own (``gates``), and with v = 0 the layer computes exactly the same
        function until they are trained (function-preserving growth, issue 16; LoRA/ReZero-style).
        None: the new sub-keys join the last generation's retrieval, where new experts can enter old
        tokens' top-k and push out trained experts. ``generation_gate``: ``config.generation_gate``, set
        with the layer's first generation (one per layer).

        ``subkeys`` (num_new, 2, dim_key/2) places the new sub-keys (the index manager passes
        k-means centroids of poorly served queries). By default each new sub-key is drawn from a
        normal with the per-dimension mean and std of its half's existing sub-keys, so new keys
        score on the same scale as trained ones. New experts: u like the original init, v = 0
        (``new_expert_init="zero"``) so the layer's output is unchanged until they are trained
        or retrieved. The tables become new Parameters holding the old rows then the new ones —
        over the same storage while it has room, so the old rows are not copied; an optimizer from
        ``lifelong_peer.optim`` built before growth re-binds them and extends its state likewise.
        ``generator`` (CPU) draws the new sub-keys and rows, whatever the layer's device.
        """
        if not isinstance(num_new, int) or num_new <= 0:
            raise ValueError(f"grow() needs a positive number of sub-keys, got {num_new!r}")
        c = self.config
        n_old, N_old = c.num_subkeys, c.num_experts
        n_new = n_old + num_new
        if n_new**2 > MAX_EXPERTS:
            raise ValueError(f"growing to {n_new**2:,} experts exceeds the supported {MAX_EXPERTS:,}")
        if generation_topk is not None and not 0 < generation_topk <= n_new**2 - N_old:
            raise ValueError(f"grow(): generation_topk must lie in [1, {n_new**2 - N_old}], got {generation_topk!r}")
        if generation_gate is not None:
            _check_choice("generation_gate", generation_gate, GenerationGate)
            if c.generations and generation_gate != c.generation_gate:
                raise ValueError(
                    f"grow(): this layer's generations are gated {c.generation_gate!r}; cannot add one gated {generation_gate!r}"
                )
        old = self.subkeys.data
        if subkeys is None:
            mean = old.mean(0, keepdim=True)
            std = old.std(0, keepdim=True) if n_old > 1 else old.abs()
            noise = torch.randn((num_new, *old.shape[1:]), generator=generator, device="cpu", dtype=old.dtype)
            subkeys = mean + std * noise.to(old.device)
        elif tuple(subkeys.shape) != (num_new, *old.shape[1:]):
            raise ValueError(f"grow(): subkeys must have shape {(num_new, *old.shape[1:])}, got {tuple(subkeys.shape)}")
        N_new = n_new**2
        # Old rows stay where they are (``extend_rows``: in place while the storage has room, else
        # one copy into a bigger one); only the new rows [N_old, N_new) are written.
        U = extend_rows(self.U.detach(), N_new)
        _normal_(U[N_old:], c.dim**-0.5, generator)
        V = extend_rows(self.V.detach(), N_new)
        if c.new_expert_init == "zero":
            V[N_old:].zero_()
        else:
            _normal_(V[N_old:], c.dim**-0.5, generator)
        # New Parameter objects (not ``.data`` swaps, which leave autograd's cached leaf shapes
        # stale while an old graph is alive); ``lifelong_peer.optim`` re-binds them by name.
        self.subkeys = nn.Parameter(torch.cat([old, subkeys.to(old)]), requires_grad=self.subkeys.requires_grad)
        self.U = nn.Parameter(U, requires_grad=self.U.requires_grad)
        self.V = nn.Parameter(V, requires_grad=self.V.requires_grad)
        self.frozen = torch.cat([self.frozen, self.frozen.new_zeros(N_new - N_old)])
        self.frozen_subkeys = torch.cat([self.frozen_subkeys, self.frozen_subkeys.new_zeros(num_new, 2)])
        c.num_subkeys = n_new
        if generation_topk is not None:
            c.generations = [*c.generations, [n_old, int(generation_topk)]]
            c.generation_gate = generation_gate or c.generation_gate
        return torch.arange(N_old, N_new, device=old.device)

    # --- freezing ----------------------------------------------------------------------------------

    def _ids(self, ids: Tensor | list[int]) -> Tensor:
        ids = torch.as_tensor(ids, dtype=torch.long, device=self.frozen.device).flatten()
        if ids.numel() and (ids.min() < 0 or ids.max() >= self.num_experts):
            raise ValueError(f"expert ids must lie in [0, {self.num_experts}), got min {ids.min()} max {ids.max()}")
        return ids

    @torch.no_grad()
    def freeze(self, ids: Tensor | list[int], subkeys: bool = False) -> None:
        """Freeze experts ``ids``: their u and v rows stay bit-identical under the optimizer.

        With ``subkeys=True`` also freeze the sub-keys they are built from (c_i of half 1,
        c'_j of half 2), which keeps their keys — and so their scores — fixed too.
        """
        ids = self._ids(ids)
        self.frozen[ids] = True
        if subkeys:
            i, j = pair_of(ids)
            self.frozen_subkeys[i, 0] = True
            self.frozen_subkeys[j, 1] = True

    @torch.no_grad()
    def unfreeze(self, ids: Tensor | list[int], subkeys: bool = False) -> None:
        """Undo ``freeze`` for ``ids`` (and, with ``subkeys=True``, their sub-keys)."""
        ids = self._ids(ids)
        self.frozen[ids] = False
        if subkeys:
            i, j = pair_of(ids)
            self.frozen_subkeys[i, 0] = False
            self.frozen_subkeys[j, 1] = False

    def row_masks(self) -> dict[str, Tensor]:
        """Parameter name → bool mask over its leading dims; True rows must not change."""
        return {"U": self.frozen, "V": self.frozen, "subkeys": self.frozen_subkeys}

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"dim={c.dim}, experts={c.num_experts:,} ({c.num_subkeys}²), heads={c.heads}, topk={c.topk}, "
            f"dim_key={c.dim_key}, frozen={int(self.frozen.sum())}"
            + (f", generations={c.generations}" if c.generations else "")
        )


def empty_rows(rows: int, *shape: int, dtype: torch.dtype | None = None, device=None) -> Tensor:
    """Uninitialised (rows, *shape), the first rows of a storage with room for ``ROW_HEADROOM`` × rows
    on CPU (exactly ``rows`` elsewhere, or where the address space for the reserve is refused)."""
    device = torch.device(device) if device is not None else torch.get_default_device()
    if device.type == "cpu":
        try:
            return torch.empty((math.ceil(rows * ROW_HEADROOM), *shape), dtype=dtype, device=device)[:rows]
        except RuntimeError:  # more address space than the machine will promise: no reserve
            pass
    return torch.empty((rows, *shape), dtype=dtype, device=device)


def extend_rows(t: Tensor, rows: int) -> Tensor:
    """``t`` (R, ...) → (rows, ...), rows ≥ R: ``t``'s rows first, then uninitialised ones to fill in.

    A view of ``t``'s own storage when it has room for them — nothing is copied or allocated —,
    else a copy into ``empty_rows`` (room for later growth). The rows behind ``t`` in its storage
    must be unused, as they are behind the tensors ``empty_rows`` and ``extend_rows`` return.
    """
    if rows < t.shape[0]:
        raise ValueError(f"extend_rows() cannot shrink {t.shape[0]} rows to {rows}")
    row_bytes = math.prod(t.shape[1:]) * t.element_size()
    room = (t.untyped_storage().nbytes() - t.storage_offset() * t.element_size()) // max(row_bytes, 1)
    if t.is_contiguous() and rows <= room:
        return t.as_strided((rows, *t.shape[1:]), t.stride())  # shares storage (and version counter)
    out = empty_rows(rows, *t.shape[1:], dtype=t.dtype, device=t.device)
    out[: t.shape[0]].copy_(t)
    return out


def _normal_(out: Tensor, std: float, generator: torch.Generator | None) -> Tensor:
    """Fill ``out`` with N(0, std²) drawn on the CPU (``generator`` or the global CPU generator), so
    a seed gives the same rows on every device — in place, without a temporary, for CPU tensors."""
    if out.device.type == "cpu":
        return out.normal_(0, std, generator=generator)
    return out.copy_(torch.empty(out.shape, dtype=out.dtype).normal_(0, std, generator=generator))


def active_params_per_token(config: PEERConfig) -> int:
    """Parameters a token touches: query net, all sub-keys (scored) and h·S experts (u and v), S the
    experts a head retrieves over all generations (``PEERConfig.slots``)."""
    c = config
    return c.dim * c.heads * c.dim_key + c.num_subkeys * c.dim_key + 2 * c.heads * sum(c.slots()) * c.dim


__all__ = [
    "PEER",
    "ROW_HEADROOM",
    "PEERConfig",
    "Retrieval",
    "active_params_per_token",
    "empty_rows",
    "extend_rows",
    "id_of",
    "pair_of",
]
