"""Data-parallel training on PyTorch's own distributed engine (issue 9): ``torchrun`` + ``torch.distributed``.

Every rank holds a full replica of the model and optimizer. Each step every rank draws the same
global batch (one generator seeded by (seed, phase, step)), trains on its own block of rows
(``shard``), and the gradients become the global-batch gradient in two exchanges:

* dense parameters (attention, FFNs, embeddings, query nets, sub-keys) through
  ``torch.nn.parallel.DistributedDataParallel``: ``data_parallel`` wraps the model, and the
  backward pass averages their gradients in buckets, overlapped with the rest of backward. The
  wrapper is built per phase (and for base training), because growth replaces the sub-key
  Parameters with larger ones and DDP fixes its buckets at construction; building one costs a
  broadcast of the dense weights, nothing per step;
* expert tables (every PEER layer's U and V: sparse COO gradients, only the rows retrieved;
  replaced by new Parameters on growth) are hidden from DDP and exchanged **row-sparse** by
  ``average_expert_gradients`` after backward: each rank's rows and ids are all-gathered (sizes
  first, padded to the largest), duplicates summed in rank order (deterministic: every rank ends
  with the same bits), then divided by the world size. Bytes per step scale with the rows touched,
  never with N (``benchmarks/distributed_bytes.py``); nothing the size of an N × dim table is ever
  all-reduced. (DDP's own sparse path expects sparse gradients only from
  ``nn.Embedding(sparse=True)``-like modules, and NCCL has no sparse all-reduce.)

Buffers are hidden from DDP as well: BatchNorm query statistics are computed over the global
batch (``SyncBatchNorm1d``, also on CPU where ``torch.nn.SyncBatchNorm`` refuses to run), and
frozen masks change only between phases, so K ranks with batch B/K each compute what one process
computes with batch B, to float rounding, with no buffer broadcast per step.

Between phases every rank computes growth, placement, freezing and the usage ledger from identical
models and identically seeded generators; ``sync_decisions`` then broadcasts rank 0's sub-keys and
frozen masks anyway and checks every replica against rank 0's (repairing from rank 0 if they ever
differ). Files are written by rank 0 only (``is_main``), with a ``barrier`` after.

Without ``WORLD_SIZE > 1`` in the environment every function here is a no-op (``data_parallel``
returns the model itself), so the trainer has one code path.
"""

from __future__ import annotations

import atexit
import gc
import math
import os
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from .errors import UserError

#: Seconds a collective (or the rendezvous) waits for a missing rank before the run fails.
#: Long by default: rank 0 may be writing a checkpoint of many GiB while the others wait at a barrier.
DEFAULT_TIMEOUT_S = 1800.0
TIMEOUT_ENV = "LPEER_DIST_TIMEOUT_S"


# --- the process group ----------------------------------------------------------------------------


def init_from_env(timeout_s: float | None = None) -> bool:
    """Join the process group ``torchrun`` describes (RANK, WORLD_SIZE, MASTER_ADDR/PORT, LOCAL_RANK).

    Returns whether the run is distributed (WORLD_SIZE > 1); idempotent. Backend: gloo for CPU
    tensors, and nccl for CUDA tensors when CUDA is present (each rank on GPU ``LOCAL_RANK``).
    A rank that never arrives, or a collective stuck for ``timeout_s`` (default $LPEER_DIST_TIMEOUT_S,
    else 30 min), fails the run instead of hanging it.
    """
    if is_distributed():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    timeout = timeout_s or float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))
    backend = "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))  # "cuda" now means this rank's GPU
        backend = "cpu:gloo,cuda:nccl"  # small CPU collectives (strings, checks) stay on gloo
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout))
    atexit.register(gc.collect)  # an exit without ``shutdown`` (an error) too: see there
    return True


def shutdown() -> None:
    """Leave the process group (end of a distributed command)."""
    if is_distributed():
        # DDP leaves cyclic garbage (freed only by the collector); collected after the group is
        # destroyed, at exit, it aborted ~1 run in 4 here ("terminate called without an active
        # exception", torch 2.13, gloo), so collect it while the group exists
        gc.collect()
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Rank 0: the one process that writes files and talks to the user."""
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


# --- data -------------------------------------------------------------------------------------------


def shard(batch: Tensor) -> Tensor:
    """This rank's contiguous block of the global batch: (B, ...) → (B / world, ...)."""
    world = world_size()
    if world == 1:
        return batch
    if batch.shape[0] % world:
        raise UserError(f"batch_size {batch.shape[0]} must be divisible by the number of ranks ({world})")
    per_rank = batch.shape[0] // world
    return batch[rank() * per_rank : (rank() + 1) * per_rank]


