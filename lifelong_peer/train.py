"""The continual trainer: one phase per time slice — hooks begin → step() × n → hooks end → evaluate →
record usage → checkpoint (``run_phases``).

What a phase does besides plain training comes from its phase hooks (``lifelong_peer.hooks``: growth,
freezing, replay, L2-SP, EWC, distillation, MAS), chosen by the run's ``TrainConfig``; base training
and phase training share one ``step()``, one optimizer builder and one steps loop.

Exact resume: batches are drawn from a generator seeded by (seed, phase, step) (``data.seed_for``),
growth from one seeded by (seed, phase, experts), and a checkpoint holds everything else (weights,
masks, optimizer moments, hook state, usage ledger), so a run killed at any point and resumed ends
bit-identical on CPU. Each phase starts a fresh optimizer with warm-up + cosine decay (continual
pretraining re-warms). The run's files: ``lifelong_peer.run``.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import signal
import statistics
import threading
import time
from collections.abc import Callable

import torch

from . import distributed, regularize
from .bases import base_key, find_base
from .checkpoint import load_model
from .config import TrainConfig, base_train_config, phase_steps
from .data import sample_batch, seed_for
from .errors import Interrupted, UserError
from .evaluate import evaluate_all, new_results, phase_record, recompute_results
from .files import checkpoint_order
from .hooks import PhaseContext, PhaseHook
from .metrics import RunResults, load_results, save_results
from .model import LanguageModel
from .optim import PEEROptimizer, build_optimizer
from .run import Run
from .run_outputs import write_run_outputs

Progress = Callable[[dict], None]


def run_phases(run: Run, phases: list[int] | None = None, progress: Progress | None = None) -> RunResults:
    """Train ``run`` through its slices (or just ``phases``), resuming from where its state says.

    Ctrl-C raises ``Interrupted`` saying what was saved: in training steps (base or phase) after the
    current step, with a checkpoint there; elsewhere (evaluation, growth) at once, the run kept as of
    its last checkpoint. A second Ctrl-C during a step stops at once too."""
    try:
        return _run_phases(run, phases, progress or (lambda event: None))
    except KeyboardInterrupt:
        raise Interrupted(_interrupted_message(run)) from None


def _interrupted_message(run: Run) -> str:
    """One line for Ctrl-C outside a training step: what is kept, how to continue (issue 17)."""
    checkpoint = run.state()["checkpoint"]
    if checkpoint is not None:
        kept = f"the run is kept as of {checkpoint}"
    elif (run.checkpoints / "base.safetensors").exists():
        kept = "the run is kept as of checkpoints/base.safetensors"
    else:
        kept = "nothing was saved yet"
    return f"interrupted; {kept} — continue with {run.resume_command()}"


def _run_phases(run: Run, phases: list[int] | None, emit: Progress) -> RunResults:
    state = run.state()
    resume = _restore(run, state, emit)
    results = _results(run, emit)
    for phase, slice_name in enumerate(run.config.slices):
        if phase < state["completed_phases"] or (phases is not None and phase not in phases):
            continue
        started = time.time()
        opt_state, start_step = (resume["opt"], resume["step"]) if resume and resume["phase"] == phase else (None, 0)
        ctx = _phase_context(run, phase, start_step, emit)
        if not start_step:
            run.phase_log = {}  # the hooks log what they decide before this phase (resumed: it came back)
        for hook in run.hooks:
            hook.begin_phase(ctx)  # growth, freezing, batch sources, anchors
        distributed.sync_decisions(run.model)  # every rank takes rank 0's growth and freezing
        tokens = train_phase(run, ctx, opt_state)
        for hook in run.hooks:
            hook.end_phase(ctx)  # Fisher, importance
        rows = evaluate_all(run, emit)
        record_usage(run, slice_name)
        results.add_phase(
            phase_record(run, slice_name, tokens, time.time() - started, results.extra.get("machine")), rows
        )
        run.save_checkpoint(phase, None, None, completed=phase + 1, results=results.to_dict())
        if distributed.is_main():
            save_results(run.dir, results)
            write_run_outputs(run.dir, results)
        if run.config.train.keep_checkpoints == "latest":
            run.prune_checkpoints()  # after results.json: until then the older phase is the fallback
        distributed.barrier()
        emit({"event": "phase_end", "phase": phase, "slice": slice_name, "rows": rows})
        resume = None
    return results


def _phase_context(run: Run, phase: int, start_step: int, emit: Progress) -> PhaseContext:
    """What the hooks of ``phase`` start from: batches from its slice, experts as they are now."""
    pools = [run.slice_data(run.config.slices[phase]).tokens("train")]
    existed = [p.num_experts for p in run.model.peer_layers()]
    return PhaseContext(run=run, phase=phase, start_step=start_step, emit=emit, pools=pools, existed=existed)


def train_phase(run: Run, ctx: PhaseContext, opt_state: dict | None) -> int:
    """Train on the phase's batches for the phase budget; returns the training tokens consumed."""
    tc, model = run.config.train, run.model
    steps = phase_steps(tc, run.config.context)
    for p in regularize.shared_parameters(model).values():
        p.requires_grad_(tc.train_shared)
    for layer in model.peer_layers():
        layer.subkeys.requires_grad_(tc.train_subkeys)
    opt = make_optimizer(model, tc)
    if opt_state is not None:
        opt.load_state_tensors(dict(model.named_parameters()), opt_state)
    ctx.emit(
        {"event": "phase_start", "phase": ctx.phase, "slice": ctx.slice_name, "steps": steps, "start": ctx.start_step}
    )
    seconds = train_steps(
        run, ctx.phase, tc, range(ctx.start_step, steps), opt, (ctx.pools, ctx.replay_pools), run.hooks, ctx.emit
    )
    if seconds:  # issue 24: the cost per step of each phase, beside its pool size and active parameters
        run.phase_log["ms_per_step"] = 1000 * statistics.median(seconds)
    return (steps - ctx.start_step) * tc.batch_size * run.config.context


