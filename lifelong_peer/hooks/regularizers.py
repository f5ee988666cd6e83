"""L2-SP, EWC and distillation as phase hooks: each anchors to the previous phase's model (issue 4).

The formulas live in ``lifelong_peer.regularize``; these classes say when they apply and what they keep.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import regularize
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


class EWC(PhaseHook):
    """``ewc`` · ½ Σ F (θ − θ_prev)² on shared weights, F the diagonal Fisher summed over past phases
    (online EWC, Schwarz et al. 2018 without decay); estimated at each phase's end on ``ewc_batches``."""

    name = "fisher"  # the checkpoint key prefix runs have always used

    def __init__(self, weight: float, batches: int):
        self.weight, self.batches = weight, batches
        self.anchor: dict[str, Tensor] = {}
        self.fisher: dict[str, Tensor] = {}

    @classmethod
    def from_config(cls, tc) -> EWC | None:
        return cls(tc.ewc, tc.ewc_batches) if tc.ewc > 0 else None

    def begin_phase(self, ctx: PhaseContext) -> None:
        self.anchor = regularize.snapshot(ctx.previous())

    def penalty(self, model: nn.Module, batch: Tensor, logits: Tensor) -> Tensor | None:
        return self.weight * regularize.ewc(model, self.anchor, self.fisher) if self.fisher else None

    def end_phase(self, ctx: PhaseContext) -> None:
        """F ← F + F_phase, on batches of what the phase trained on."""
        new = regularize.fisher_diagonal(ctx.run.model, importance_batches(ctx, self.batches, -2))
        for name, f in new.items():
            self.fisher[name] = self.fisher.get(name, torch.zeros_like(f)) + f

    def state_tensors(self) -> dict[str, Tensor]:
        return dict(self.fisher)

    def load_state_tensors(self, tensors: dict[str, Tensor]) -> None:
        self.fisher = dict(tensors)


class Distillation(PhaseHook):
    """``distill`` · KL(previous model ‖ model) on the current batch, at ``distill_temperature``."""

    def __init__(self, weight: float, temperature: float):
        self.weight, self.temperature = weight, temperature
        self.teacher: nn.Module | None = None

    @classmethod
    def from_config(cls, tc) -> Distillation | None:
        return cls(tc.distill, tc.distill_temperature) if tc.distill else None

    def begin_phase(self, ctx: PhaseContext) -> None:
        self.teacher = ctx.previous()

    def penalty(self, model: nn.Module, batch: Tensor, logits: Tensor) -> Tensor:
        with torch.no_grad():
            teacher_logits, _ = self.teacher(batch[:, :-1])
        return self.weight * regularize.distillation(logits, teacher_logits, self.temperature)


def importance_batches(ctx: PhaseContext, n: int, salt: int) -> list[Tensor]:
    """``n`` seeded batches (B, T+1) of what the phase trained on (without replay), on the run's device:
    the data an end-of-phase importance (Fisher, MAS) is measured on. ``salt``: a negative step number."""
    run, tc = ctx.run, ctx.run.config.train
    gen = torch.Generator().manual_seed(seed_for(tc.seed, ctx.phase, salt))
    return [sample_batch(ctx.pools, [], tc, run.config.context, gen).to(run.device) for _ in range(n)]
