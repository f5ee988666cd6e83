"""Reading finished runs: one run's metrics (``lpeer eval``) and runs side by side (``lpeer report``).

Everything here is computed from each run's ``results.json`` (metrics.py); nothing is cached.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

from . import advice
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
    ("ms_per_step", "ms/step", "{:.1f}"),
    ("disk_mb", "disk MB", "{:,.1f}"),
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
COST = (
    "run",
    "phases_done",
    "num_experts",
    "params",
    "active_params",
    "train_tokens",
    "wall_time_s",
    "ms_per_step",
    "disk_mb",
)
#: the numeric columns averaged over the runs of one strategy (seeds)
AGGREGATED = (*QUALITY[2:], "params", "active_params", "train_tokens", "wall_time_s", "ms_per_step", "disk_mb")
#: what the report's summary names a winner of (issue 25): (key, "best ..." phrase); lower is better for each
VERDICTS = (
    ("final_avg_bpb", "best final average"),
    ("avg_forgetting_bpb", "least forgetting"),
    ("newest_bpb", "best newest slice"),
)
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
            "ms_per_step": _median(summary["ms_per_step"]),
            "disk_mb": None,  # set by compare_runs when it knows the run's directory
        }
    )


def _median(values: list) -> float | None:
    """The median of the values that are not None (the phases that recorded one), or None."""
    known = [v for v in values if v is not None]
    return float(np.median(known)) if known else None


def disk_mb(run_dir: Path) -> float:
    """Megabytes (10⁶ bytes) of every file in a run's directory: checkpoints, results, logs."""
    return sum(p.stat().st_size for p in Path(run_dir).rglob("*") if p.is_file()) / 1e6


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
    row |= {k: summary[f"base_{k}"] for k in ("num_experts", "params", "active_params")}  # not phase 0's (issue 25)
    for unit in ("bpb", "nll"):
        row[f"final_avg_{unit}"] = row[f"base_avg_{unit}"] = summary[f"base_avg_{unit}"]
    row["newest_bpb"] = summary["before_bpb"][seen - 1] if seen else None
    return row


#: bits per byte: a base's losses evaluated by two builds of the kernels or of torch differ by about 4e-4
#: (README, "Numbers and machines"); two different starting models differ by far more on some slice
SAME_BASE_BPB = 1e-3


def same_base(a: dict, b: dict) -> bool:
    """Whether the runs summarised by ``a`` and ``b`` started from the same model: the same parameter count
    where both recorded it at their start (runs before issue 25 did not; their expert count is inferred), and
    losses before training within ``SAME_BASE_BPB`` on every slice."""
    if a.get("base_params") is not None and b.get("base_params") is not None and a["base_params"] != b["base_params"]:
        return False
    return all(abs(x - y) <= SAME_BASE_BPB for x, y in zip(a["before_bpb"], b["before_bpb"], strict=True))


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


def compare_runs(runs: list[RunResults], split: str = "test", dirs: list[Path] | None = None) -> dict:
    """Runs side by side on one split: one row per run, mean ± std per strategy, and a summary first
    (``verdict``: who wins what, by how much against the seed noise, at what cost).

    The frozen base comes first ("base", no training: one row per distinct starting model), and,
    when ``joint`` runs are compared, every row gets its share of joint's mean gain over the base.
    All runs must share the same slices (a comparison across different streams means nothing).
    ``dirs``: the runs' directories, for their disk use and the command adding a joint run.
    """
    if not runs:
        raise UserError("no runs to compare")
    slices = runs[0].slices
    for r in runs[1:]:
        if r.slices != slices:
            raise UserError(f"runs {runs[0].run!r} and {r.run!r} have different slices ({slices} vs {r.slices})")
    summaries = [summarize(r, split) for r in runs]
    bases: list[tuple[dict, dict]] = []  # one row per starting model, told apart by its losses and size
    for s in summaries:
        if not s["phases_done"]:
            continue
        same = next((row for first, row in bases if same_base(first, s)), None)
        if same is None:
            bases.append((s, base_row(s, BASE if not bases else f"{BASE}-{len(bases) + 1}")))
        else:  # what an older record lacks (its base's size, issue 25) a newer one may know
            same |= {k: v for k, v in base_row(s, same["run"]).items() if same[k] is None and v is not None}
    rows = [*(row for _, row in bases), *(run_row(s) for s in summaries)]
    for row, d in zip(rows[len(bases) :], dirs or [], strict=False):
        row["disk_mb"] = disk_mb(d)
    reference = share_of_joint(rows)
    comparison = {
        "split": split,
        "slices": list(slices),
        "joint_gain_bpb": reference,
        "runs": rows,
        "strategies": aggregate(rows),
    }
    has_joint = any(r["strategy"] == REFERENCE for r in rows)
    comparison["add_joint"] = None if has_joint or not dirs else joint_command(Path(dirs[0]))
    return comparison | {"summary": verdict(comparison)}


