"""Reading finished runs: one run's metrics (``lpeer eval``) and runs side by side (``lpeer report``).

Everything here is computed from each run's ``results.json`` (metrics.py); nothing is cached.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

from .errors import UserError
from .files import atomic_write_json, atomic_write_text, checkpoint_order
from .metrics import RESULTS_FILE, RunResults, load_results, summarize

#: the columns of the side-by-side table, in order: (key, header, format)
COLUMNS = (
    ("run", "run", "{}"),
    ("strategy", "strategy", "{}"),
    ("final_avg_bpb", "final avg", "{:.4f}"),
    ("gain_bpb", "gain", "{:+.4f}"),
    ("share_of_joint", "share of joint's gain", "{:.0%}"),
    ("newest_bpb", "newest", "{:.4f}"),
    ("avg_forgetting_bpb", "forgetting", "{:+.4f}"),
    ("bwt_bpb", "BWT", "{:+.4f}"),
    ("fwt_bpb", "FWT", "{:+.4f}"),
    ("phases_done", "phases", "{}"),
    ("num_experts", "experts (all layers)", "{:,.0f}"),
    ("params", "params", "{:,.0f}"),
    ("active_params", "active params", "{:,.0f}"),
    ("train_tokens", "train tokens", "{:,.0f}"),
    ("wall_time_s", "wall s", "{:.1f}"),
)
#: the quality metrics (the rest of COLUMNS is the model's size and the cost)
QUALITY = (
    "run",
    "strategy",
    "final_avg_bpb",
    "gain_bpb",
    "share_of_joint",
    "newest_bpb",
    "avg_forgetting_bpb",
    "bwt_bpb",
    "fwt_bpb",
)
COST = ("run", "phases_done", "num_experts", "params", "active_params", "train_tokens", "wall_time_s")
#: the numeric columns averaged over the runs of one strategy (seeds)
AGGREGATED = (*QUALITY[2:], "train_tokens", "wall_time_s")
#: the strategy whose gain over the base is the reference of ``share_of_joint`` (not continual)
REFERENCE = "joint"
#: the strategy name of the frozen base's row ("no training"), one per distinct base
BASE = "base"


def edits_since_evaluation(run_dir: Path) -> list[dict]:
    """The edits by hand (edits.jsonl records) that came after the run's last evaluation: the model the
    run continues from is an edit of the evaluated one, so results.json describes the model before
    them (issue 17). Empty when the latest checkpoint is not an edit."""
    try:
        checkpoint = json.loads((run_dir / "state.json").read_text(encoding="utf-8"))["checkpoint"]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    order = checkpoint_order(checkpoint) if isinstance(checkpoint, str) else None
    if not order or not order[2]:
        return []
    path = run_dir / "edits.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
    records = []
    for line in lines:
        try:
            record = json.loads(line)
            edit = checkpoint_order(f"checkpoints/{record['checkpoint']}")
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by a crash
        if edit and edit[0] == order[0] and 0 < edit[2] <= order[2]:
            records.append(record)
    return records


def find_run_dir(run: str, workspace: str | Path | None = None) -> Path:
    """A run directory given as a path, or a run id looked up in the workspace (--workspace, $LPEER_WORKSPACE, cwd)."""
    path = Path(run)
    if path.is_dir():
        return path
    if os.sep in run:
        raise UserError(f"{run}: no such run directory")
    from .workspace import Workspace

    try:
        return Workspace.open(workspace).resolve_run(run)
    except UserError as e:
        raise UserError(f"{run!r} is neither a run directory nor a known run id: {e}") from None


def load_run(run: str, workspace: str | Path | None = None) -> RunResults:
    run_dir = find_run_dir(run, workspace)
    if not (run_dir / RESULTS_FILE).is_file():
        if not (run_dir / "checkpoints" / "base.safetensors").is_file():
            raise UserError(f"{run_dir / RESULTS_FILE} not found and the run has no checkpoints to evaluate")
        from .evaluate import recompute_results
        from .run import open_run
        from .workspace import Workspace

        ws = Workspace.open(workspace if workspace else run_dir.parent.parent)
        return recompute_results(open_run(ws, str(run_dir)))
    return load_results(run_dir)


def evaluate_run(run: str, split: str = "test", workspace: str | Path | None = None, reevaluate: bool = False) -> dict:
    """The loss matrices and forgetting metrics of one run (``metrics.summarize``); for ``lpeer eval``.

    ``edits_since_evaluation``: edits by hand (``lpeer grow``/``freeze``) made after the last
    evaluation — the matrix describes the model before them (issue 17). With ``reevaluate`` and such
    edits, ``edited`` holds the edited model's row on ``split`` (bpb, nll) and its size."""
    run_dir = find_run_dir(run, workspace)
    summary = summarize(load_run(run, workspace), split)
    edits = edits_since_evaluation(run_dir)
    summary |= _edit_fields(run_dir, edits)
    summary["edited"] = None
    if reevaluate and edits:
        from .evaluate import evaluate_latest
        from .run import open_run
        from .workspace import Workspace

        ws = Workspace.open(workspace if workspace else run_dir.parent.parent)
        latest = evaluate_latest(open_run(ws, str(run_dir)))
        row = latest.pop("rows")[split]
        summary["edited"] = latest | {"bpb": list(row.bpb), "nll": list(row.nll)}
    return summary


