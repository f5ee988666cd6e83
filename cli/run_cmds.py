"""``lpeer run`` and ``lpeer train``: start, resume or extend a continual run; render its progress."""

from __future__ import annotations

import contextlib
from pathlib import Path

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.text import Text

from lifelong_peer import advice
from lifelong_peer.errors import UserError
from lifelong_peer.strategies import STRATEGIES

from .options import FormatOpt, QuietOpt, WorkspaceOpt, with_train_options
from .output import Format, emit, stderr, stdout
from .progress import PlainProgress, event_lines, experts_text

ATTACH_PANEL = "Your own model (a Hugging Face causal LM)"


@contextlib.contextmanager
def _progress_display(quiet: bool, run: str | None = None):
    """A rich progress bar per phase on stderr: step, loss, tok/s, experts, frozen %, ETA; off a
    terminal, a plain line naming the run every 10 s (cli/progress.py, issue 17)."""
    if quiet:
        yield None
        return
    if not stderr.is_terminal:
        yield PlainProgress(lambda line: stderr.print(line, highlight=False), run)
        return
    columns = (
        TextColumn("{task.description}", style="bold", markup=False),  # a slice name is text, not markup
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(
            "loss {task.fields[loss]:.3f}  {task.fields[tok_s]:,.0f} tok/s  {task.fields[experts]}", markup=False
        ),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=stderr, transient=False) as progress:
        tasks: dict[int, int] = {}

        def on_event(event: dict) -> None:
            kind = event["event"]
            if kind == "phase_start":
                label = "base" if event["phase"] < 0 else f"phase {event['phase']}: {event['slice']}"
                tasks[event["phase"]] = progress.add_task(
                    label, total=event["steps"], completed=event["start"], loss=float("nan"), tok_s=0.0, experts=""
                )
            elif kind == "step" and event["phase"] in tasks:
                experts = (
                    experts_text(event["experts"], event.get("peer_layers"), event["frozen_fraction"])
                    if "experts" in event
                    else ""
                )
                progress.update(
                    tasks[event["phase"]],
                    advance=1,
                    loss=event["loss"],
                    tok_s=event.get("tok_s", 0.0),
                    experts=experts,
                )
            elif kind == "run_start":  # the demo's runs, one after the other
                progress.console.print(Text.assemble("run ", (event["run"], "bold")))
            else:  # growth and freezing indented under their phase's bar
                for line in event_lines(event):
                    progress.console.print(line if kind == "resume" else f"  {line}")

        yield on_event


def _with_notices(on_event):
    """``on_event`` plus what stderr always says, even with --quiet or --format json: a reused base."""

    def notify(event: dict) -> None:
        if event["event"] == "base_reused":
            whose = "this run's own" if event["run"] == event.get("for") else f"run {event['run']}'s"
            stderr.print(
                f"reusing {whose} base model (same stream data, model and base settings; not retrained): "
                f"{event['path']}",
                highlight=False,
            )
        if on_event is not None:
            on_event(event)

    return notify


def _finish(run, results, fmt: Format) -> None:
    from lifelong_peer.metrics import summarize

    summary = summarize(results, "test")
    summary["run"] = run.config.run
    summary["run_dir"] = str(run.dir)

    def human(s: dict) -> None:
        from .eval_cmds import _render_eval

        _render_eval(s)
        stdout.print(Text.assemble("run ", (s["run"], "bold"), f": files in {s['run_dir']}"))

    emit(summary, fmt, human)


