"""L2-SP, EWC and distillation as phase hooks: each anchors to the previous phase's model (issue 4).

The formulas live in ``lifelong_peer.regularize``; these classes say when they apply and what they keep.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import distributed, regularize
from ..data import sample_batch, seed_for
from .base import PhaseContext, PhaseHook


class L2SP(PhaseHook):
    """``l2sp`` · ½‖θ − θ_prev‖² on shared weights (Li et al. 2018)."""

    def __init__(self, weight: float):
        self.weight = weight
        self.anchor: dict[str, Tensor] = {}

    @classmethod
    def from_config(cls, tc) -> L2SP | None:
        return cls(tc.l2sp) if tc.l2sp else None

    def begin_phase(self, ctx: PhaseContext) -> None:
        self.anchor = regularize.snapshot(ctx.previous())

    def penalty(self, model: nn.Module, batch: Tensor, logits: Tensor) -> Tensor:
        return self.weight * regularize.l2sp(model, self.anchor)


class ImportanceWeighted(PhaseHook):
    """A quadratic pull towards the previous phase's shared weights, each weight by its importance Ω,
    which is measured at each phase's end on ``batches`` batches of what the phase trained on and
    summed over phases. Subclasses give the importance and the penalty's formula (EWC, MAS)."""

    salt = -2
    """Step number of the seed the importance batches are drawn with (``importance_batches``)."""

    def __init__(self, weight: float, batches: int):
        self.weight, self.batches = weight, batches
        self.anchor: dict[str, Tensor] = {}
        self.importance: dict[str, Tensor] = {}

    def measure(self, model: nn.Module, batches: list[Tensor]) -> dict[str, Tensor]:
        """Ω of this phase: parameter name → tensor of its shape."""
        raise NotImplementedError

    def formula(self, model: nn.Module, anchor: dict[str, Tensor], importance: dict[str, Tensor]) -> Tensor:
        raise NotImplementedError

    def begin_phase(self, ctx: PhaseContext) -> None:
        self.anchor = regularize.snapshot(ctx.previous())

    def penalty(self, model: nn.Module, batch: Tensor, logits: Tensor) -> Tensor | None:
        if not self.importance:  # nothing learnt before (phase 0): no term
            return None
        return self.weight * self.formula(model, self.anchor, self.importance)

    def end_phase(self, ctx: PhaseContext) -> None:
        """Ω ← Ω + Ω_phase."""
        new = self.measure(ctx.run.model, importance_batches(ctx, self.batches, self.salt))
        for name, w in new.items():
            self.importance[name] = self.importance.get(name, torch.zeros_like(w)) + w

    def state_tensors(self) -> dict[str, Tensor]:
        return dict(self.importance)

    def load_state_tensors(self, tensors: dict[str, Tensor]) -> None:
        self.importance = dict(tensors)


class EWC(ImportanceWeighted):
    """``ewc`` · ½ Σ F (θ − θ_prev)² on shared weights, F the diagonal Fisher summed over past phases
    (online EWC, Schwarz et al. 2018 without decay); estimated at each phase's end on ``ewc_batches``."""

    name = "fisher"  # the checkpoint key prefix runs have always used

    @classmethod
    def from_config(cls, tc) -> EWC | None:
        return cls(tc.ewc, tc.ewc_batches) if tc.ewc > 0 else None

    def measure(self, model: nn.Module, batches: list[Tensor]) -> dict[str, Tensor]:
        return regularize.fisher_diagonal(model, batches)

    def formula(self, model: nn.Module, anchor: dict[str, Tensor], importance: dict[str, Tensor]) -> Tensor:
        return regularize.ewc(model, anchor, importance)


class Distillation(PhaseHook):
    """``distill`` · KL(previous model ‖ model) at ``distill_temperature``, on the current batch, or with
    ``distill_on = "replay"`` on its replayed rows only: the old slices' behaviour is held where it was
    learnt, and the new slice's rows learn freely (issue 24). ``distill_tokens = "forgotten"`` keeps, of those
    rows, the tokens the previous model predicted better than the model does now (``regularize.forgotten``)."""

    def __init__(self, weight: float, temperature: float, on: str = "all", tokens: str = "all"):
        self.weight, self.temperature, self.on, self.tokens = weight, temperature, on, tokens
        self.teacher: nn.Module | None = None
        self.replay_rows = 0  # rows [0, replay_rows) of each global batch are replayed (``data.sample_batch``)

    @classmethod
    def from_config(cls, tc) -> Distillation | None:
        return cls(tc.distill, tc.distill_temperature, tc.distill_on, tc.distill_tokens) if tc.distill else None

    def begin_phase(self, ctx: PhaseContext) -> None:
        self.teacher = ctx.previous()
        tc = ctx.run.config.train
        self.replay_rows = round(tc.replay_share(len(ctx.replay_pools)) * tc.batch_size)

    def penalty(self, model: nn.Module, batch: Tensor, logits: Tensor) -> Tensor | None:
        if self.on == "all":
            with torch.no_grad():
                teacher_logits, _ = self.teacher(batch[:, :-1])
            return self.weight * self.kl(logits, teacher_logits, batch[:, 1:])
        # scaled so that the ranks' mean gradient is the single process's: the KL summed over the global
        # batch's replayed tokens, divided by their number
        rows = self.replayed(batch.shape[0])
        if not rows.any():  # nothing replayed (phase 0), or none of it on this rank: no teacher forward
            return None
        with torch.no_grad():
            teacher_logits, _ = self.teacher(batch[rows, :-1])
        kl = self.kl(logits[rows], teacher_logits, batch[rows, 1:]) * int(rows.sum())
        return self.weight * kl * distributed.world_size() / self.replay_rows  # batchmean: this rank's → global

    def kl(self, logits: Tensor, teacher_logits: Tensor, targets: Tensor) -> Tensor:
        """The distillation term on these rows: logits (R, T, V), targets (R, T)."""
        mask = regularize.forgotten(logits, teacher_logits, targets) if self.tokens == "forgotten" else None
        return regularize.distillation(logits, teacher_logits, self.temperature, mask)

    def replayed(self, rows: int) -> Tensor:
        """(rows,) bool: which of this rank's ``rows`` rows were replayed — rows [0, replay_rows) of the global
        batch (``data.sample_batch`` draws them first), of which this rank holds its block (``distributed.shard``)."""
        return distributed.shard(torch.arange(rows * distributed.world_size())) < self.replay_rows


def importance_batches(ctx: PhaseContext, n: int, salt: int) -> list[Tensor]:
    """``n`` seeded batches (B, T+1) of what the phase trained on (without replay), on the run's device:
    the data an end-of-phase importance (Fisher, MAS) is measured on. ``salt``: a negative step number."""
    run, tc = ctx.run, ctx.run.config.train
    gen = torch.Generator().manual_seed(seed_for(tc.seed, ctx.phase, salt))
    return [sample_batch(ctx.pools, [], tc, run.config.context, gen).to(run.device) for _ in range(n)]