def _edit_fields(run_dir: Path, edits: list[dict]) -> dict:
    """``edits_since_evaluation`` (one phrase per edit) and ``reevaluate`` (the command scoring the
    edited model; None without edits)."""
    from . import advice

    return {
        "edits_since_evaluation": [_edit_line(e) for e in edits],
        "reevaluate": advice.command(advice.REEVALUATE, run=run_dir) if edits else None,
    }


def _edit_line(edit: dict) -> str:
    """An edits.jsonl record as a short phrase: ``grow +8 sub-keys (phase-001-edit-1.safetensors)``."""
    if edit.get("command") == "grow":
        what = f"grow {edit.get('subkeys')} sub-keys" + (f" for slice {edit['slice']}" if edit.get("slice") else "")
    else:
        what = f"freeze {edit.get('action')}" + (f" ({edit['mode']})" if edit.get("mode") else "")
    return f"{what} → {edit.get('checkpoint')}"


def run_row(summary: dict) -> dict:
    """One run's line in the comparison: its final metrics and the model after its last phase."""
    keys = (
        "run",
        "strategy",
        "phases_done",
        "final_avg_bpb",
        "base_avg_bpb",
        "gain_bpb",
        "newest_bpb",
        "avg_forgetting_bpb",
        "bwt_bpb",
        "fwt_bpb",
    )
    row = {key: summary[key] for key in keys}
    last = {key: (summary[key][-1] if summary[key] else None) for key in ("num_experts", "params", "active_params")}
    return (
        row
        | last
        | {
            "complete": summary["complete"],
            "final_avg_nll": summary["final_avg_nll"],
            "base_avg_nll": summary["base_avg_nll"],
            "gain_nll": summary["gain_nll"],
            "share_of_joint": None,  # set by compare_runs when a joint run is compared
            "avg_forgetting_nll": summary["avg_forgetting_nll"],
            "train_tokens": summary["total_train_tokens"],
            "wall_time_s": summary["total_wall_time_s"],
        }
    )


def aggregate(rows: list[dict]) -> list[dict]:
    """Mean and sample standard deviation per strategy (over seeds), skipping undefined values."""
    out = []
    for strategy in dict.fromkeys(r["strategy"] for r in rows):
        group = [r for r in rows if r["strategy"] == strategy]
        entry: dict = {"strategy": strategy, "runs": len(group)}
        for key in AGGREGATED:
            values = np.array([r[key] for r in group if r[key] is not None], dtype=float)
            entry[key] = {
                "mean": float(values.mean()) if len(values) else None,
                "std": float(values.std(ddof=1)) if len(values) > 1 else None,
                "n": len(values),
            }
        out.append(entry)
    return out


def base_row(summary: dict, name: str) -> dict:
    """The frozen base as a run of its own ("no training"): its loss averaged like a final average
    over the slices ``summary``'s run has seen; gain 0 by definition, no forgetting, no tokens."""
    seen = summary["phases_done"]
    row = {key: None for key in run_row(summary)} | {"run": name, "strategy": BASE, "phases_done": 0}
    row |= {"complete": True, "train_tokens": 0, "wall_time_s": 0.0, "gain_bpb": 0.0, "gain_nll": 0.0}
    row |= {"num_experts": summary["num_experts"][0] if seen else None}
    for unit in ("bpb", "nll"):
        row[f"final_avg_{unit}"] = row[f"base_avg_{unit}"] = summary[f"base_avg_{unit}"]
    row["newest_bpb"] = summary["before_bpb"][seen - 1] if seen else None
    return row


def share_of_joint(rows: list[dict]) -> float | None:
    """Fill each row's ``share_of_joint`` = its gain / the mean gain of the ``joint`` runs (bits per
    byte), when joint runs are among them and gained; returns that reference gain (or None)."""
    gains = [r["gain_bpb"] for r in rows if r["strategy"] == REFERENCE and r["gain_bpb"] is not None]
    reference = sum(gains) / len(gains) if gains else None
    if reference is None or reference <= 0:
        return None
    for r in rows:
        r["share_of_joint"] = r["gain_bpb"] / reference if r["gain_bpb"] is not None else None
    return reference


