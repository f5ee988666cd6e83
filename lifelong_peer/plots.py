"""The run's plots (heatmap, curves) and the report's scatter, as PNG files.

Uses matplotlib's object API (``Figure`` + the Agg canvas), never ``pyplot``: no global state, no
window, safe on a headless machine and inside tests.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .checkpoint import atomic_write


def _save(fig: Figure, path: str | Path) -> Path:
    FigureCanvasAgg(fig)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))
    return Path(path)


def _phase_labels(slices: list[str], phases: int) -> list[str]:
    return ["base", *(f"{i}: {slices[i]}" for i in range(phases))]


def heatmap(path: str | Path, slices: list[str], matrix: list[list[float]], before: list[float], title: str) -> Path:
    """Bits per byte, rows = base model + one per phase, columns = eval slices.

    Each cell below the diagonal also shows L[i][j] − L[j][j], its change since the phase that
    trained slice j (positive = forgot); the diagonal cells are outlined.
    """
    L = np.array([before, *matrix], dtype=float)  # (1 + P, S): row 0 is the base model
    rows, cols = L.shape
    fig = Figure(figsize=(1.6 + 1.15 * cols, 1.2 + 0.55 * rows))
    ax = fig.add_subplot()
    # colours span the trained phases: an untrained base model (≈ 8 bpb) would wash out the
    # differences that matter; its row saturates but keeps its numbers
    vmin, vmax = _range(L)
    image = ax.imshow(L, cmap="RdYlGn_r", aspect="auto", vmin=vmin, vmax=vmax)
    fig.colorbar(image, ax=ax, label="bits per byte (lower is better)")
    ax.set_xticks(range(cols), slices, rotation=30, ha="right")
    ax.set_yticks(range(rows), _phase_labels(slices, rows - 1))
    ax.set_xlabel("evaluated slice")
    ax.set_ylabel("after phase (trained slice)")
    ax.set_title(title)
    for r in range(rows):
        i = r - 1  # phase index of this row
        for j in range(cols):
            text = f"{L[r, j]:.3f}" if np.isfinite(L[r, j]) else "—"
            if 0 <= j < i and np.isfinite(L[r, j] - L[j + 1, j]):
                text += f"\n{L[r, j] - L[j + 1, j]:+.3f}"
            ax.text(j, r, text, ha="center", va="center", fontsize=7, color="black")
        if 0 <= i < cols:
            ax.add_patch(_outline(i, r))
    return _save(fig, path)


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


def forgetting_scatter(path: str | Path, rows: list[dict], title: str) -> Path:
    """One point per run: average forgetting (x) against the newest slice's final bpb (y), by strategy.

    rows: dicts with run, strategy, avg_forgetting_bpb (None for one-phase runs, left out) and newest_bpb.
    Lower left is better: little forgetting and a well-learned newest slice.
    """
    fig = Figure(figsize=(6.0, 4.5))
    ax = fig.add_subplot()
    shown = [r for r in rows if r["avg_forgetting_bpb"] is not None and r["newest_bpb"] is not None]
    strategies = list(dict.fromkeys(r["strategy"] for r in shown))
    for s in strategies:
        points = [r for r in shown if r["strategy"] == s]
        ax.scatter([r["avg_forgetting_bpb"] for r in points], [r["newest_bpb"] for r in points], label=s)
        for r in points:
            ax.annotate(
                r["run"],
                (r["avg_forgetting_bpb"], r["newest_bpb"]),
                fontsize=7,
                xytext=(3, 3),
                textcoords="offset points",
            )
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
    ax.set_ylabel("newest slice after the last phase, bits per byte")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if strategies:
        ax.legend(title="strategy", fontsize=8)
    return _save(fig, path)
