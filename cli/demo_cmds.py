"""``lpeer demo``: the shipped corpus, naive vs lifelong, forgetting side by side."""

from __future__ import annotations

from pathlib import Path

import typer

from lifelong_peer import advice

from .options import FormatOpt, QuietOpt
from .output import Format, emit, stdout
from .run_cmds import _progress_display


def demo(
    out: Path = typer.Option(
        Path("lpeer-demo"), "--workspace", "-w", "--out", help="Workspace folder for the demo's runs and report."
    ),
    steps: int = typer.Option(40, help="Optimizer steps per era."),
    seed: int = typer.Option(0, help="Seed of every random choice."),
    eval_tokens: int = typer.Option(4096, help="Held-out tokens scored per era and split."),
    fmt: Format = FormatOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Run naive and lifelong over the six State of the Union eras from the shipped base; compare forgetting.

    Example: lpeer demo --out lpeer-demo
    """
    from lifelong_peer.demo import DemoConfig, run_demo
    from lifelong_peer.errors import UserError

    for name, value in (("--steps", steps), ("--eval-tokens", eval_tokens)):
        if value <= 0:
            raise UserError(f"{name} must be positive, got {value}")
    config = DemoConfig(out=out, steps=steps, seed=seed, eval_tokens=eval_tokens)
    with _progress_display(quiet or fmt == Format.json) as on_event:
        comparison = run_demo(config, progress=on_event)

    def human(c: dict) -> None:
        from .eval_cmds import _render_report

        c = {**c, "files": c["files"]["report"]}
        _render_report(c)
        stdout.print(f"heatmaps: {', '.join(comparison['files']['heatmaps'])}")
        try_next = advice.command(advice.EVAL, out, run=f"demo-lifelong-s{seed}")
        stdout.print(f"workspace: {comparison['files']['workspace']} (try: {try_next})")

    emit(comparison, fmt, human)


def register(app: typer.Typer) -> None:
    app.command()(demo)
