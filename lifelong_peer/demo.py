"""The one-command demo (issue 7): State of the Union eras, naive vs lifelong, forgetting side by side.

It starts from the small base model the project trains with ``scripts/train_base.py`` and ships in
``lifelong_peer/assets/`` (continual learning continues a trained model; from scratch nothing looks
forgotten — RESEARCH.md), ingests the shipped corpus, runs each strategy over the six eras, and writes
a comparison report with the runs' heatmaps on one colour scale.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError

BASE_CHECKPOINT = Path(__file__).parent / "assets" / "sotu-base.safetensors"


@dataclass
class DemoConfig:
    """The demo's size: small enough for under five minutes on a 2-core laptop CPU."""

    out: Path = Path("lpeer-demo")
    """Workspace folder the demo creates (or reuses) and writes its runs and report into."""
    strategies: tuple[str, ...] = ("naive", "lifelong")
    """Strategies to compare."""
    steps: int = 40
    """Optimizer steps per era."""
    batch_size: int = 16
    """Windows per step."""
    lr: float = 1e-3
    """Peak learning rate (a fresh optimizer, warm-up and cosine decay each era)."""
    eval_tokens: int = 4096
    """Held-out tokens scored per era and split."""
    seed: int = 0
    """Seed of every random choice."""
    base: Path = BASE_CHECKPOINT
    """Base model checkpoint to continue."""


def run_demo(config: DemoConfig, progress: Callable[[dict], None] | None = None) -> dict:
    """Ingest the default stream, run every strategy from the base, compare; returns the comparison."""
    from .report import compare_runs, write_report
    from .run import locked_run, new_run
    from .streams import ingest_default
    from .train import run_phases
    from .workspace import Workspace

    if not config.base.exists():
        raise UserError(f"base checkpoint {config.base} is missing; train it with `python scripts/train_base.py`")
    out = Path(config.out)
    ws = Workspace.open(out) if (out / "workspace.json").exists() else Workspace.init(out)
    emit = progress or (lambda event: None)
    results = []
    ingest_default(ws, "sotu")
    for strategy in config.strategies:
        run_id = f"demo-{strategy}-s{config.seed}"
        emit({"event": "run_start", "run": run_id, "strategy": strategy})
        if not ws.run_dir(run_id).exists():  # else finish (or just re-read) an earlier demo's run
            overrides = {
                "steps": config.steps,
                "batch_size": config.batch_size,
                "lr": config.lr,
                "eval_tokens": config.eval_tokens,
                "usage_tokens": config.eval_tokens,
                "seed": config.seed,
            }
            new_run(ws, "sotu", strategy, overrides, base=str(config.base), run_id=run_id)
        with locked_run(ws, run_id) as run:  # each run while it trains (issue 25)
            results.append(run_phases(run, progress=emit))
    comparison = compare_runs(results, "test", [ws.run_dir(r.run) for r in results])
    files = write_report(out / "report", comparison, results)
    comparison["files"] = {
        "report": {k: str(v) for k, v in files.items()},
        # the report's heatmaps: one colour scale for both runs (each run's own heatmap.png has its own)
        "heatmaps": [str(files["heatmaps"] / f"{r.run}.png") for r in results],
        "workspace": str(ws.root),
    }
    return comparison
