"""The README's demo paragraph, from a results file (issue 25): runs ``lpeer demo`` (naive and lifelong over the
six State of the Union eras from the shipped base) and writes its comparison, with the machine it ran on, to
``benchmarks/results/demo.json``; ``tests/test_readme_numbers.py`` checks the README's paragraph against it.

    python benchmarks/demo.py --docs          # also copies the report's two heatmaps to docs/
    LPEER_NATIVE=0 python benchmarks/demo.py --out benchmarks/results/demo-pure-pytorch.json  # another build

Prints the per-run table; the JSON keeps the report's rows, per-strategy means and summary.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import time
from pathlib import Path

from lifelong_peer import kernels
from lifelong_peer.demo import DemoConfig, run_demo
from lifelong_peer.files import atomic_write_json
from lifelong_peer.report import markdown
from lifelong_peer.system import machine

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "demo.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("lpeer-demo-bench"), help="workspace (made fresh)")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--docs", action="store_true", help="copy the report's heatmaps to docs/heatmap-*.png")
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="keep the finished runs already in --work and train only the missing ones (after a preset changed: "
        "delete that strategy's run directory first)",
    )
    args = parser.parse_args()
    if not args.reuse:
        shutil.rmtree(args.work, ignore_errors=True)  # a finished earlier demo would be re-read, not re-run
    config = DemoConfig(out=args.work)
    started = time.time()
    comparison = run_demo(config)
    record = {
        "command": " ".join(
            [*(["LPEER_NATIVE=0"] if not kernels.enabled() else []), "python benchmarks/demo.py", *sys.argv[1:]]
        ),
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(config).items()},
        "seconds": time.time() - started,
        "comparison": {k: comparison[k] for k in ("split", "slices", "runs", "strategies", "summary")},
    }
    atomic_write_json(args.out, record)
    print(markdown(comparison))
    print(f"wrote {args.out}")
    if args.docs:
        for strategy in config.strategies:
            source = Path(comparison["files"]["report"]["heatmaps"]) / f"demo-{strategy}-s{config.seed}.png"
            shutil.copyfile(source, ROOT / "docs" / f"heatmap-{strategy}.png")


if __name__ == "__main__":
    main()
