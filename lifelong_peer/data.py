"""What a step and an evaluation read: seeded training batches and evenly spaced evaluation windows.

Exact resume rests on one seed rule (``seed_for``): batches are drawn from a generator seeded by
(seed, phase, step), so a resumed run draws the very batches the uninterrupted one would have.
"""

from __future__ import annotations

import numpy as np
import torch


def seed_for(seed: int, phase: int, step: int) -> int:
    """The seed of step ``step`` of ``phase`` (phase -1: base training; negative steps: between-phase work)."""
    return (seed * 1_000_003 + (phase + 7) * 10_007 + step + 3) % (2**63 - 1)


def sample_batch(pools: list[np.ndarray], replay_pools: list[np.ndarray], cfg, context: int, gen) -> torch.Tensor:
    """A (batch_size, context + 1) window batch: rows [0, n) from earlier slices (``replay_pools``, one per
    slice; n from ``cfg.replay_share``), the rest from ``pools`` (the current slice, or all slices when joint);
    slice and offset drawn from ``gen``. ``cfg``: the ``TrainConfig``."""
    n_replay = round(cfg.replay_share(len(replay_pools)) * cfg.batch_size)
    rows = []
    for r in range(cfg.batch_size):
        source = replay_pools if r < n_replay else pools
        tokens = source[int(torch.randint(len(source), (1,), generator=gen))]
        start = int(torch.randint(len(tokens) - context, (1,), generator=gen))
        rows.append(torch.from_numpy(np.asarray(tokens[start : start + context + 1], dtype=np.int64)))
    return torch.stack(rows)


def eval_windows(tokens: np.ndarray, context: int, max_tokens: int) -> torch.Tensor:
    """Evenly spaced, non-overlapping (n, context + 1) windows covering ≤ max_tokens predictions."""
    n_all = (len(tokens) - 1) // context
    n = n_all if max_tokens <= 0 else max(1, min(n_all, max_tokens // context))
    starts = np.linspace(0, (n_all - 1) * context, n).astype(np.int64) if n_all > 0 else np.zeros(0, np.int64)
    if n_all == 0:
        return torch.from_numpy(np.asarray(tokens, dtype=np.int64))[None, :]
    return torch.stack([torch.from_numpy(np.asarray(tokens[s : s + context + 1], dtype=np.int64)) for s in starts])
