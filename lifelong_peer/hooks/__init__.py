"""Phase hooks: one small class per protection or between-phase action (issue 15).

``HOOKS`` lists every hook class in the order the loop calls them; ``build_hooks`` keeps those a
``TrainConfig`` turns on. Order matters: growth before freezing (new experts are not old), batch
sources before anything that reads them, and the loss terms in a fixed order (bit-exact resume).
A strategy preset (``lifelong_peer.strategies``) is config; the config chooses the hooks.
"""

from __future__ import annotations

from .base import PhaseContext, PhaseHook
from .freezing import Freezing, freeze_run_model
from .growth import Growth, grow_run_model
from .mas import MAS
from .regularizers import EWC, L2SP, Distillation
from .sampling import Joint, Replay

HOOKS: list[type[PhaseHook]] = [Growth, Freezing, Replay, Joint, L2SP, EWC, Distillation, MAS]


def build_hooks(tc) -> list[PhaseHook]:
    """The hooks ``tc`` (a ``TrainConfig``) turns on, in loop order."""
    return [hook for cls in HOOKS if (hook := cls.from_config(tc)) is not None]


__all__ = [
    "EWC",
    "HOOKS",
    "L2SP",
    "MAS",
    "Distillation",
    "Freezing",
    "Growth",
    "Joint",
    "PhaseContext",
    "PhaseHook",
    "Replay",
    "build_hooks",
    "freeze_run_model",
    "grow_run_model",
]