def train_base(run: Run, emit: Progress, start: int = 0, opt_state: dict | None = None) -> None:
    """A longer first phase on a mix of all slices (or the first), so phases measure drift, not learning
    English; from step ``start`` with optimizer state ``opt_state`` when resuming it (issue 17).

    It runs under ``base_train_config``: the base settings, none of the strategy's protections, so that
    every strategy of a stream can start from one base (and reuse it, ``base_key``)."""
    cfg = run.config
    pools = [run.slice_data(n).tokens("train") for n in cfg.base_slices]
    tc = base_train_config(cfg.train)
    opt = make_optimizer(run.model, tc)
    if opt_state is not None:
        opt.load_state_tensors(dict(run.model.named_parameters()), opt_state)
    emit({"event": "phase_start", "phase": -1, "slice": "base", "steps": tc.steps, "start": start})
    train_steps(run, -1, tc, range(start, tc.steps), opt, (pools, []), [], emit)


def make_optimizer(model: torch.nn.Module, tc: TrainConfig) -> PEEROptimizer:
    """The optimizer of a phase (or of base training): AdamW + row-sparse Adam for the expert tables."""
    return build_optimizer(
        model,
        lr=tc.lr,
        expert_lr=tc.expert_lr,
        weight_decay=tc.weight_decay,
        expert_weight_decay=tc.expert_weight_decay,
        moments=tc.expert_moments,
    )


