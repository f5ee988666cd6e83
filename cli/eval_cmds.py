"""``lpeer eval`` and ``lpeer report``: read runs' results, print tables, write the comparison."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import typer
from rich.table import Table
from rich.text import Text

from .options import FormatOpt, WorkspaceOpt
from .output import Format, emit, labelled, message, stdout


class Split(str, Enum):
    validation = "validation"
    test = "test"


SplitOpt = typer.Option(
    Split.test, "--split", help="held-out split: test for reported numbers, validation for decisions."
)


def _num(value, fmt: str = "{:.4f}") -> str:
    return "—" if value is None else fmt.format(value)


def _render_eval(s: dict) -> None:
    matrix = Table(
        title=f"{s['run']} ({s['strategy']}): bits per byte, {s['split']} split; below the diagonal: change since trained"
    )
    matrix.add_column("after phase")
    for name in s["slices"]:
        matrix.add_column(name, justify="right")
    matrix.add_row("base", *(_num(v) for v in s["before_bpb"]))
    edited = s.get("edited")
    for i, row in enumerate(s["matrix_bpb"]):
        cells = []
        for j, v in enumerate(row):
            trained = s["matrix_bpb"][j][j] if j < i else None
            if v is not None and trained is not None:
                delta = v - trained
                cells.append(Text.assemble(f"{v:.4f} ", (f"{delta:+.4f}", "red" if delta > 0 else "green")))
            else:
                cells.append(Text(_num(v), style="bold" if i == j else "dim"))
        matrix.add_row(f"{i}: {s['slices'][i]}", *cells)
    if edited:
        matrix.add_row(Text("edited", style="bold"), *(_num(v) for v in edited["bpb"]))
    stdout.print(matrix)

    metrics = Table(title=f"metrics over the {s['phases_done']} finished phase(s) of {len(s['slices'])}")
    for col in ("metric", "bits/byte", "nats/token", "meaning"):
        metrics.add_column(col, justify="left" if col in ("metric", "meaning") else "right")
    for key, meaning in (
        ("final_avg", "after the last phase, over trained slices, weighted by held-out size"),
        ("final_avg_unweighted", "the same, plain mean over slices"),
        ("base_avg", "the base model before phase 0, averaged like final_avg"),
        ("gain", "base_avg − final_avg; > 0 = the phases lowered the loss"),
        ("avg_forgetting", "mean over earlier slices of final − best; > 0 = forgot"),
        ("bwt", "mean of (just trained − final); < 0 = forgot"),
        ("fwt", "mean of (base − before training on it); > 0 = earlier phases helped"),
        ("newest", "newest trained slice after the last phase"),
    ):
        signed = "{:+.4f}" if key in ("avg_forgetting", "bwt", "fwt", "gain") else "{:.4f}"
        metrics.add_row(key, _num(s[f"{key}_bpb"], signed), _num(s[f"{key}_nll"], signed), meaning)
    stdout.print(metrics)

    growth = Table(title="phases")
    # issue 25: a count of experts says whose: all layers' here, a layer's in `lpeer grow` / `inspect`
    for col in (
        "phase",
        "slice",
        "experts (all layers)",
        "frozen",
        "params",
        "active params",
        "train tokens",
        "wall s",
    ):
        growth.add_column(col, justify="left" if col == "slice" else "right")
    for i in range(s["phases_done"]):
        growth.add_row(
            str(i),
            s["slices"][i],
            f"{s['num_experts'][i]:,}",
            f"{s['frozen_fraction'][i]:.1%}",
            f"{s['params'][i]:,}",
            f"{s['active_params'][i]:,}",
            f"{s['train_tokens'][i]:,}",
            f"{s['wall_time_s'][i]:.1f}",
        )
    stdout.print(growth)
    if edited:
        message(
            f"edited: the model after the edits ({edited['checkpoint']}): {edited['num_experts']:,} experts in all "
            "layers, "
            f"{edited['frozen_fraction']:.1%} frozen, {edited['params']:,} params"
        )
    _note_edits(s, bool(edited))


def _note_edits(s: dict, reevaluated: bool = False) -> None:
    """Say on stderr that a run's numbers predate edits by hand (issue 17)."""
    if not s.get("edits_since_evaluation"):
        return
    how = (
        "the 'edited' row scores the edited model" if reevaluated else f"score the edited model with {s['reevaluate']}"
    )
    edits = "; ".join(s["edits_since_evaluation"])
    message(
        labelled(
            "note:",
            "yellow",
            f"run {s['run']}'s results predate its edits by hand ({edits}): the matrix "
            f"and expert counts describe the model before them; {how}",
        )
    )


def eval_cmd(
    run: str = typer.Argument(..., help="run id in the workspace, or a run directory."),
    split: Split = SplitOpt,
    reevaluate: bool = typer.Option(
        False,
        "--reevaluate",
        help="When the run's model was edited by hand after its last evaluation (lpeer grow / freeze), "
        "also score the edited model (the 'edited' row).",
    ),
    fmt: Format = FormatOpt,
    workspace: Path | None = WorkspaceOpt,
) -> None:
    """Loss matrix and forgetting metrics (forgetting, BWT, FWT, final average) of one run.

    Example: lpeer eval run-1 --split test --format json
    """
    from lifelong_peer.report import evaluate_run

    emit(evaluate_run(run, split.value, workspace, reevaluate), fmt, _render_eval)


def _table(title: str, headers: list[str], body: list[list[str]]) -> Table:
    table = Table(title=title)
    for h in headers:
        table.add_column(h, justify="left" if h in ("run", "strategy") else "right", overflow="fold")
    for row in body:
        table.add_row(*row)
    return table


def _render_report(c: dict) -> None:
    from lifelong_peer.report import COST, QUALITY, strategy_cells, table_cells

    for line in c.get("summary", []):  # the verdict first (issue 25)
        stdout.print("• " + line.replace("**", ""), markup=False, highlight=False)
    stdout.print(_table(f"runs, {c['split']} split: bits per byte, lower is better", *table_cells(c, QUALITY)))
    stdout.print(_table("model and cost", *table_cells(c, COST)))
    stdout.print(_table("per strategy: mean ± std over runs", *strategy_cells(c, QUALITY)))
    for row in c["runs"]:
        _note_edits(row)
    message(f"wrote {', '.join(c['files'].values())}")


def report_cmd(
    runs: list[str] = typer.Argument(..., help="run ids or run directories to compare."),
    out: Path = typer.Option(Path("report"), "--out", help="directory for report.json, report.md and report.png."),
    split: Split = SplitOpt,
    fmt: Format = FormatOpt,
    workspace: Path | None = WorkspaceOpt,
) -> None:
    """Compare runs side by side: a table and a plot of forgetting against newest-slice bits per byte.

    Example: lpeer report naive-s0 lifelong-s0 --out report/
    """
    from lifelong_peer.report import report

    emit(report(runs, out, split.value, workspace), fmt, _render_report)
