"""The phase-hook protocol: what a protection or a between-phase action may do, and when (issue 15).

The phase loop (``lifelong_peer.train.run_phases``) calls, for each phase,

    hook.begin_phase(ctx)                  before the first step (growth, freezing, anchors, batch sources)
    hook.penalty(model, batch, logits)     inside every step: a term added to the loss (or None)
    hook.end_phase(ctx)                    after the last step (Fisher, importance)

and a run checkpoint stores each hook's ``state_tensors()`` under ``NAME::`` and gives them back with
``load_state_tensors`` on resume, so exact resume never needs to know which hooks a run has. A
hook's state is keyed by parameter name (checked against the model's shapes on load).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from torch import Tensor, nn


@dataclass
class PhaseContext:
    """What hooks see of the phase about to run (or just run). Hooks may set ``pools``/``replay_pools``:
    the token arrays the phase's batches are drawn from (``data.sample_batch``)."""

    run: object
    """The ``lifelong_peer.run.Run``: config, model, slices, windows, checkpoints."""
    phase: int
    start_step: int
    """0 at a phase's start; > 0 when resuming mid-phase (between-phase actions were done already)."""
    emit: Callable[[dict], None]
    pools: list[np.ndarray]
    """Train tokens the batches come from: the phase's slice (all slices when joint)."""
    replay_pools: list[np.ndarray] = field(default_factory=list)
    """Earlier slices' train tokens; ``TrainConfig.replay`` of each batch is drawn from them."""
    existed: list[int] = field(default_factory=list)
    """Experts per PEER layer before this phase's growth (what counts as old when freezing)."""
    _previous: nn.Module | None = None

    @property
    def slice_name(self) -> str:
        return self.run.config.slices[self.phase]

    @property
    def old_slices(self) -> list[str]:
        return self.run.config.slices[: self.phase]

    def previous(self) -> nn.Module:
        """The model at this phase's start before growth (read once): anchor and teacher."""
        if self._previous is None:
            self._previous = self.run.previous_model(self.phase)
        return self._previous


class PhaseHook:
    """One protection or phase action. Subclasses override what they need; the defaults do nothing."""

    name = ""
    """Prefix of the hook's tensors in a checkpoint (``NAME::parameter``)."""

    @classmethod
    def from_config(cls, tc) -> PhaseHook | None:
        """The hook a ``TrainConfig`` asks for, or None when it is off."""
        return None

    def begin_phase(self, ctx: PhaseContext) -> None:
        pass

    def penalty(self, model: nn.Module, batch: Tensor, logits: Tensor) -> Tensor | None:
        """A loss term for this step: ``batch`` (B, T+1) tokens of this rank, ``logits`` (B, T, V)."""
        return None

    def end_phase(self, ctx: PhaseContext) -> None:
        pass

    def state_tensors(self) -> dict[str, Tensor]:
        return {}

    def load_state_tensors(self, tensors: dict[str, Tensor]) -> None:
        pass
