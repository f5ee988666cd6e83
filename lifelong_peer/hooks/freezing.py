"""Freezing between phases, and the rule ``lpeer freeze --policy`` shares with the loop (issue 5)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..index import UsageLedger, collect_usage, document_frequency, freeze_model, parse_policy
from .base import PhaseContext, PhaseHook


def freeze_run_model(
    run, policy, new_slice: str | None, old_slices: Sequence[str], existed=None, subkeys: bool = False
) -> list[dict]:
    """Make ``run.model``'s frozen set what ``policy`` says (``index.freeze_model``); a ``tfidf`` policy
    ranks experts by ``new_slice``'s usage, recorded on its train split before training on it (in a
    copy of the run's ledger: ranking and the reports' ``claimed`` only). ``existed``: experts per layer that count
    as old."""
    ledger, background = UsageLedger(), None
    ledger.merge(run.ledger)
    if new_slice is not None and new_slice not in ledger.slices():
        # the new slice's usage before training on it: SMF ranks by it, the reports say what it claims
        windows = run.windows(new_slice, "train", run.config.train.usage_tokens)[:, :-1]
        collect_usage(run.model, windows, ledger, new_slice)
    if parse_policy(policy).kind == "tfidf" and run.config.train.tfidf_background == "base":
        background = document_frequency(run.model, base_windows(run))
    return freeze_model(run.model, policy, ledger, new_slice, old_slices, existed, subkeys, background=background)


def base_windows(run) -> Tensor:
    """SMF's background documents (Lin et al. 2025: fixed batches of pretraining data): 4 × usage_tokens
    of the base's training data (``RunConfig.base_slices``, train split), evenly spaced (n, context) windows."""
    names = run.config.base_slices
    tokens = 4 * run.config.train.usage_tokens // len(names)
    return torch.cat([run.windows(name, "train", tokens)[:, :-1] for name in names])


class Freezing(PhaseHook):
    """``freeze``: before each phase the frozen set is recomputed from scratch by the policy."""

    def __init__(self, policy: str, subkeys: bool):
        self.policy, self.subkeys = policy, subkeys

    @classmethod
    def from_config(cls, tc) -> Freezing | None:
        return cls(tc.freeze, tc.freeze_subkeys) if tc.freeze != "none" else None

    def begin_phase(self, ctx: PhaseContext) -> None:
        if ctx.start_step or not ctx.run.model.peer_layers():
            return
        reports = freeze_run_model(ctx.run, self.policy, ctx.slice_name, ctx.old_slices, ctx.existed, self.subkeys)
        keys = ("layer", "frozen", "trainable", "retrieved", "claimed", "unused")
        ctx.run.phase_log["freeze"] = [{k: r.get(k) for k in keys} for r in reports]
        ctx.emit({"event": "freeze", "phase": ctx.phase, "layers": reports})
