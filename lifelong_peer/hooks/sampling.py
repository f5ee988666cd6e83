"""Where a phase's batches come from: replay of earlier slices, or all slices at once (joint)."""

from __future__ import annotations

from .base import PhaseContext, PhaseHook


class Replay(PhaseHook):
    """A ``replay`` fraction of each batch from earlier slices' train splits (``data.sample_batch``)."""

    @classmethod
    def from_config(cls, tc) -> Replay | None:
        return cls() if tc.replay and not tc.joint else None

    def begin_phase(self, ctx: PhaseContext) -> None:
        ctx.replay_pools = [ctx.run.slice_data(n).tokens("train") for n in ctx.old_slices]


class Joint(PhaseHook):
    """Every batch drawn from all slices' train splits: the non-continual reference."""

    @classmethod
    def from_config(cls, tc) -> Joint | None:
        return cls() if tc.joint else None

    def begin_phase(self, ctx: PhaseContext) -> None:
        ctx.pools = [ctx.run.slice_data(n).tokens("train") for n in ctx.run.config.slices]
        ctx.replay_pools = []