def run(
    stream: str | None = typer.Option(None, "--stream", "-s", help="Stream to train through (see `lpeer streams`)."),
    strategy: str = typer.Option(
        "naive",
        "--strategy",
        help=f"{' | '.join(STRATEGIES)} (presets over one loop; the options below override them).",
    ),
    config: Path | None = typer.Option(
        None, "--config", help=escape("TOML file with [train], [model], [model.peer] (and [attach]) tables.")
    ),
    resume: str | None = typer.Option(None, "--resume", help="Continue this run (id or directory) where it stopped."),
    name: str | None = typer.Option(None, "--name", help="Run id (default: STREAM-STRATEGY-N)."),
    base: str | None = typer.Option(
        None,
        "--base",
        help="Start from this model checkpoint (.safetensors), or from the base model of this run of the workspace.",
    ),
    base_model: str | None = typer.Option(
        None,
        "--base-model",
        rich_help_panel=ATTACH_PANEL,
        help="Attach PEER to this Hugging Face causal LM (name or local directory) and train it.",
    ),
    attach: str | None = typer.Option(
        None,
        "--attach",
        rich_help_panel=ATTACH_PANEL,
        help="With --base-model: add (PEER beside the MLP, default) | replace (PEER instead).",
    ),
    layers: str | None = typer.Option(
        None,
        "--layers",
        rich_help_panel=ATTACH_PANEL,
        help="With --base-model: blocks that get PEER, e.g. 6 or 4,8 (default: the middle one).",
    ),
    trainable: list[str] | None = typer.Option(
        None,
        "--trainable",
        rich_help_panel=ATTACH_PANEL,
        help="With --base-model: base weights left trainable (fnmatch pattern, repeatable).",
    ),
    context: int | None = typer.Option(
        None,
        "--context",
        rich_help_panel=ATTACH_PANEL,
        help="With --base-model: tokens per window (default: the base's maximum, at most 1024).",
    ),
    slices: str | None = typer.Option(None, "--slices", help="Comma-separated slice names (default: all, in order)."),
    workspace: Path | None = WorkspaceOpt,
    fmt: Format = FormatOpt,
    quiet: bool = QuietOpt,
    train: dict | None = None,
) -> None:
    """Train one model through a stream's slices, one phase per slice, and report forgetting.

    Example: lpeer run --stream sotu --strategy lifelong --steps 100
    (your own model: lpeer run --stream news --base-model gpt2 --attach add --layers 6 --strategy lifelong)
    """
    from lifelong_peer import distributed
    from lifelong_peer.run import locked_run, new_run
    from lifelong_peer.train import run_phases
    from lifelong_peer.workspace import Workspace

    distributed.init_from_env()  # under torchrun (WORLD_SIZE > 1): one data-parallel run over all ranks
    main = distributed.is_main()
    ws = Workspace.open(workspace)
    overrides = train or {}  # the TrainConfig options given (``with_train_options``)
    attach_opts = _attach_options(base_model, attach, layers, trainable, context)
    if resume:
        if overrides or stream or config or base or name or attach_opts:
            raise UserError("--resume continues a run with its saved config; drop the other options")
        run_id = resume
    else:
        if not stream:
            raise UserError(f"--stream is required (see `{advice.command(advice.STREAMS, ws.root)}`), or --resume RUN")
        slice_names = [s.strip() for s in slices.split(",")] if slices else None
        run_id = distributed.decide_on_main(  # rank 0 creates the run, the others open it
            lambda: (
                new_run(
                    ws, stream, strategy, overrides, None, str(base) if base else None, name, slice_names, config,
                    attach_opts,
                ).config.run
            )
        )  # fmt: skip
    with locked_run(ws, run_id, lock=main) as the_run:  # this run only (issue 25); rank 0 holds it for all ranks
        if main and not resume:
            stderr.print(Text.assemble("run ", (the_run.config.run, "bold"), f" in {the_run.dir}"))
        with _progress_display(quiet or fmt == Format.json or not main, the_run.config.run) as on_event:
            results = run_phases(the_run, progress=_with_notices(on_event) if main else None)
    if main:
        _finish(the_run, results, fmt)
    distributed.shutdown()


def _attach_options(base_model, mode, layers, trainable, context) -> dict:
    """The --base-model options that were given → AttachOptions fields; the others need --base-model."""
    given = {"mode": mode, "layers": layers, "trainable": trainable or None, "context": context}
    if base_model is None:
        extra = [f"--{'attach' if k == 'mode' else k}" for k, v in given.items() if v is not None]
        if extra:
            raise UserError(f"{', '.join(extra)} only apply with --base-model NAME_OR_PATH")
        return {}
    if layers is not None:
        try:
            given["layers"] = [int(x) for x in layers.split(",")]
        except ValueError:
            raise UserError(f"--layers {layers!r} must be block numbers like 6 or 4,8") from None
    return {"base_model": base_model} | {k: v for k, v in given.items() if v is not None}


def train(
    stream: str = typer.Option(..., "--stream", "-s", help="Stream holding the slice."),
    slice_: str = typer.Option(..., "--slice", help="The slice to train on (e.g. the one ingested today)."),
    run_id: str | None = typer.Option(None, "--run", help="Run to extend (default: STREAM-online; created if new)."),
    strategy: str = typer.Option(
        "lifelong", "--strategy", help=f"Strategy when the run is created: {' | '.join(STRATEGIES)}."
    ),
    base: str | None = typer.Option(
        None, "--base", help="Model checkpoint (or run whose base model) to start from when the run is created."
    ),
    steps: int | None = typer.Option(None, help="Optimizer steps for this phase."),
    workspace: Path | None = WorkspaceOpt,
    fmt: Format = FormatOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Run one phase on one slice of an existing (or new) run: for data that arrives a slice at a time.

    Example: lpeer ingest today.jsonl --name news --replace && lpeer train --stream news --slice 2026-11
    """
    from lifelong_peer.run import locked_run, new_run
    from lifelong_peer.runops import add_slice
    from lifelong_peer.train import run_phases
    from lifelong_peer.workspace import Workspace

    ws = Workspace.open(workspace)
    run_id = run_id or f"{stream}-online"
    if not ws.run_dir(run_id).exists():
        overrides = {"steps": steps} if steps is not None else {}
        new_run(ws, stream, strategy, overrides, None, str(base) if base else None, run_id, [slice_])
    with locked_run(ws, run_id) as the_run:  # this run only (issue 25)
        if the_run.config.stream != stream:
            raise UserError(f"run {run_id!r} trains stream {the_run.config.stream!r}, not {stream!r}")
        phase = add_slice(the_run, slice_)
        with _progress_display(quiet or fmt == Format.json, the_run.config.run) as on_event:
            results = run_phases(the_run, phases=[phase], progress=_with_notices(on_event))
    _finish(the_run, results, fmt)


def register(app: typer.Typer) -> None:
    app.command()(with_train_options(run))
    app.command()(train)