def mean(value: float) -> float:
    """The mean of a number over ranks (the global-batch loss from each rank's local loss)."""
    if not is_distributed():
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t) / world_size()


# --- gradients --------------------------------------------------------------------------------------


def expert_table_names(model: nn.Module) -> list[str]:
    """Qualified names of the expert tables (every PEER layer's U and V): the row-sparse parameters."""
    from .peer import PEER

    return [
        f"{prefix}.{t}" if prefix else t for prefix, m in model.named_modules() if isinstance(m, PEER) for t in "UV"
    ]


def data_parallel(model: nn.Module) -> nn.Module:
    """The module a training loop calls: ``model`` under ``DistributedDataParallel`` for its dense
    parameters; ``model`` itself when not distributed. Build one per phase, after growth and
    ``requires_grad`` changes (DDP takes the trainable Parameters once, at construction).

    The forward must go through the returned module (DDP's backward hooks fire only then); the
    optimizer, checkpoints and evaluation keep using ``model``. Also makes BatchNorm global
    (``sync_batchnorm``). Hidden from DDP: the expert tables (``average_expert_gradients``
    exchanges them after backward) and all buffers (identical on every rank: see the module
    docstring). Every trainable dense parameter gets a gradient every step, so no
    ``find_unused_parameters`` graph walk is needed; frozen ones (``requires_grad=False``: a
    Hugging Face base's weights, shared weights with ``train_shared=False``) are skipped by DDP.
    """
    if not is_distributed():
        return model
    sync_batchnorm(model)
    tables = set(expert_table_names(model))
    hidden = [*tables, *(name for name, _ in model.named_buffers())]
    hidden += ["." + name for name in hidden if "." not in name]  # how DDP spells the root module's own names
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, hidden)
    if all(name in tables or not p.requires_grad for name, p in model.named_parameters()):
        return model  # only expert tables train: nothing for DDP (which refuses such a module)
    # init_sync (default) checks the shapes agree on every rank and broadcasts rank 0's dense weights
    return DistributedDataParallel(model)


@dataclass
class ExchangeStats:
    """What one training step put on the wire for gradients, per rank."""

    dense_bytes: int = 0
    """Bytes of dense gradients averaged by all-reduce: DDP's in backward (every trainable dense
    parameter), plus expert tables whose gradients are dense."""
    sparse_bytes: int = 0
    """Bytes this rank fed to all-gathers of expert rows (ids + values, padding included); it
    receives world × this."""
    rows: int = 0
    """Distinct rows in the averaged sparse gradients, summed over tables."""


def average_expert_gradients(model: nn.Module) -> ExchangeStats:
    """Replace the expert tables' gradients by their mean over ranks; call after ``backward()``
    through ``data_parallel(model)`` (which has averaged the dense gradients already).

    Sparse gradients are exchanged row-sparse (``average_sparse``); a table with dense gradients
    (a PEER layer with ``sparse_grad=False``) is all-reduced. Every rank must call this at the
    same step (true for replicas on same-shaped batches). No-op when not distributed.
    """
    stats = ExchangeStats()
    if not is_distributed():
        return stats
    tables, sparse = set(expert_table_names(model)), []
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        if name in tables and p.grad.is_sparse:
            sparse.append(p)
            continue
        if name in tables:  # dense table gradients: not DDP's, so averaged here
            dist.all_reduce(p.grad)
            p.grad.div_(world_size())
        stats.dense_bytes += p.grad.numel() * p.grad.element_size()
    grads, stats.sparse_bytes = average_sparse([p.grad for p in sparse])
    for p, g in zip(sparse, grads, strict=True):
        p.grad = g
    stats.rows = sum(g._nnz() for g in grads)
    return stats