def train_steps(
    run: Run, phase: int, tc: TrainConfig, steps: range, opt: PEEROptimizer, sources: tuple, hooks, emit: Progress
) -> list[float]:
    """``steps`` of ``phase`` (-1: base training), batches drawn from ``sources`` = (pools, replay pools); returns
    the seconds each step took.

    Ctrl-C saves exactly after the current step and stops (``Interrupted``), and ``checkpoint_every``
    applies — in base training too (issue 17: it was neither, and Ctrl-C there lost everything).
    """
    total = steps.stop
    run.model.train()
    if not tc.train_shared:  # frozen shared weights: their normalisation statistics stay put too
        regularize.freeze_norm_statistics(run.model)
    # the module to call: DDP for the dense weights (+ BatchNorm over the global batch) when distributed
    replica = distributed.data_parallel(run.model)
    seconds = []
    with _interrupt_at_step_boundary() as interrupted:
        for n in steps:
            gen = torch.Generator().manual_seed(seed_for(tc.seed, phase, n))
            batch = sample_batch(*sources, tc, run.config.context, gen)  # the global batch, the same on every rank
            torch.manual_seed(seed_for(tc.seed, phase, n))  # dropout of a Hugging Face base: exact on resume too
            local = distributed.shard(batch).to(run.device)  # this rank's rows of it (issue 9)
            lr_scale = _lr_scale(n, total, tc)
            for group in opt.param_groups:
                group["lr"] = group.setdefault("peak_lr", group["lr"]) * lr_scale
            loss, elapsed = step(run.model, replica, opt, local, hooks, tc, run.device)
            seconds.append(elapsed)
            _log_step(run, phase, n, loss, opt, batch, elapsed, emit)
            # Ctrl-C: save exactly after this step, then stop; decided together so every rank stops at once
            if distributed.mean(float(interrupted())) > 0:
                path = run.save_checkpoint(phase, n + 1, opt, completed=max(phase, 0))
                where = "base training" if phase < 0 else f"phase {phase}"
                resume = run.resume_command()
                raise Interrupted(
                    f"interrupted at {where}, step {n + 1} of {total}; saved checkpoints/{path.name} — continue with {resume}"
                )
            if n + 1 < total and tc.checkpoint_every and (n + 1) % tc.checkpoint_every == 0:
                run.save_checkpoint(phase, n + 1, opt, completed=max(phase, 0))
    return seconds