def compare_runs(runs: list[RunResults], split: str = "test") -> dict:
    """Runs side by side on one split: one row per run and mean ± std per strategy.

    The frozen base comes first ("base", no training: one row per distinct starting model), and,
    when ``joint`` runs are compared, every row gets its share of joint's mean gain over the base.
    All runs must share the same slices (a comparison across different streams means nothing).
    """
    if not runs:
        raise UserError("no runs to compare")
    slices = runs[0].slices
    for r in runs[1:]:
        if r.slices != slices:
            raise UserError(f"runs {runs[0].run!r} and {r.run!r} have different slices ({slices} vs {r.slices})")
    summaries = [summarize(r, split) for r in runs]
    bases: dict[tuple, dict] = {}  # one row per starting model, told apart by its losses
    for s in summaries:
        key = tuple(s["before_bpb"])
        if s["phases_done"] and key not in bases:
            bases[key] = base_row(s, BASE if not bases else f"{BASE}-{len(bases) + 1}")
    rows = [*bases.values(), *(run_row(s) for s in summaries)]
    reference = share_of_joint(rows)
    return {
        "split": split,
        "slices": list(slices),
        "joint_gain_bpb": reference,
        "runs": rows,
        "strategies": aggregate(rows),
    }


def _cell(value, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return fmt.format(value)


def table_cells(comparison: dict, keys: tuple[str, ...] | None = None) -> tuple[list[str], list[list[str]]]:
    """Headers and formatted cells of the per-run table, all COLUMNS or those in ``keys``."""
    columns = [c for c in COLUMNS if keys is None or c[0] in keys]
    return [h for _, h, _ in columns], [[_cell(row[k], f) for k, _, f in columns] for row in comparison["runs"]]


def strategy_cells(comparison: dict, keys: tuple[str, ...] = AGGREGATED) -> tuple[list[str], list[list[str]]]:
    """Headers and "mean ± std" cells of the per-strategy table, for the aggregated columns in ``keys``."""
    columns = [c for c in COLUMNS if c[0] in AGGREGATED and c[0] in keys]
    body = []
    for entry in comparison["strategies"]:
        cells = [entry["strategy"], str(entry["runs"])]
        for key, _, fmt in columns:
            mean, std = entry[key]["mean"], entry[key]["std"]
            cells.append(_cell(mean, fmt) + ("" if std is None else " ± " + fmt.replace("+", "").format(std)))
        body.append(cells)
    return ["strategy", "runs", *(h for _, h, _ in columns)], body


def markdown(comparison: dict) -> str:
    """The comparison as Markdown tables (per run, then per strategy), ready for a results page."""

    def table(headers: list[str], body: list[list[str]]) -> str:
        lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in body])

    return (
        f"Split: {comparison['split']}; slices: {', '.join(comparison['slices'])}. Bits per byte, lower is better; "
        "final avg is weighted by held-out bytes; forgetting > 0 and BWT < 0 mean forgotten.\n\n"
        + table(*table_cells(comparison))
        + "\n\n"
        + table(*strategy_cells(comparison))
        + "\n"
    )


def write_report(out_dir: str | Path, comparison: dict, runs: list[RunResults] | None = None) -> dict[str, Path]:
    """Write report.json, report.md and report.png (forgetting against newest-slice bpb) into ``out_dir``,
    and with ``runs`` (those compared) ``heatmaps/RUN.png``: every run's heatmap on one colour scale,
    so that the colours of two runs can be compared (issue 17), and ``cost.png``: per phase, the average
    over the slices trained so far beside the pool size, active parameters and ms per step (issue 24)."""
    from . import plots

    out = Path(out_dir)
    paths = {"json": out / "report.json", "markdown": out / "report.md", "plot": out / "report.png"}
    atomic_write_json(paths["json"], comparison)
    atomic_write_text(paths["markdown"], markdown(comparison))
    plots.forgetting_scatter(
        paths["plot"],
        [r for r in comparison["runs"] if r["strategy"] != BASE],
        f"forgetting vs newest slice ({comparison['split']} split)",
    )
    if runs:
        split = comparison["split"]
        shown = [summarize(r, split) for r in runs]
        paths["cost"] = plots.cost_curves(out / "cost.png", shown, f"quality and cost per phase ({split} split)")
        scale = plots.shared_scale([(s["matrix_bpb"], s["before_bpb"]) for s in shown])
        paths["heatmaps"] = out / "heatmaps"
        paths["heatmaps"].mkdir(parents=True, exist_ok=True)
        for s in shown:
            title = f"{s['run']} ({s['strategy']}), {split} split; colours shared by the report's runs"
            plots.heatmap(
                paths["heatmaps"] / f"{s['run']}.png", s["slices"], s["matrix_bpb"], s["before_bpb"], title, scale
            )
    return paths


def report(runs: list[str], out_dir: str | Path, split: str = "test", workspace: str | Path | None = None) -> dict:
    """Load the runs, compare them, write the report files; for ``lpeer report``. A run's row lists
    ``edits_since_evaluation``: edits by hand its numbers predate (issue 17)."""
    loaded = [load_run(r, workspace) for r in runs]
    dirs = [find_run_dir(r, workspace) for r in runs]
    edits = {res.run: _edit_fields(d, edits_since_evaluation(d)) for d, res in zip(dirs, loaded, strict=True)}
    comparison = compare_runs(loaded, split)
    for row in comparison["runs"]:
        row |= edits.get(row["run"], {})  # the frozen-base row is no run of its own
    files = write_report(out_dir, comparison, loaded)
    return comparison | {"files": {k: str(v) for k, v in files.items()}}