def average_sparse(grads: list[Tensor]) -> tuple[list[Tensor], int]:
    """Mean over ranks of row-sparse COO gradients (R, ...) → (coalesced means, bytes this rank sent).

    Per tensor: coalesce (each rank's rows distinct), pack each row's values with its id (the id's
    raw bits ride in extra columns, so one all-gather carries both), all-gather the packed rows
    padded to the largest rank's count (the counts of all tensors travel in one all-gather first),
    then ``combine_rows``. Never materialises an R × dim tensor.
    """
    if not grads:
        return [], 0
    world, sent, out = world_size(), 0, []
    local = [g.coalesce() for g in grads]
    counts = torch.tensor([g._nnz() for g in local], dtype=torch.int64, device=local[0].device)
    all_counts = [torch.empty_like(counts) for _ in range(world)]
    dist.all_gather(all_counts, counts)
    all_counts = torch.stack(all_counts).cpu()  # (world, tensors)
    sent += counts.numel() * counts.element_size()
    for t, g in enumerate(local):
        ids, values = g.indices()[0], g.values()
        row_shape = values.shape[1:]
        values = values.reshape(values.shape[0], math.prod(row_shape))  # (r, D)
        packed = torch.cat([values, _id_columns(ids, values.dtype)], dim=1)  # (r, D + c)
        longest = int(all_counts[:, t].max())
        if longest == 0:  # no rank touched this table: nothing to send
            out.append(g)
            continue
        padded = packed.new_zeros(longest, packed.shape[1])
        padded[: packed.shape[0]] = packed
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded)
        sent += padded.numel() * padded.element_size()
        width = values.shape[1]
        per_rank = []
        for r, part in enumerate(parts):
            part = part[: int(all_counts[r, t])]
            per_rank.append((_ids_from_columns(part[:, width:]), part[:, :width]))
        rows, summed = combine_rows(per_rank)
        summed.div_(world)
        out.append(
            torch.sparse_coo_tensor(
                rows.unsqueeze(0), summed.view(-1, *row_shape), g.shape, is_coalesced=True, check_invariants=False
            )
        )
    return out, sent


