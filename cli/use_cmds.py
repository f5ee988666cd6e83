"""``lpeer score``, ``lpeer generate``, ``lpeer export``: put a run's models to work (issue 26).

Each parses, calls one function of ``lifelong_peer.use`` / ``lifelong_peer.export`` on the opened run and renders
its dict. torch loads inside the commands, not when the command line starts.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from .options import FormatOpt, WorkspaceOpt
from .output import Format, emit, key_value_table, message, stdout

RunArg = typer.Argument(..., help="Run id in the workspace, or a run directory.")
PhaseOpt = typer.Option(
    None, "--phase", min=0, help="Use the model after phase K (from 0; default: the latest, edits by hand included)."
)


def _open(workspace: Path | None, run: str):
    from lifelong_peer.run import open_run
    from lifelong_peer.workspace import Workspace

    return open_run(Workspace.open(workspace), run)


def _num(value, fmt: str = "{:.4f}") -> str:
    return "—" if value is None else fmt.format(value)


def _model(phase: int | None, checkpoint: str) -> str:
    return f"{'the starting model' if phase is None else f'after phase {phase}'} ({checkpoint})"


# --- score ----------------------------------------------------------------------------------------------


def _render_one(d: dict) -> None:
    s = d["score"]
    rows = {
        "run": d["run"],
        "model": _model(d["phase"], d["checkpoint"]),
        "text": f"{d['source']}: {d['documents']:,} document(s), {d['bytes']:,} bytes, {d['tokens']:,} tokens",
        "scored": f"{s['tokens']:,} tokens ({'every token' if d['max_tokens'] is None else 'evaluation windows'})",
        "nats per token": f"{s['nll']:.4f}",
        "bits per byte": f"{s['bpb']:.4f}",
    }
    stdout.print(key_value_table({k: escape(str(v)) for k, v in rows.items()}, title="score"))


def _render_all(d: dict) -> None:
    table = Table(title=f"run {escape(d['run'])}: bits per byte of the text under each phase's model")
    for col in ("phase", "trained on", "checkpoint", "bits/byte", "change"):
        table.add_column(col, justify="left" if col in ("trained on", "checkpoint") else "right")
    previous = None
    for r in d["phases"]:
        bpb = r["score"]["bpb"] if r["score"] else None
        change = f"{bpb - previous:+.4f}" if bpb is not None and previous is not None else ""
        name = "base" if r["phase"] < 0 else str(r["phase"])
        cells = (name, escape(r["slice"] or "—"), escape(r["checkpoint"] or "pruned"), _num(bpb), change)
        table.add_row(*cells)
        previous = bpb if bpb is not None else previous
    stdout.print(table)
    if d["note"]:
        message(f"[yellow]note:[/yellow] {escape(d['note'])}")


def _render_date(d: dict) -> None:
    table = Table(title=f"run {escape(d['run'])}: the slices ranked by the fit of the model that trained each")
    for col in ("rank", "slice", "period", "phase", "bits/byte", "behind the best"):
        table.add_column(col, justify="left" if col in ("slice", "period") else "right")
    best = d["ranking"][0]["bpb"]
    for r in d["ranking"]:
        period = f"{r['start']} – {r['end']}"
        table.add_row(str(r["rank"]), escape(r["slice"]), escape(period), str(r["phase"]), f"{r['bpb']:.4f}", f"{r['bpb'] - best:+.4f}")  # fmt: skip
    stdout.print(table)
    stdout.print(f"guess: [bold]{escape(d['guess'])}[/bold] (chance: {d['chance']:.0%}; accuracy: RESULTS.md, dating)")


def _render_novelty(d: dict) -> None:
    stdout.print(
        f"slice [bold]{escape(d['slice'])}[/bold] of stream {escape(d['stream'])} (train split) under run "
        f"{escape(d['run'])}'s model {escape(_model(d['phase'], d['checkpoint']))}"
    )
    table = Table(title="bits per byte: the new slice next to the old slices' (validation)")
    table.add_column("slice")
    table.add_column("bits/byte", justify="right")
    table.add_row(f"[bold]{escape(d['slice'])}[/bold] (new)", _num(d["new_bpb"]))
    for name, bpb in d["old_slices"].items():
        table.add_row(escape(name), _num(bpb))
    table.add_row("old, weighted", _num(d["old_bpb"]))
    stdout.print(table)
    need = "no old slices to compare with" if d["need"] is None else f"{d['need']:.3f} (grows from {d['min_excess']})"
    stdout.print(f"need = max(0, 1 − old / new): {need}")
    layers = Table(title="coverage of its queries per PEER layer (index manager)")
    for col in ("layer", "experts", "poorly served", "old slices", "excess", "--grow auto adds"):
        layers.add_column(col, justify="right")
    for r in d["layers"]:
        share = _num(r["poorly_served_new"], "{:.1%}")
        excess = _num(r["coverage_need"], "{:.3f}")
        k = f"{r['grow_auto_subkeys']} sub-keys per half"
        layers.add_row(str(r["layer"]), f"{r['experts']:,}", share, f"{r['baseline']:.0%}", excess, k)
    stdout.print(layers)
    if d["note"]:
        message(f"[yellow]note:[/yellow] {escape(d['note'])}")


def score(
    run: str = RunArg,
    text: str | None = typer.Argument(
        None,
        metavar="[FILE|TEXT]",
        help="What to score: a file or folder in any format lpeer ingest reads (JSONL, CSV, Parquet, .txt), "
        "or the text itself.",
    ),
    phase: int | None = PhaseOpt,
    all_phases: bool = typer.Option(
        False, "--all-phases", help="A table of every phase's model: how its fit to the text moved over the stream."
    ),
    date: bool = typer.Option(
        False,
        "--date",
        help="Rank the slices by how well the model of the phase that trained each fits the text (lowest bits per "
        "byte first): a time-period guess. It reads recency, so it suits runs whose models follow their era (naive "
        "fine-tuning); a run that keeps improving on old slices (lifelong) ranks its newest slice first. Needs "
        'every phase\'s model (keep_checkpoints = "all").',
    ),
    slice_: str | None = typer.Option(
        None,
        "--slice",
        help="Instead of a text: how far this slice is from what the model serves (its bits per byte next to the "
        "old slices', and the coverage of its queries per PEER layer).",
    ),
    stream: str | None = typer.Option(None, "--stream", help="The stream of --slice (default: the run's)."),
    text_field: str = typer.Option("text", "--text-field", help="Field holding the text in JSONL / CSV / Parquet."),
    max_tokens: int | None = typer.Option(
        None,
        "--max-tokens",
        min=0,
        help="Score at most N tokens, in the run's evaluation windows (evenly spaced; 0: all full windows) — "
        "what lpeer eval scores with eval_tokens = N (default: every token of the text).",
    ),
    workspace: Path | None = WorkspaceOpt,
    fmt: Format = FormatOpt,
) -> None:
    """Bits per byte of any text under a run's model (latest, --phase K, --all-phases), its period (--date), or a slice's novelty.

    --slice NAME (with --stream S for another stream) reports how far a new slice is from what the model
    serves: its bits per byte next to the old slices', and the index manager's coverage of its queries.

    Example: lpeer score sotu-naive-1 speech.txt --all-phases
    """
    from lifelong_peer.errors import UserError

    if (text is None) == (slice_ is None):
        raise UserError("give either a FILE|TEXT to score or --slice NAME (with --stream S for another stream)")
    if stream is not None and slice_ is None:
        raise UserError("--stream names the stream of --slice; give --slice NAME too")
    if all_phases and date:
        raise UserError("give either --all-phases or --date")
    if slice_ is not None and (all_phases or date or max_tokens is not None):
        raise UserError("--all-phases, --date and --max-tokens apply to a FILE|TEXT, not to --slice")
    the_run = _open(workspace, run)
    if slice_ is not None:
        from lifelong_peer.use import novelty

        emit(novelty(the_run, slice_, stream, phase), fmt, _render_novelty)
        return
    from lifelong_peer.use import score_run

    mode = "all" if all_phases else "date" if date else "one"
    result = score_run(the_run, text, phase, mode, max_tokens, text_field)
    if mode == "all" and result["note"] and fmt == Format.json:
        message(f"[yellow]note:[/yellow] {escape(result['note'])}")
    emit(result, fmt, {"one": _render_one, "all": _render_all, "date": _render_date}[mode])


# --- generate -------------------------------------------------------------------------------------------


def generate(
    run: str = RunArg,
    prompt: str = typer.Option("", "--prompt", help="Text the sample continues (default: a document's start)."),
    phase: int | None = PhaseOpt,
    temperature: float | None = typer.Option(
        None, "--temperature", min=0.0, help="Softmax temperature; 0 takes the most likely token. Default: 0.8."
    ),
    top_p: float | None = typer.Option(
        None, "--top-p", help="Draw from the most likely tokens holding this probability. Default: 0.95."
    ),
    max_bytes: int | None = typer.Option(None, "--max-bytes", min=1, help="Bytes of new text. Default: 200."),
    seed: int | None = typer.Option(
        None, "--seed", help="Seed of the draws: the same seed, the same text. Default: 0."
    ),
    workspace: Path | None = WorkspaceOpt,
    fmt: Format = FormatOpt,
) -> None:
    """Sample text from a run's model (byte-level or attached Hugging Face) to see what each era's model learnt.

    Example: lpeer generate sotu-naive-1 --prompt "Fellow citizens" --phase 0 --seed 1
    """
    from lifelong_peer.generate import SampleConfig
    from lifelong_peer.use import generate_run

    given = {"temperature": temperature, "top_p": top_p, "max_bytes": max_bytes, "seed": seed}
    cfg = SampleConfig(**{k: v for k, v in given.items() if v is not None})
    result = generate_run(_open(workspace, run), prompt, phase, cfg)

    def human(d: dict) -> None:
        message(
            f"run {escape(d['run'])}, model {escape(_model(d['phase'], d['checkpoint']))}: temperature "
            f"{d['temperature']}, top-p {d['top_p']}, seed {d['seed']}; stopped at {d['stopped']}"
        )
        stdout.print(f"[dim]{escape(d['prompt'])}[/dim]{escape(d['text'])}", highlight=False)

    emit(result, fmt, human)


# --- export ---------------------------------------------------------------------------------------------


def export(
    run: str = RunArg,
    out: Path = typer.Option(..., "--out", help="Directory to write (refused when not empty, unless --force)."),
    phase: int | None = PhaseOpt,
    force: bool = typer.Option(False, "--force", help="Replace a non-empty --out directory."),
    workspace: Path | None = WorkspaceOpt,
    fmt: Format = FormatOpt,
) -> None:
    """Export a run's model for other tools; load it with lifelong_peer.export.load_exported(DIR).

    A byte-level model: model.safetensors + config.json. An attached Hugging Face model: the base's
    save_pretrained folder (base/) + the PEER delta (peer.safetensors). Written to a temporary directory, then
    renamed.

    Example: lpeer export sotu-lifelong-1 --out sotu-model/
    """
    from lifelong_peer.export import export_run

    result = export_run(_open(workspace, run), out, phase, force)

    def human(d: dict) -> None:
        rows = {"run": d["run"], "model": _model(d["phase"], d["checkpoint"]), "kind": d["kind"], "out": d["out"]}
        stdout.print(key_value_table({k: escape(str(v)) for k, v in rows.items()} | {"files": d["files"]}))
        message(f"load it with: lifelong_peer.export.load_exported({escape(repr(d['out']))})")

    emit(result, fmt, human)


def register(app: typer.Typer) -> None:
    app.command()(score)
    app.command()(generate)
    app.command()(export)