def joint_command(run_dir: Path) -> str | None:
    """The command adding a joint run comparable with the run in ``run_dir`` (issue 25): its stream, slices, base
    model (the file its phase 0 started from) and the training options its user gave — those that differ from its
    strategy's preset. None for a run on a Hugging Face base, or one without a readable config or base."""
    import dataclasses
    import shlex

    from .config import RunConfig, TrainConfig, resolve_config
    from .workspace import MANIFEST

    try:
        cfg = RunConfig.from_dict(json.loads((run_dir / "config.json").read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    base = run_dir / "checkpoints" / "base.safetensors"
    if cfg.attach is not None or not base.is_file():
        return None
    try:
        preset = resolve_config(cfg.train.strategy)[1]
    except UserError:  # a strategy this version does not know: the defaults are what its user changed
        preset = TrainConfig()
    options = ""
    for f in dataclasses.fields(TrainConfig):
        value, flag = getattr(cfg.train, f.name), f.name.replace("_", "-")
        if f.name == "strategy" or value is None or value == getattr(preset, f.name):
            continue
        options += (
            f" --{'' if value else 'no-'}{flag}" if isinstance(value, bool) else f" --{flag} {shlex.quote(str(value))}"
        )
    root = run_dir.parent.parent  # WORKSPACE/runs/RUN: the hint names the run's workspace, so it runs as printed
    return advice.command(
        advice.JOINT,
        root if (root / MANIFEST).is_file() else None,
        stream=shlex.quote(cfg.stream),
        base=base,
        slices=shlex.quote(",".join(cfg.slices)),
        name=f"{cfg.stream}-joint-s{cfg.train.seed}",
        options=options,
    )


def verdict(comparison: dict) -> list[str]:
    """The report's summary (issue 25), one sentence each: for each of ``VERDICTS`` the best strategy and the
    runner-up, by how much and against what seed noise; what each strategy costs; how to add the joint
    reference when none was compared. The untrained base and joint (not continual) are references, not
    candidates. Strategies, not runs: several runs of one strategy are its seeds."""
    formats = {key: fmt for key, _, fmt in COLUMNS}
    entries = [e for e in comparison["strategies"] if e["strategy"] not in (BASE, REFERENCE)]
    lines = []
    for key, phrase in VERDICTS:
        ranked = sorted((e for e in entries if e[key]["mean"] is not None), key=lambda e: e[key]["mean"])
        if not ranked:
            lines.append(f"{phrase}: not defined for these runs (forgetting needs two phases or more).")
            continue
        best, value = ranked[0]["strategy"], _spread(ranked[0][key], formats[key])
        if len(ranked) == 1:
            lines.append(f"**{phrase}: {best}**, {value} (the only strategy compared).")
            continue
        second = ranked[1]
        gap = second[key]["mean"] - ranked[0][key]["mean"]
        lines.append(
            f"**{phrase}: {best}**, {value}, {gap:.4f} bits per byte better than {second['strategy']} "
            f"({_spread(second[key], formats[key])}); {_noise(gap, ranked[0], second, key)}."
        )
    for e in (e for e in comparison["strategies"] if e["strategy"] != BASE):
        lines.append(f"cost of {e['strategy']}{_runs(e)}: {_cost(e)}.")
    if comparison.get("joint_gain_bpb") is None:
        lines.append(_joint_line(comparison))
    return lines


def _spread(stat: dict, fmt: str) -> str:
    """ "1.8782 ± 0.0035" (mean ± sample std over runs), or the one run's value."""
    return fmt.format(stat["mean"]) + ("" if stat["std"] is None else " ± " + fmt.replace("+", "").format(stat["std"]))


def _runs(entry: dict) -> str:
    return f" (mean of {entry['runs']} runs)" if entry["runs"] > 1 else ""


def _noise(gap: float, best: dict, second: dict, key: str) -> str:
    """How a gap between two strategies compares with their seed noise: the standard error of the difference of
    two means, sqrt(s₁²/n₁ + s₂²/n₂), when both have several runs; else that the noise is not measured."""
    a, b = best[key], second[key]
    if a["std"] is None or b["std"] is None:
        single = [e["strategy"] for e in (best, second) if e[key]["std"] is None]
        return (
            f"one run of {' and '.join(single)}, so the seed noise is not measured "
            "(a second --seed tells a gap from noise)"
        )
    error = math.sqrt(a["std"] ** 2 / a["n"] + b["std"] ** 2 / b["n"])
    if error == 0:
        return f"the {a['n']} and {b['n']} runs agree exactly"
    ratio = gap / error
    reading = "larger than the seed noise" if ratio >= 2 else "within the seed noise"
    return f"{ratio:.1f}× the standard error of the difference over seeds ({a['n']} and {b['n']} runs): {reading}"


def _cost(entry: dict) -> str:
    """Parameters, active parameters per token, wall time, ms per step and disk of a strategy (means over runs)."""
    parts = (
        ("params", "{:,.0f} parameters"),
        ("active_params", "{:,.0f} active per token"),
        ("wall_time_s", "{:,.0f} s wall time"),
        ("ms_per_step", "{:.1f} ms per step"),
        ("disk_mb", "{:,.1f} MB on disk"),
    )
    known = [fmt.format(entry[key]["mean"]) for key, fmt in parts if entry[key]["mean"] is not None]
    return ", ".join(known) or "not recorded"


def _joint_line(comparison: dict) -> str:
    """Why the share of joint's gain is missing, and the command that adds it."""
    if any(r["strategy"] == REFERENCE for r in comparison["runs"]):
        return "joint gained nothing over the base, so no share of its gain is defined."
    command = comparison.get("add_joint")
    how = f"`{command}`" if command else "`lpeer run --strategy joint` from the same base, slices and options"
    return (
        "no joint run (all slices at once: the non-continual reference) was compared, so no share of its gain is "
        f"shown: add one with {how}, and pass it to `lpeer report` with these runs."
    )


def _cell(value, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return fmt.format(value)


def table_cells(comparison: dict, keys: tuple[str, ...] | None = None) -> tuple[list[str], list[list[str]]]:
    """Headers and formatted cells of the per-run table, all COLUMNS or those in ``keys``."""
    columns = [c for c in _shown(comparison) if keys is None or c[0] in keys]
    return [h for _, h, _ in columns], [[_cell(row[k], f) for k, _, f in columns] for row in comparison["runs"]]


def _shown(comparison: dict) -> tuple:
    """COLUMNS, without the share of joint's gain when it is undefined for every run (the summary says why)."""
    undefined = comparison.get("joint_gain_bpb") is None
    return tuple(c for c in COLUMNS if not (undefined and c[0] == "share_of_joint"))


def strategy_cells(comparison: dict, keys: tuple[str, ...] = AGGREGATED) -> tuple[list[str], list[list[str]]]:
    """Headers and "mean ± std" cells of the per-strategy table, for the aggregated columns in ``keys``."""
    columns = [c for c in _shown(comparison) if c[0] in AGGREGATED and c[0] in keys]
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

    summary = "".join(f"- {line}\n" for line in comparison.get("summary") or verdict(comparison))
    return (
        f"Split: {comparison['split']}; slices: {', '.join(comparison['slices'])}. Bits per byte, lower is better; "
        "final avg is weighted by held-out bytes; forgetting > 0 and BWT < 0 mean forgotten.\n\n"
        + summary
        + "\n"
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
        [r for r in comparison["runs"] if r["strategy"] == BASE],
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
    comparison = compare_runs(loaded, split, dirs)
    for row in comparison["runs"]:
        row |= edits.get(row["run"], {})  # the frozen-base row is no run of its own
    files = write_report(out_dir, comparison, loaded)
    return comparison | {"files": {k: str(v) for k, v in files.items()}}