def combine_rows(parts: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """Sum row-sparse parts [(ids (r_i,), values (r_i, D))], ids distinct within a part → (ids (r,) sorted, sums (r, D)).

    Parts are added in order, each with distinct ids, so no two adds race for a row even on GPU:
    the result is bitwise the same on every rank.
    """
    ids = torch.cat([i for i, _ in parts])
    rows, where = torch.unique(ids, return_inverse=True)
    width = parts[0][1].shape[1]
    sums = parts[0][1].new_zeros(rows.numel(), width)
    start = 0
    for i, values in parts:
        sums.index_add_(0, where[start : start + i.numel()], values)
        start += i.numel()
    return rows, sums


def _id_columns(ids: Tensor, dtype: torch.dtype) -> Tensor:
    """int64 ids (r,) → (r, c) columns of ``dtype`` holding their raw bits (c = 8 / element size)."""
    per_id = 8 // torch.empty(0, dtype=dtype).element_size()
    return ids.to(torch.int64).contiguous().view(dtype).view(ids.numel(), per_id)


def _ids_from_columns(columns: Tensor) -> Tensor:
    return columns.contiguous().view(torch.int64).view(-1)


# --- BatchNorm over the global batch ----------------------------------------------------------------


class SyncBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics cover the global batch, on CPU (gloo) and CUDA alike.

    ``torch.nn.SyncBatchNorm`` refuses CPU tensors. Same parameters, buffers and state-dict keys
    as BatchNorm1d: ``sync_batchnorm`` swaps the class of existing modules in place. Two-pass
    statistics (mean, then centred squares) through autograd-aware all-reduces, so the backward
    pass also sees the other ranks' tokens, like one process with the whole batch.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and is_distributed() and world_size() > 1):
            return super().forward(x)
        dtype = x.dtype  # statistics in float32 at least, whatever the autocast dtype (float64 stays float64)
        x = x.to(torch.promote_types(dtype, torch.float32))
        dims = [0, *range(2, x.dim())]  # all but the channel dimension
        shape = [1, -1] + [1] * (x.dim() - 2)
        count = torch.tensor([x.numel() // x.shape[1]], dtype=x.dtype, device=x.device)
        totals = _AllReduceSum.apply(torch.cat([x.sum(dims), count]))
        n = totals[-1].detach()
        mu = totals[:-1] / n
        centred = x - mu.view(shape)
        var = _AllReduceSum.apply((centred * centred).sum(dims)) / n  # biased, as BatchNorm normalises
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.lerp_(mu.detach(), m)
                self.running_var.lerp_(var.detach() * n / max(float(n) - 1, 1.0), m)  # unbiased, as BatchNorm
        return y.to(dtype)


class _AllReduceSum(torch.autograd.Function):
    """Σ over ranks, differentiable: each rank's input feeds every rank's output, so the gradient
    of a rank's input is the Σ over ranks of the output gradients."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def sync_batchnorm(model: nn.Module) -> None:
    """Make every BatchNorm1d of ``model`` a ``SyncBatchNorm1d`` (in place; no-op when not distributed)."""
    if not is_distributed():
        return
    for module in model.modules():
        if type(module) is nn.BatchNorm1d:
            module.__class__ = SyncBatchNorm1d  # adds behaviour only: same state, same Parameter objects


# --- between phases ---------------------------------------------------------------------------------


def sync_decisions(model: nn.Module) -> None:
    """After growth and freezing: every rank takes rank 0's sub-keys and frozen masks, then all
    replicas are checked against rank 0's (and copied from it, with a warning, should they differ).

    Raises RuntimeError if a rank grew a different number of sub-keys (the decisions diverged).
    """
    if not is_distributed():
        return
    layers = model.peer_layers()
    # per layer: sub-keys, and its grown generations (issue 16) summarised in a fixed shape
    gens = [p.config.generations for p in layers]
    sizes = torch.tensor(
        [
            [p.num_subkeys, len(g), sum(lo for lo, _ in g), sum(k for _, k in g)]
            for p, g in zip(layers, gens, strict=True)
        ],
        dtype=torch.int64,
    )
    decided = sizes.clone()
    dist.broadcast(decided, 0)
    if not torch.equal(sizes, decided):
        raise RuntimeError(
            f"rank {rank()} grew PEER layers to {sizes.tolist()} (sub-keys, generations, their starts and top-k), "
            f"rank 0 to {decided.tolist()}"
        )
    with torch.no_grad():
        for layer in layers:
            dist.broadcast(layer.subkeys.data, 0)
            for name in ("frozen", "frozen_subkeys"):
                mask = getattr(layer, name).to(torch.uint8)  # not every backend moves bools
                dist.broadcast(mask, 0)
                getattr(layer, name).copy_(mask.bool())
    if not replicas_equal(model):
        print(f"lpeer: rank {rank()}: replicas differ from rank 0's; copying rank 0's weights", file=sys.stderr)
        broadcast_model(model)


def replicas_equal(model: nn.Module) -> bool:
    """Whether every rank's parameters and buffers have rank 0's checksums (one float64 sum per tensor)."""
    if not is_distributed():
        return True
    tensors = [*model.parameters(), *model.buffers()]
    device = tensors[0].device if tensors else torch.device("cpu")
    sums = torch.stack([torch.sum(t.detach(), dtype=torch.float64) for t in tensors]).to(device)
    reference = sums.clone()
    dist.broadcast(reference, 0)
    same = torch.tensor([int(torch.equal(sums, reference))], device=device)
    dist.all_reduce(same, op=dist.ReduceOp.MIN)
    return bool(same)


def broadcast_model(model: nn.Module) -> None:
    """Copy rank 0's parameters and buffers to every rank."""
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            if t.dtype == torch.bool:
                as_int = t.to(torch.uint8)
                dist.broadcast(as_int, 0)
                t.copy_(as_int.bool())
            else:
                dist.broadcast(t.data, 0)


def broadcast_str(text: str) -> str:
    """Rank 0's ``text`` on every rank (others pass anything)."""
    if not is_distributed():
        return text
    data = torch.tensor(list(text.encode("utf-8")), dtype=torch.uint8)
    length = torch.tensor([data.numel()], dtype=torch.int64)
    dist.broadcast(length, 0)
    buffer = data if is_main() else torch.empty(int(length), dtype=torch.uint8)
    dist.broadcast(buffer, 0)
    return bytes(buffer.tolist()).decode("utf-8")


def decide_on_main(decide) -> str:
    """Run ``decide()`` (→ str) on rank 0 only and return its result on every rank.

    A UserError on rank 0 is raised on every rank with the same message, so a bad option stops
    all ranks at once instead of leaving the others waiting for a result.
    """
    if not is_distributed():
        return decide()
    message, error = "", None
    if is_main():
        try:
            message = "ok:" + decide()
        except UserError as e:
            error, message = e, f"error:{e}"
    message = broadcast_str(message)
    if error is not None:
        raise error
    if message.startswith("error:"):
        raise UserError(message[len("error:") :])
    return message[len("ok:") :]


__all__ = [
    "ExchangeStats",
    "SyncBatchNorm1d",
    "average_expert_gradients",
    "average_sparse",
    "barrier",
    "broadcast_model",
    "broadcast_str",
    "combine_rows",
    "data_parallel",
    "decide_on_main",
    "expert_table_names",
    "init_from_env",
    "is_distributed",
    "is_main",
    "mean",
    "rank",
    "replicas_equal",
    "shard",
    "shutdown",
    "sync_batchnorm",
    "sync_decisions",
    "world_size",
]
