"""Evaluation of a run's models: held-out NLL and bits per byte on every slice, the results matrix,
and its recomputation from the phase checkpoints. What reports and the CLI import (never the trainer)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from . import distributed
from .config import phase_steps
from .data import eval_windows
from .errors import UserError
from .metrics import EvalRow, PhaseRecord, RunResults, SplitEval, save_results
from .peer_model import PEERModel

if TYPE_CHECKING:
    from .run import Run

Progress = Callable[[dict], None]


def evaluate_all(run: Run, emit: Progress) -> dict[str, EvalRow]:
    """Mean NLL and bits per byte of the current model on every slice's validation and test split."""
    rows = {}
    for split in ("validation", "test"):
        sums, tokens, num_bytes = [], [], []
        for name in run.config.slices:
            data = run.slice_data(name)
            all_tokens = data.tokens(split)
            if len(all_tokens) < 2:  # a tiny slice with no held-out text: reported as missing
                sums.append(0.0)
                tokens.append(0)
                num_bytes.append(0)
                continue
            total, count = run.model.nll(run.windows(name, split, run.config.train.eval_tokens))
            sums.append(total)
            tokens.append(count)
            num_bytes.append(scored_bytes(count, data.num_bytes(split), len(all_tokens)))
        rows[split] = EvalRow.from_totals(sums, tokens, num_bytes)
    emit({"event": "evaluated", "rows": rows})
    return rows


def scored_bytes(count: int, num_bytes: int, num_tokens: int) -> int:
    """The bytes behind ``count`` scored tokens of a text of ``num_bytes`` bytes in ``num_tokens`` tokens, at the
    text's bytes-per-token ratio: the denominator of every bits per byte the runs report."""
    return max(1, round(count * num_bytes / max(1, num_tokens)))


def model_size(model: PEERModel) -> dict:
    """``num_experts`` (all PEER layers), ``params`` and ``active_params`` (per token) of ``model``."""
    experts = sum(p.num_experts for p in model.peer_layers())
    return {"num_experts": experts, "params": model.num_params(), "active_params": model.active_params_per_token()}


def phase_record(run: Run, slice_name: str, tokens: int, wall: float, started_on: dict | None = None) -> PhaseRecord:
    """A finished phase's record; with ``started_on`` (the run's machine record, ``results.extra["machine"]``)
    the phase records this machine too when it is another one (resumed elsewhere, issue 25)."""
    from .system import machine

    layers, shock = run.model.peer_layers(), run.growth_shock
    here = machine() if started_on is not None else None
    size = model_size(run.model)
    frozen = sum(int(p.frozen.sum()) for p in layers)
    return PhaseRecord(
        slice=slice_name,
        train_tokens=tokens,
        wall_time_s=wall,
        frozen_fraction=frozen / size["num_experts"] if size["num_experts"] else 0.0,
        **size,
        growth_shock_bpb=shock["max_bpb"] if shock else None,
        extra=({"growth_shock_per_slice_bpb": shock["per_slice_bpb"]} if shock else {})
        | ({"machine": here} if here is not None and here != started_on else {})
        | run.phase_log,
    )


def new_results(run: Run, before: dict[str, EvalRow], **extra) -> RunResults:
    """An empty results.json for ``run`` holding the starting model's evaluation (the 'before' row), its size
    (``base``: what the report's base row shows, issue 25 — phase 0 may have grown it) and the machine."""
    from .system import machine

    return RunResults(
        run=run.config.run,
        strategy=run.config.train.strategy,
        slices=list(run.config.slices),
        phases=[],
        eval={split: SplitEval(before=row, after=[]) for split, row in before.items()},
        extra={"base": model_size(run.model), "machine": machine(), **extra},
    )


def append_eval(row: EvalRow, run: Run, model: PEERModel, slice_name: str, split: str) -> None:
    data = run.slice_data(slice_name)
    total, count = model.nll(run.windows(slice_name, split, run.config.train.eval_tokens))
    num_bytes = scored_bytes(count, data.num_bytes(split), len(data.tokens(split)))
    new = EvalRow.from_totals([total], [count], [num_bytes])
    row.nll.append(new.nll[0])
    row.bpb.append(new.bpb[0])
    row.tokens.append(new.tokens[0])
    row.bytes.append(new.bytes[0])


def evaluate_latest(run: Run) -> dict:
    """Evaluate the model the run would continue from, edits by hand included (``lpeer eval
    --reevaluate``, issue 17): ``{"checkpoint", "rows": {split: EvalRow}, "num_experts",
    "frozen_fraction", "params", "active_params"}``. results.json is not changed: its rows are the
    models after each phase."""
    loaded = run.load_latest()
    record = phase_record(run, "", 0, 0.0)
    return {
        "checkpoint": loaded["checkpoint"].name,
        "rows": evaluate_all(run, lambda event: None),
        "num_experts": record.num_experts,
        "frozen_fraction": record.frozen_fraction,
        "params": record.params,
        "active_params": record.active_params,
    }


def recompute_results(run: Run) -> RunResults:
    """Rebuild results.json (when it was lost or deleted): the copy the latest phase-end checkpoint keeps in its
    metadata, or, from checkpoints older than that copy, by evaluating the base and every phase-end checkpoint."""
    from .checkpoint import read_meta

    state = run.state()
    base = run.checkpoints / "base.safetensors"
    if not base.exists():
        raise UserError(f"run {run.config.run!r} has no checkpoints to evaluate yet")
    done = state["completed_phases"]
    latest = run.checkpoints / f"phase-{done - 1:03d}.safetensors" if done else None
    kept = read_meta(latest).get("results") if latest is not None and latest.exists() else None
    if isinstance(kept, dict) and len(kept.get("phases", [])) == done:
        results = RunResults.from_dict(kept, str(latest))
        if distributed.is_main():
            save_results(run.dir, results)
        return results
    run.model = run.read_model(base).to(run.device)
    # wall times are unknown (0) in a recomputed file
    results = new_results(run, evaluate_all(run, lambda event: None), recomputed_from_checkpoints=True)
    paths = [run.checkpoints / f"phase-{phase:03d}.safetensors" for phase in range(done)]
    if missing := [p.name for p in paths if not p.exists()]:
        raise UserError(
            f"run {run.config.run!r}: results.json is lost and cannot be rebuilt: {', '.join(missing)} were pruned "
            '(keep_checkpoints = "latest") and the latest checkpoint keeps no copy of it'
        )
    for phase, path in enumerate(paths):
        run.model = run.read_model(path).to(run.device)
        tokens = phase_steps(run.config.train, run.config.context) * run.config.train.batch_size
        record = phase_record(run, run.config.slices[phase], tokens * run.config.context, 0.0)
        results.add_phase(record, evaluate_all(run, lambda event: None))
    if distributed.is_main():
        save_results(run.dir, results)
    return results


__all__ = [
    "append_eval",
    "eval_windows",
    "evaluate_all",
    "evaluate_latest",
    "model_size",
    "new_results",
    "phase_record",
    "recompute_results",
    "scored_bytes",
]
