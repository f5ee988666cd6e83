"""The files of a run directory written from its results: metrics.csv (long format), matrix.csv,
summary.json, and the heatmap and curves (``lifelong_peer.plots``). Recomputable from results.json."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import numpy as np

from .files import atomic_write_json, atomic_write_text
from .metrics import DEFINITIONS, UNITS, RunResults, forgetting_table, summarize

METRICS_COLUMNS = (
    "phase",
    "train_slice",
    "eval_slice",
    "split",
    "nll",
    "bpb",
    "tokens",
    "bytes",
    "num_experts",
    "frozen_fraction",
    "forgetting",
    "forgetting_nll",
)


def metrics_rows(results: RunResults) -> list[dict]:
    """Long format (Avalanche's shape): one row per split × phase × eval slice.

    Phase −1 is the base model (train_slice empty). ``forgetting`` is F in bits per byte of that
    slice after that phase (``forgetting_nll`` in nats/token). Cells that are undefined (forgetting
    for j ≥ phase, losses of an empty held-out split) are empty.
    """
    rows = []
    for split, e in results.eval.items():
        F = {
            u: forgetting_table(np.array([getattr(r, u) for r in e.after]).reshape(-1, len(results.slices)))
            for u in UNITS
        }
        for i, r in [(-1, e.before), *enumerate(e.after)]:
            phase = results.phases[i] if i >= 0 else None
            for j, name in enumerate(results.slices):
                rows.append(
                    {
                        "phase": i,
                        "train_slice": phase.slice if phase else "",
                        "eval_slice": name,
                        "split": split,
                        "nll": r.nll[j],
                        "bpb": r.bpb[j],
                        "tokens": r.tokens[j],
                        "bytes": r.bytes[j],
                        "num_experts": phase.num_experts if phase else "",
                        "frozen_fraction": phase.frozen_fraction if phase else "",
                        "forgetting": F["bpb"][i, j] if i >= 0 else math.nan,
                        "forgetting_nll": F["nll"][i, j] if i >= 0 else math.nan,
                    }
                )
    return rows


def matrix_rows(results: RunResults) -> list[dict]:
    """Wide format: one row per split × unit × phase (base first), one column per slice."""
    rows = []
    for split, e in results.eval.items():
        for unit in UNITS:
            for i, r in [(-1, e.before), *enumerate(e.after)]:
                row = {"split": split, "unit": unit, "phase": i, "train_slice": results.slices[i] if i >= 0 else ""}
                rows.append(row | dict(zip(results.slices, getattr(r, unit), strict=True)))
    return rows


def _csv(rows: list[dict], columns: list[str]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: "" if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()} for row in rows)
    return buf.getvalue()


def report_split(results: RunResults) -> str:
    """The split reported in files and plots: test when the run has it (validation is for decisions)."""
    return "test" if "test" in results.eval else next(iter(results.eval))


def write_run_outputs(run_dir: str | Path, results: RunResults) -> dict[str, Path]:
    """Write metrics.csv, matrix.csv, summary.json, heatmap.png and curves.png into ``run_dir``.

    Safe to call after every phase (each file is replaced atomically). Plots show the test split
    (validation if there is no test evaluation). Returns the written paths by name.
    """
    from . import plots

    run_dir = Path(run_dir)
    paths = {
        name: run_dir / name for name in ("metrics.csv", "matrix.csv", "summary.json", "heatmap.png", "curves.png")
    }
    atomic_write_text(paths["metrics.csv"], _csv(metrics_rows(results), list(METRICS_COLUMNS)))
    atomic_write_text(
        paths["matrix.csv"], _csv(matrix_rows(results), ["split", "unit", "phase", "train_slice", *results.slices])
    )
    summaries = {split: summarize(results, split) for split in results.eval}
    atomic_write_json(
        paths["summary.json"],
        {
            "run": results.run,
            "strategy": results.strategy,
            "slices": results.slices,
            "phases_done": len(results.phases),
            "reported_split": report_split(results),
            "splits": summaries,
            "definitions": DEFINITIONS,
        },
    )
    shown = summaries[report_split(results)]
    title = f"{results.run} ({results.strategy}), {shown['split']} split"
    plots.heatmap(paths["heatmap.png"], shown["slices"], shown["matrix_bpb"], shown["before_bpb"], title)
    plots.curves(paths["curves.png"], shown["slices"], shown["matrix_bpb"], shown["before_bpb"], title)
    return paths
