"""Growth between phases, and the planner ``lpeer grow`` shares with the loop (one seed rule, one
input-sample rule): new sub-keys go where the new slice's queries are poorly served (issue 5)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..data import eval_windows, seed_for
from ..index import collect_usage, grow_model, growth_shock, loss_need
from .base import PhaseContext, PhaseHook

SAMPLE_INPUTS = 4096
"""Layer inputs sampled per growth: of the new slice's train split, and of the old slices' validation splits."""


def growth_seed(seed: int, phase: int, experts: int) -> int:
    """The seed of a growth before ``phase`` of a model with ``experts`` experts in all: repeated growths
    (by hand, then by the loop) draw different sub-keys. Below 2³¹: FAISS k-means takes a C int."""
    return (seed_for(seed, phase, -1) * 31 + experts) % 2**31


def _slice(run, s):
    """A slice of the run's stream by name, or a slice object as it is: new data from another stream of the same
    tokenizer, whose need ``lpeer score --stream S --slice NAME`` measures with these very functions (issue 26)."""
    return run.slice_data(s) if isinstance(s, str) else s


def _windows(run, s, split: str, max_tokens: int) -> Tensor:
    """``Run.windows`` of a slice name or object (``_slice``)."""
    return eval_windows(_slice(run, s).tokens(split), run.config.context, max_tokens)


def layer_inputs(run, slices: Sequence, split: str, sample: int, generator: torch.Generator) -> dict | None:
    """Sampled PEER-layer inputs {position: (m, dim)} over ``split`` windows of ``slices`` (names, or slice
    objects: ``_slice``; None if none)."""
    if not slices:
        return None
    budget = run.config.train.usage_tokens
    parts: dict[int, list[Tensor]] = {}
    for name in slices:  # one pass per slice: a short split gives shorter windows than the others
        windows = _windows(run, name, split, max(budget // len(slices), 1))[:, :-1]
        got = collect_usage(run.model, windows, None, sample_inputs=max(sample // len(slices), 1), generator=generator)
        for pos, x in got["inputs"].items():
            parts.setdefault(pos, []).append(x)
    return {pos: torch.cat(xs) for pos, xs in parts.items()}


def need_inputs(run, phase: int, new_slice, old_slices: Sequence[str]) -> tuple[int, dict | None, dict | None]:
    """(seed, new inputs, old inputs): the PEER-layer inputs a growth before ``phase`` samples — ``new_slice``'s
    train split (a name or a slice object, ``_slice``; None: none) and ``old_slices``' validation splits — what
    places new sub-keys and measures each layer's coverage (``index.growth_need``; ``lpeer score --slice``)."""
    experts = sum(p.num_experts for p in run.model.peer_layers())
    seed = growth_seed(run.config.train.seed, phase, experts)
    generator = torch.Generator().manual_seed(seed)
    new_inputs = layer_inputs(run, [new_slice] if new_slice is not None else [], "train", SAMPLE_INPUTS, generator)
    return seed, new_inputs, layer_inputs(run, old_slices, "validation", SAMPLE_INPUTS, generator)


def grow_run_model(
    run, phase: int, k, new_slice: str | None, old_slices: Sequence[str], layer: int | None = None
) -> list[dict]:
    """Grow ``run.model`` before ``phase`` by ``k`` sub-keys per half (or ``"auto"``): layer inputs of
    ``new_slice``'s train split place the new sub-keys (none: drawn at random), inputs of
    ``old_slices``' validation splits measure ``changed_old``. Returns ``grow_model``'s reports."""
    seed, new_inputs, old_inputs = need_inputs(run, phase, new_slice, old_slices)
    tc = run.config.train
    need = slice_need(run, new_slice, old_slices)["need"] if k == "auto" and new_slice else None
    return grow_model(
        run.model,
        k,
        new_inputs,
        old_inputs,
        layer=layer,
        seed=seed,
        mode=tc.grow_mode,
        generation_topk=tc.grow_topk or None,
        generation_gate=tc.grow_gate,
        max_experts=tc.max_experts or None,
        need=need,
    )


def slice_need(run, new_slice, old_slices: Sequence[str]) -> dict:
    """``index.loss_need`` of ``new_slice`` (its train split: the data about to be learnt; a name or a slice object,
    ``_slice``) against the old slices' validation splits, ``eval_tokens`` each: how poorly the model serves it, the
    figure ``--grow auto`` grows by, and the novelty ``lpeer score --slice`` reports (issue 26)."""
    budget = run.config.train.eval_tokens
    old = {s: run.windows(s, "validation", budget) for s in old_slices}
    scale = {s: bytes_per_token(run, s, "validation") for s in old_slices}
    scale["new"] = bytes_per_token(run, new_slice, "train")
    return loss_need(run.model, _windows(run, new_slice, "train", budget), old, scale)


def bytes_per_token(run, name, split: str) -> float:
    """Held-out bytes per token of one slice's split (1 for the byte tokenizer): bits per byte from nats per token."""
    data = _slice(run, name)
    return data.num_bytes(split) / max(1, len(data.tokens(split)))


def measured_growth(run, phase: int, k, new_slice: str, old_slices: Sequence[str]) -> tuple[list[dict], dict]:
    """``grow_run_model`` and its shock (``index.growth_shock``): the change of every old slice's
    validation bits per byte right after growth, before any step, on the evaluation's windows (issue 16)."""
    old_eval = {s: run.windows(s, "validation", run.config.train.eval_tokens) for s in old_slices}
    per_token = {s: bytes_per_token(run, s, "validation") for s in old_slices}
    return growth_shock(run.model, lambda: grow_run_model(run, phase, k, new_slice, old_slices), old_eval, per_token)


def budget_full(model, max_experts: int) -> bool:
    """Whether no PEER layer of ``model`` can grow by one sub-key per half within ``max_experts`` per layer."""
    return bool(max_experts) and all((p.num_subkeys + 1) ** 2 > max_experts for p in model.peer_layers())


class Growth(PhaseHook):
    """``grow``: K sub-keys per half before each phase, or ``auto`` (``index.growth_need``), within the
    ``max_experts`` budget; not before the very first training of a fresh model."""

    def __init__(self, grow: str):
        self.k = "auto" if grow == "auto" else int(grow)

    @classmethod
    def from_config(cls, tc) -> Growth | None:
        return cls(tc.grow) if tc.grow != "none" else None

    def begin_phase(self, ctx: PhaseContext) -> None:
        run, tc = ctx.run, ctx.run.config.train
        if ctx.start_step:  # resumed mid-phase: grown already, its shock came back with the checkpoint
            return
        run.growth_shock = None
        fresh = ctx.phase == 0 and run.config.base is None and tc.base_steps == 0
        if fresh or not run.model.peer_layers():
            return
        if budget_full(run.model, tc.max_experts):  # nothing can grow: skip measuring the need and the shock
            reports = [
                {
                    "layer": pos,
                    "k": 0,
                    "experts_before": p.num_experts,
                    "experts_after": p.num_experts,
                    "budget": tc.max_experts,
                    "reason": f"budget {tc.max_experts:,} experts per layer reached ({p.num_experts:,})",
                }
                for pos, p in enumerate(run.model.peer_layers())
            ]
        else:
            reports, run.growth_shock = measured_growth(run, ctx.phase, self.k, ctx.slice_name, ctx.old_slices)
        run.phase_log["grow"] = [
            {k: r.get(k) for k in ("layer", "k", "experts_before", "experts_after", "need", "reason")} for r in reports
        ]
        ctx.emit({"event": "grow", "phase": ctx.phase, "layers": reports, "growth_shock": run.growth_shock})
