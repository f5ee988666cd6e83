"""The run's plots (heatmap, curves) and the report's scatter, as PNG files.

Uses matplotlib's object API (``Figure`` + the Agg canvas), never ``pyplot``: no global state, no
window, safe on a headless machine and inside tests.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .files import atomic_write


def _save(fig: Figure, path: str | Path) -> Path:
    FigureCanvasAgg(fig)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))
    return Path(path)


def _phase_labels(slices: list[str], phases: int) -> list[str]:
    return ["base", *(f"{i}: {slices[i]}" for i in range(phases))]


@dataclass(frozen=True)
class Scale:
    """Colour limits of a heatmap; runs compared side by side share one (issue 17)."""

    bpb: tuple[float, float]
    """bits per byte at the two ends of the absolute colour map"""
    change: float
    """the change-since-trained map runs from −change to +change, centred at zero"""


def change_since_trained(matrix: list[list[float]]) -> np.ndarray:
    """(P, S) losses after each phase → (P, S) ``L[i][j] − L[j][j]`` for j ≤ i: how much worse (> 0,
    forgot) or better (< 0) slice j is than right after the phase that trained it; NaN for j > i."""
    L = np.asarray(matrix, dtype=float).reshape(len(matrix), -1)
    change = np.full(L.shape, np.nan)
    for i in range(L.shape[0]):
        for j in range(min(i + 1, L.shape[1])):
            change[i, j] = L[i, j] - L[j, j]
    return change


def shared_scale(runs: list[tuple[list[list[float]], list[float]]]) -> Scale:
    """One scale for several runs' (matrix, before): the union of their bpb ranges, the largest change."""
    ranges = [_range(np.array([before, *matrix], dtype=float)) for matrix, before in runs]
    changes = [np.abs(change_since_trained(matrix)) for matrix, _ in runs if len(matrix)]
    largest = max((float(np.nanmax(c, initial=0.0)) for c in changes), default=0.0)
    return Scale((min(r[0] for r in ranges), max(r[1] for r in ranges)), largest if largest > 0 else 0.01)


def heatmap(
    path: str | Path,
    slices: list[str],
    matrix: list[list[float]],
    before: list[float],
    title: str,
    scale: Scale | None = None,
) -> Path:
    """The run's heatmap PNG (``heatmap_figure``)."""
    return _save(heatmap_figure(slices, matrix, before, title, scale), path)


def heatmap_figure(
    slices: list[str], matrix: list[list[float]], before: list[float], title: str, scale: Scale | None = None
) -> Figure:
    """Two panels: bits per byte (rows = base model + one per phase, columns = eval slices), and the
    forgetting view: each slice's change since the phase that trained it, on a diverging map centred
    at zero (red = forgot, blue = improved), which absolute colours hide (issue 17). The diagonal
    (each slice right after its own phase) is outlined. ``scale``: shared colour limits (default:
    this run's own range).
    """
    L = np.array([before, *matrix], dtype=float)  # (1 + P, S): row 0 is the base model
    rows, cols = L.shape
    scale = scale or shared_scale([(matrix, before)])
    fig = Figure(figsize=(2 * (1.6 + 1.15 * cols) + 1.0, 1.2 + 0.55 * rows), layout="constrained")
    ax, ax_change = fig.subplots(1, 2)
    # colours span the trained phases: an untrained base model (≈ 8 bpb) would wash out the
    # differences that matter; its row saturates but keeps its numbers
    image = ax.imshow(L, cmap="RdYlGn_r", aspect="auto", vmin=scale.bpb[0], vmax=scale.bpb[1])
    fig.colorbar(image, ax=ax, label="bits per byte (lower is better)")
    for r in range(rows):
        for j in range(cols):
            ax.text(j, r, f"{L[r, j]:.3f}" if np.isfinite(L[r, j]) else "—", ha="center", va="center", fontsize=7)
        if 0 <= r - 1 < cols:
            ax.add_patch(_outline(r - 1, r))
    _label(ax, slices, _phase_labels(slices, rows - 1), "bits per byte")

    if not len(matrix):
        ax_change.axis("off")
        ax_change.text(0.5, 0.5, "forgetting: no phase has finished yet", ha="center", transform=ax_change.transAxes)
    else:
        _change_panel(fig, ax_change, slices, change_since_trained(matrix), scale.change)
    fig.suptitle(title)
    return fig


