"""``lpeer init``, ``lpeer ingest``, ``lpeer streams``: each parses, calls one library function, renders."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from lifelong_peer import advice
from lifelong_peer.errors import UserError

from .options import FormatOpt, WorkspaceOpt
from .output import Format, emit, labelled, stderr, stdout
from .progress import PlainIngestProgress


def init(
    directory: Path | None = typer.Argument(
        None, help="Folder to create (or an existing one to turn into a workspace); default: --workspace."
    ),
    workspace: Path | None = WorkspaceOpt,
    fmt: Format = FormatOpt,
) -> None:
    """Create a workspace: a folder with a manifest of streams, slices and runs.

    Example: lpeer init ./work && cd ./work && lpeer ingest --default
    """
    from lifelong_peer.workspace import Workspace, default_root

    if directory is not None and workspace is not None and directory.resolve() != workspace.resolve():
        raise UserError(f"give the workspace folder once: {directory} or --workspace {workspace}")
    ws = Workspace.init(directory or workspace or default_root())
    emit({"workspace": str(ws.root)}, fmt, lambda d: stderr.print(f"created workspace {d['workspace']}"))


def ingest(
    source: str | None = typer.Argument(
        None, help="JSONL/CSV/Parquet file or folder, .txt folder, `datasets` save dir, or hf:NAME[:CONFIG]."
    ),
    name: str | None = typer.Option(None, "--name", help="Stream name (default stream: sotu)."),
    default: bool = typer.Option(False, "--default", help="Ingest the shipped State of the Union stream (six eras)."),
    text_field: str = typer.Option("text", help="Field holding the document text."),
    time_field: str = typer.Option("time", help="Field holding the time: ISO date/datetime, YYYY-MM, year, epoch s."),
    time_unit: str = typer.Option(
        "auto",
        help="How times are read: auto (a bare number is a year 1000-2100 or epoch s 1973-2100; a date lies in "
        "1000-2100) | year | s | ms (bare numbers in that unit; dates of any year).",
    ),
    id_field: str = typer.Option("id", help="Field with a stable document id (split hash); else the text's hash."),
    slice_: str = typer.Option(
        "year", "--slice", help="year | quarter | month | eras:1790,1840,... | quantiles:K | field:NAME."
    ),
    split: str = typer.Option("0.9,0.05,0.05", help="train,validation,test fractions (by a hash of the id)."),
    time_from_name: str | None = typer.Option(
        None, help="For .txt folders: regex on the file name giving the time (group `time`, group 1 or match)."
    ),
    encoding: str = typer.Option("utf-8", help="Text encoding of the source files."),
    on_bad_record: str = typer.Option("error", help="error: list bad records and stop; skip: skip and count them."),
    max_document_mb: float = typer.Option(16.0, help="A larger document is an error naming it."),
    block_size: int = typer.Option(4096, help="Tokens per stored block (storage only)."),
    tokenizer: str = typer.Option(
        "bytes", help="bytes (UTF-8, vocabulary 256) | hf:NAME_OR_PATH (a Hugging Face model's own tokenizer)."
    ),
    hf_split: str | None = typer.Option(None, help="Hugging Face datasets: read only this split."),
    replace: bool = typer.Option(False, "--replace", help="Re-ingest a stream whose source or options changed."),
    workspace: Path | None = WorkspaceOpt,
    fmt: Format = FormatOpt,
) -> None:
    """Read dated documents, cut them into time slices, tokenise and cache them as a stream.

    Example: lpeer ingest news.jsonl --name news --slice quarter --time-field date
    """
    from lifelong_peer.streams import ingest as ingest_fn
    from lifelong_peer.streams import ingest_default
    from lifelong_peer.streams.store import bad_record_lines
    from lifelong_peer.workspace import Workspace

    try:
        fractions = tuple(float(x) for x in split.split(","))
    except ValueError:
        raise UserError(f"--split {split!r} must be three numbers like 0.9,0.05,0.05") from None
    if default == (source is not None):
        raise UserError("give either a SOURCE (with --name) or --default")
    if source is not None and not name:
        raise UserError("--name is required with a SOURCE")
    ws = Workspace.open(workspace)
    common = {"split": fractions, "block_size": block_size, "on_bad_record": on_bad_record, "replace": replace}
    with _progress(fmt, name or "sotu") as progress:
        if default:
            summary = ingest_default(ws, name or "sotu", progress=progress, **common)
        else:
            summary = ingest_fn(
                ws,
                source,
                name,
                progress=progress,
                text_field=text_field,
                time_field=time_field,
                time_unit=time_unit,
                id_field=id_field,
                slice=slice_,
                time_from_name=time_from_name,
                encoding=encoding,
                max_document_mb=max_document_mb,
                hf_split=hf_split,
                tokenizer=tokenizer,
                **common,
            )
    for line in summary["warnings"]:
        stderr.print(labelled("warning:", "yellow", line), highlight=False)
    if summary["bad_records"]:  # each file's path once, one record per line (issue 17)
        skipped = summary["skipped"]["bad"]
        stderr.print("\n".join(bad_record_lines(summary["bad_records"], skipped)), highlight=False)
    emit(summary, fmt, _render_summary)


def streams(workspace: Path | None = WorkspaceOpt, fmt: Format = FormatOpt) -> None:
    """List the workspace's streams and their slices: time span, documents, text bytes, tokens per split.

    Example: lpeer streams --format json
    """
    from lifelong_peer.streams import list_streams
    from lifelong_peer.workspace import default_root

    data = list_streams(workspace)
    emit(data, fmt, lambda d: _render_streams(d, default_root(workspace)))


def _slice_table(title: str, slices: list[dict]) -> Table:
    """Slice names and sources are data (a ``field:`` value can be "[/b]"): the consoles print them as text."""
    table = Table(title=title)
    # the split columns count tokens (not documents or bytes): say so in their headers (issue 17)
    for col in ("slice", "start", "end", "documents", "bytes", "train tokens", "validation tokens", "test tokens"):
        table.add_column(col, justify="left" if col in ("slice", "start", "end") else "right")
    for s in slices:
        t = s["tokens"]
        table.add_row(
            s["name"], s["start"], s["end"], f"{s['documents']:,}", f"{s['bytes']:,}",
            f"{t['train']:,}", f"{t['validation']:,}", f"{t['test']:,}",
        )  # fmt: skip
    return table


def _render_summary(summary: dict) -> None:
    state = "unchanged (already ingested)" if summary["unchanged"] else f"ingested in {summary['seconds']:.1f} s"
    title = f"stream {summary['stream']} ← {summary['source']}: {summary['documents']:,} documents, {state}"
    stdout.print(_slice_table(title, summary["slices"]))


def _render_streams(data: dict, ws: Path) -> None:
    if not data["streams"]:
        hints = f"`{advice.command(advice.INGEST_DEFAULT, ws)}` or `{advice.command(advice.INGEST, ws)}`"
        stdout.print(f"no streams yet (run {hints})")
    for s in data["streams"]:
        stdout.print(_slice_table(f"{s['name']} ← {s['source']}", s["slices"]))


class _progress:
    """A rich progress bar on stderr for the two ingest passes; off a terminal, plain lines every 10 s
    (issue 17); none in JSON mode."""

    def __init__(self, fmt: Format, stream: str = ""):
        self.enabled = fmt == Format.human and stderr.is_terminal
        self.plain = fmt == Format.human and not stderr.is_terminal
        self.stream = stream
        self.bar = None
        self.tasks: dict[str, int] = {}

    def __enter__(self):
        if not self.enabled:
            write = lambda line: stderr.print(line, highlight=False)  # noqa: E731
            return PlainIngestProgress(write, self.stream) if self.plain else None
        from rich.progress import Progress

        self.bar = Progress(console=stderr, transient=True)
        self.bar.start()
        return self.update

    def update(self, phase: str, done: int, total: int | None) -> None:
        if phase not in self.tasks:
            self.tasks[phase] = self.bar.add_task(
                {"scan": "reading", "pack": "tokenising"}.get(phase, phase), total=total
            )
        self.bar.update(self.tasks[phase], completed=done, total=total)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()


def register(app: typer.Typer) -> None:
    app.command()(init)
    app.command()(ingest)
    app.command()(streams)