def step(
    model: torch.nn.Module,
    replica: torch.nn.Module,
    opt: PEEROptimizer,
    batch: torch.Tensor,
    hooks: list[PhaseHook],
    tc: TrainConfig,
    device: torch.device,
) -> tuple[float, float]:
    """One optimizer step on this rank's rows ``batch`` (B, T+1): loss + the hooks' penalties, backward,
    expert-gradient exchange, clip, update. ``replica``: ``model`` or its DDP wrapper.
    Returns (the loss averaged over ranks, seconds taken)."""
    t0 = time.perf_counter()
    with autocast(tc.precision, device):
        logits, loss = replica(batch[:, :-1], batch[:, 1:])
        total = loss
        for hook in hooks:
            term = hook.penalty(model, batch, logits)
            if term is not None:
                total = total + term
    opt.zero_grad(set_to_none=True)
    total.backward()  # through DDP: dense gradients arrive averaged over ranks
    distributed.average_expert_gradients(model)  # expert rows, row-sparse: now the global-batch gradient
    if tc.grad_clip:  # clips the global-batch gradient (after both exchanges), the same on every rank
        opt.clip_grad_norm_(tc.grad_clip)
    opt.step()
    del logits, total
    elapsed = time.perf_counter() - t0
    return distributed.mean(loss.item()), elapsed


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The context a training forward and loss run in (``TrainConfig.precision``): bf16 autocast, or none.

    Under autocast matrix products run in bfloat16 while the Parameters, their gradients and the
    optimizer stay float32 (no loss scaling: bf16 has float32's exponent range). auto means bf16
    on CUDA GPUs with native bf16 (compute capability 8.0, Ampere, or newer) and fp32 elsewhere;
    CPU autocast to bf16 works when asked for (slower here: it exists for tests).
    """
    if precision == "auto":
        native = device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)
        precision = "bf16" if native else "fp32"
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


@contextlib.contextmanager
def _interrupt_at_step_boundary():
    """Defer Ctrl-C (SIGINT) to the end of the current step, so the checkpoint written on it is exact —
    never a half-applied optimizer step. Yields a function telling whether Ctrl-C was pressed; a second
    Ctrl-C stops at once (KeyboardInterrupt: the run is kept as of its last checkpoint)."""
    pressed = []
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return

    def on_sigint(signum, frame):
        if pressed:
            raise KeyboardInterrupt
        pressed.append(signum)

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield lambda: bool(pressed)
    finally:
        signal.signal(signal.SIGINT, previous)


def record_usage(run: Run, slice_name: str) -> None:
    """Expert usage of the slice's validation split after its phase: what the index manager consumes."""
    if not run.model.peer_layers():
        return
    from .index import collect_usage

    windows = run.windows(slice_name, "validation", run.config.train.usage_tokens)
    collect_usage(run.model, windows[:, :-1], run.ledger, slice_name)


def _lr_scale(step: int, steps: int, tc: TrainConfig) -> float:
    if step < tc.warmup:
        return (step + 1) / (tc.warmup + 1)
    progress = (step - tc.warmup) / max(1, steps - tc.warmup)
    return tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _log_step(run: Run, phase: int, step: int, loss: float, opt, batch, elapsed: float, emit: Progress) -> None:
    """The step's event (the same fields in base training and in a phase), and its metrics.jsonl line."""
    layers = run.model.peer_layers()
    experts = sum(p.num_experts for p in layers)
    frozen = sum(int(p.frozen.sum()) for p in layers) / experts if experts else 0.0
    record = {
        "phase": phase,
        "step": step,
        "loss": loss,
        "lr": opt.param_groups[0]["lr"],
        "tok_s": batch[:, 1:].numel() / max(elapsed, 1e-9),
        "experts": experts,
        "frozen_fraction": frozen,
    }
    if distributed.is_main() and phase >= 0:  # base training is not part of the run's metrics
        with open(run.dir / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
    emit({"event": "step", **record, "peer_layers": len(layers)})  # `experts` counts all of them (issue 25)


def _results(run: Run, emit: Progress) -> RunResults:
    """results.json so far, or a new one holding the base model's evaluation ('before' row)."""
    if (run.dir / "results.json").exists():
        return load_results(run.dir)
    results = new_results(run, evaluate_all(run, emit))
    if distributed.is_main():
        save_results(run.dir, results)
    return results


def _restore(run: Run, state: dict, emit: Progress) -> dict | None:
    """Load the latest intact checkpoint (or build the starting model); returns mid-phase resume info.

    Issue 10: a checkpoint that fails its recorded size/sha256 or its own checks is named in an
    ``IntegrityWarning`` and the next older one listed in state.json is tried (none left: start over,
    which is deterministic). A lost or damaged results.json is recomputed from the phase checkpoints.
    ``state`` is updated in place to the checkpoint used; results.json and metrics.jsonl are cut back
    to it, so a resumed run never mixes work from before and after the point it continues from.
    """
    import warnings

    from .errors import CheckpointError
    from .files import IntegrityWarning

    # left by a write cut short; only rank 0 writes (issue 9), so no other rank's write is in flight
    for tmp in [*run.dir.glob(".*.tmp"), *run.checkpoints.glob(".*.tmp")] if distributed.is_main() else []:
        tmp.unlink(missing_ok=True)
    results = None
    if state["checkpoint"] is not None and not (state["phase"] == -1 and state["step"] is not None):  # base: none yet
        try:
            results = load_results(run.dir)
        except UserError as e:  # lost or damaged: rebuild it, its rows are deterministic evaluations
            warnings.warn(f"{e}; recomputing it from the phase checkpoints", IntegrityWarning, stacklevel=2)
            results = recompute_results(run)

    newest = checkpoint_order(state["checkpoint"]) if state["checkpoint"] else None
    older = [k for k in state["files"] if newest and (o := checkpoint_order(k)) and o < newest]
    older.sort(key=checkpoint_order, reverse=True)
    loaded = None
    for rel in [state["checkpoint"], *older] if state["checkpoint"] else []:
        try:
            candidate = run.load_checkpoint(run.dir / rel)
        except CheckpointError as e:
            warnings.warn(f"{e}; falling back to the previous checkpoint", IntegrityWarning, stacklevel=2)
            continue
        if results is not None and candidate["meta"]["completed_phases"] > len(results.phases):
            continue  # stopped between this phase's checkpoint and its results: redo that phase
        loaded = candidate
        break
    if loaded is None:
        if state["checkpoint"] is not None:
            warnings.warn(f"run {run.config.run!r}: no intact checkpoint left; starting over", IntegrityWarning, 2)
            if distributed.is_main():
                (run.dir / "state.json").unlink()  # its listing describes files about to be rewritten
        state.update(completed_phases=0, checkpoint=None, phase=None, step=None, files={})
        for hook in run.hooks:
            hook.load_state_tensors({})  # nothing learnt yet
        _start_model(run, emit)
        meta = {"phase": 0, "step": 0, "completed_phases": 0}
    else:
        meta, tensors = loaded["meta"], loaded["tensors"]
        state.update(completed_phases=meta["completed_phases"], checkpoint=rel, phase=meta["phase"], step=meta["step"])
        if meta["phase"] < 0 and meta["step"] is not None:  # stopped in base training: continue it
            opt = {k.split("::", 1)[1]: v for k, v in tensors.items() if k.startswith("opt::")}
            emit({"event": "resume", "phase": -1, "step": meta["step"]})
            _start_model(run, emit, resume=(meta["step"], opt))
            state.update(checkpoint=None, phase=None, step=None)
            meta = {"phase": 0, "step": None, "completed_phases": 0}
    if results is not None and len(results.phases) > meta["completed_phases"]:
        n = meta["completed_phases"]
        results.phases = results.phases[:n]
        for evals in results.eval.values():
            evals.after = evals.after[:n]
        if distributed.is_main():
            save_results(run.dir, results)
    _truncate_metrics(run, meta["phase"], meta["step"], meta["completed_phases"])
    if loaded is None or meta["step"] is None:
        done = meta["completed_phases"]
        if loaded is not None and 0 < done < len(run.config.slices):  # issue 25: after kill -9 it said nothing
            emit({"event": "resume", "phase": done - 1, "step": None, "slice": run.config.slices[done - 1]})
        return None
    opt = {k.split("::", 1)[1]: v for k, v in tensors.items() if k.startswith("opt::")}
    emit({"event": "resume", "phase": meta["phase"], "step": meta["step"]})
    return {"phase": meta["phase"], "step": meta["step"], "opt": opt}


def _start_model(run: Run, emit: Progress, resume: tuple[int, dict] | None = None) -> None:
    """The model before phase 0: a base checkpoint, the Hugging Face base with PEER attached (issue 11),
    a trained base — reused when this run or another of its workspace trained one with the same
    ``base_key`` (issue 17), else trained here —, or a fresh init. ``resume``: (step, optimizer state)
    of base training stopped mid-way, whose model ``run.model`` holds."""
    cfg, tc = run.config, run.config.train
    if resume is not None:
        train_base(run, emit, *resume)
        run.save_base(base_key(run))
        return
    if cfg.base and cfg.attach is None:
        run.model = load_model(cfg.base, device=run.device)
        if run.model.config.vocab_size != cfg.model.vocab_size:
            raise UserError(f"base {cfg.base}: vocab_size {run.model.config.vocab_size} does not match the stream's")
        run.save_base()
        return
    key = base_key(run) if tc.base_steps else None
    found = find_base(run, key) if key is not None else None
    if found is not None:
        run.model = run.read_model(found["path"]).to(run.device)
        emit({"event": "base_reused", "run": found["run"], "for": cfg.run, "path": str(found["path"])})
        if found["run"] != cfg.run:
            run.save_base(key, source=found["path"])
        return
    torch.manual_seed(tc.seed)
    if cfg.attach is not None:
        from .attach import attach

        o = cfg.attach
        run.model = attach(
            run.base_model(), o.layers, o.mode, o.peer, o.trainable, base=o.base_model, context=o.context
        ).to(run.device)
    else:
        run.model = LanguageModel(copy.deepcopy(cfg.model)).to(run.device)
    if tc.base_steps:
        train_base(run, emit)
    elif cfg.attach is None:  # issue 16: from scratch every slice improves every phase and "forgetting" means nothing
        import warnings

        warnings.warn(
            f"run {cfg.run!r} starts from a random init (no --base, no --base-steps): forgetting measured "
            "from scratch is meaningless; give --base CHECKPOINT or --base-steps N",
            stacklevel=2,
        )
    run.save_base(key)


def _truncate_metrics(run: Run, phase: int, step: int | None, completed: int) -> None:
    """Drop metrics.jsonl lines written after the checkpoint we resume from (they will be redone)."""
    path = run.dir / "metrics.jsonl"
    if not path.exists() or not distributed.is_main():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a line cut by a crash
        if rec["phase"] < completed or (step is not None and rec["phase"] == phase and rec["step"] < step):
            keep.append(line)
    from .files import atomic_write_text

    atomic_write_text(path, "".join(x + "\n" for x in keep))