def _change_panel(fig: Figure, ax, slices: list[str], change: np.ndarray, limit: float) -> None:
    """change (P, S), NaN above the diagonal, on a diverging map from −limit to +limit."""
    cmap = matplotlib.colormaps["RdBu_r"].with_extremes(bad="#eeeeee")  # grey: not trained yet
    image = ax.imshow(np.ma.masked_invalid(change), cmap=cmap, aspect="auto", vmin=-limit, vmax=limit)
    fig.colorbar(image, ax=ax, label="change since trained, bits per byte (> 0: forgot)")
    for i in range(change.shape[0]):
        for j in range(min(i + 1, change.shape[1])):
            value = change[i, j]
            text = f"{value:+.3f}" if np.isfinite(value) else "—"  # — : a slice without held-out text
            colour = "white" if abs(value) > 0.6 * limit else "black"  # white on the map's dark ends
            ax.text(j, i, text, ha="center", va="center", fontsize=7, color=colour)
        if i < change.shape[1]:
            ax.add_patch(_outline(i, i))
    _label(ax, slices, _phase_labels(slices, change.shape[0])[1:], "forgetting: change since the slice was trained")


def _label(ax, slices: list[str], rows: list[str], what: str) -> None:
    ax.set_xticks(range(len(slices)), slices, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel("evaluated slice")
    ax.set_ylabel("after phase (trained slice)")
    ax.set_title(what)


def _range(L: np.ndarray) -> tuple[float, float]:
    """Value range of the phase rows (L[1:]), or of the base row when no phase has finished."""
    shown = L[1:] if L.shape[0] > 1 and np.isfinite(L[1:]).any() else L
    if not np.isfinite(shown).any():
        return 0.0, 1.0
    return float(np.nanmin(shown)), float(np.nanmax(shown))


def _outline(x: int, y: int):
    from matplotlib.patches import Rectangle

    return Rectangle((x - 0.5, y - 0.5), 1, 1, fill=False, edgecolor="black", linewidth=1.5)


def curves(path: str | Path, slices: list[str], matrix: list[list[float]], before: list[float], title: str) -> Path:
    """Each slice's bits per byte across phases (x = 0 is the base model); a star where it was trained."""
    L = np.array([before, *matrix], dtype=float)
    fig = Figure(figsize=(max(5.0, 1.2 * L.shape[0] + 2.5), 4.0))
    ax = fig.add_subplot()
    x = np.arange(L.shape[0])
    for j, name in enumerate(slices):
        (line,) = ax.plot(x, L[:, j], marker="o", markersize=3, label=name)
        if j + 1 < L.shape[0]:
            ax.plot([j + 1], [L[j + 1, j]], marker="*", markersize=12, color=line.get_color())
    xlabel = "after phase (★ = the phase that trained the slice)"
    low, high = _range(L)
    if L.shape[0] > 1 and np.nanmax(L[0], initial=-np.inf) > high + (
        high - low
    ):  # keep the phases readable, as in heatmap()
        margin = 0.1 * (high - low) or 0.1
        ax.set_ylim(low - margin, high + 3 * margin)
        xlabel += f"\nbase model off scale: {np.nanmin(L[0]):.2f}–{np.nanmax(L[0]):.2f} bits per byte"
    ax.set_xticks(x, _phase_labels(slices, L.shape[0] - 1), rotation=30, ha="right")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("bits per byte (lower is better)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(title="evaluated slice", loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    return _save(fig, path)


def _strategy_key(strategy: str) -> tuple[int, str]:
    """The presets in their order, then other names alphabetically."""
    from .strategies import STRATEGIES

    names = list(STRATEGIES)
    return (names.index(strategy) if strategy in names else len(names), strategy)


def strategy_colour(strategy: str) -> tuple[float, float, float]:
    """A strategy's colour in every plot, whatever the order runs are given in (issue 17): the presets
    take tab10's colours in their order, then tab20's lighter ones; any other name one of the colours left, by a hash."""
    from .strategies import STRATEGIES

    palette = matplotlib.colormaps["tab10"].colors
    light = matplotlib.colormaps["tab20"].colors[1::2]  # tab10's colours, lighter: never a preset's
    names = list(STRATEGIES)
    if strategy in names:
        return (palette + light)[names.index(strategy) % (2 * len(palette))]
    spare = (palette + light)[len(names) :]
    return spare[int(hashlib.sha256(strategy.encode()).hexdigest()[:8], 16) % len(spare)]


def forgetting_scatter(path: str | Path, rows: list[dict], title: str, bases: list[dict] | None = None) -> Path:
    """The report's PNG (``forgetting_scatter_figure``)."""
    return _save(forgetting_scatter_figure(rows, title, bases), path)


def forgetting_scatter_figure(rows: list[dict], title: str, bases: list[dict] | None = None) -> Figure:
    """One point per run: average forgetting (x) against the newest slice's final bpb (y), by strategy.

    rows: dicts with run, strategy, avg_forgetting_bpb (None for one-phase runs, left out) and newest_bpb.
    Lower left is better: little forgetting and a well-learned newest slice. The scale is honest (issue 25:
    autoscaled to 0.0014 bpb, noise looked like a verdict): a dashed line marks each of ``bases`` (the
    untrained base's rows: its newest-slice bpb before any phase), so the axis spans what training changed,
    and a strategy with several runs gets error bars, its mean ± the sample std over runs.
    """
    fig = Figure(figsize=(6.0, 4.5))
    ax = fig.add_subplot()
    shown = [r for r in rows if r["avg_forgetting_bpb"] is not None and r["newest_bpb"] is not None]
    strategies = sorted({r["strategy"] for r in shown}, key=_strategy_key)  # one order, whatever the runs' order
    for s in strategies:
        points = [r for r in shown if r["strategy"] == s]
        x, y = [r["avg_forgetting_bpb"] for r in points], [r["newest_bpb"] for r in points]
        ax.scatter(x, y, label=s, color=strategy_colour(s))
        if len(points) > 1:  # the seed spread: a gap smaller than the bars is noise
            ax.errorbar(
                np.mean(x), np.mean(y), xerr=np.std(x, ddof=1), yerr=np.std(y, ddof=1), color=strategy_colour(s),
                capsize=4, marker="D", markersize=4, alpha=0.6,
            )  # fmt: skip
        for r in points:
            ax.annotate(
                r["run"],
                (r["avg_forgetting_bpb"], r["newest_bpb"]),
                fontsize=7,
                xytext=(3, 3),
                textcoords="offset points",
            )
    for b in [b for b in bases or [] if b.get("newest_bpb") is not None]:
        ax.axhline(b["newest_bpb"], color="grey", linestyle="--", linewidth=0.8)
        ax.annotate(f"{b['run']}: before training", (0.0, b["newest_bpb"]), fontsize=7, xytext=(3, 3),
                    textcoords="offset points", color="grey")  # fmt: skip
    if len(shown) < len(rows):
        left_out = ", ".join(r["run"] for r in rows if r not in shown)
        ax.text(
            0.01,
            0.01,
            f"not shown (one phase, or no newest-slice data): {left_out}",
            transform=ax.transAxes,
            fontsize=7,
        )
    ax.axvline(0.0, color="grey", linewidth=0.8)
    ax.set_xlabel("average forgetting, bits per byte (lower is better)")
    ax.set_ylabel("newest slice after the last phase, bits per byte (lower is better)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if strategies:
        ax.legend(title="strategy", fontsize=8)
    return fig


def cost_curves(path: str | Path, summaries: list[dict], title: str) -> Path:
    """What each phase costs beside what it scores (issue 24), one line per run, x = phase: the average bits
    per byte over the slices trained so far, experts (all PEER layers), active parameters per token and the
    median ms per training step. ``summaries``: ``metrics.summarize`` dicts with ``ms_per_step`` per phase."""
    fig = Figure(figsize=(12.0, 7.0))
    axes = fig.subplots(2, 2).flatten()
    panels = (
        ("avg_seen", "bits per byte, slices trained so far"),
        ("num_experts", "experts (all PEER layers)"),
        ("active_params", "active parameters per token"),
        ("ms_per_step", "ms per training step (median)"),
    )
    from .metrics import matrix_metrics

    for s in summaries:
        L = np.array(s["matrix_bpb"], dtype=float)
        seen = [matrix_metrics(L[: i + 1], s["before_bpb"], s["eval_bytes"]) for i in range(len(L))]
        values = {**s, "avg_seen": [m["final_avg"] for m in seen]}
        # the base on the same slices, dashed (issue 25): the scale shows what training changed, not noise
        base = [np.nan if m["base_avg"] is None else m["base_avg"] for m in seen]
        axes[0].plot(range(len(base)), base, linestyle="--", linewidth=0.8, color="grey")
        for ax, (key, _) in zip(axes, panels, strict=True):
            ys = [np.nan if v is None else v for v in values.get(key) or []]
            ax.plot(range(len(ys)), ys, marker="o", markersize=3, label=s["run"], color=strategy_colour(s["strategy"]))
    for i, (ax, (_, label)) in enumerate(zip(axes, panels, strict=True)):
        if not ax.lines or all(np.isnan(line.get_ydata()).all() for line in ax.lines):
            ax.text(0.5, 0.5, "not recorded (runs before issue 24)", ha="center", va="center", transform=ax.transAxes)
            ax.set_yticks([])
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("after phase")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if i:  # costs from zero, so that a 2% change does not look like a verdict
            ax.set_ylim(bottom=0)
    axes[0].plot([], [], linestyle="--", linewidth=0.8, color="grey", label="base (no training)")
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    return _save(fig, path)
