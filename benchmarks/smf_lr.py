"""The expert learning rate of the ``smf`` preset, chosen on validation (issue 16, part 4).

Sparse memory finetuning trains only the selected experts' tables, at a high rate (Lin et al. 2025 use
SGD at 2–5; PKM values are trained faster than the rest). Every run continues the same base for
``--steps`` steps per era on the SOTU stream with the ``smf`` preset and one ``expert_lr``; the table
shows the validation final average, the gain over the base, forgetting and the newest era (choose on
these), and the same on test (report only).

    python benchmarks/smf_lr.py                       # shipped base, 40 steps per era, 3 rates
    python benchmarks/smf_lr.py --base B --base-data first --lrs 0.01,0.03,0.1
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

from lifelong_peer import system
from lifelong_peer.demo import BASE_CHECKPOINT
from lifelong_peer.metrics import summarize
from lifelong_peer.run import new_run
from lifelong_peer.streams import ingest_default
from lifelong_peer.train import run_phases
from lifelong_peer.workspace import Workspace

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "smf_lr.json"


def summary(results, split: str) -> dict:
    s = summarize(results, split)
    before, weights = s["before_bpb"], s["eval_bytes"]
    base = sum(b * w for b, w in zip(before, weights, strict=True)) / sum(weights)
    return {
        "base_avg": base,
        "final_avg": s["final_avg_bpb"],
        "gain": base - s["final_avg_bpb"],
        "forgetting": s["avg_forgetting_bpb"],
        "newest": s["newest_bpb"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default=str(BASE_CHECKPOINT))
    parser.add_argument("--base-data", default="mix", help="what the base saw: mix or first (SMF's background)")
    parser.add_argument("--lrs", default="0.003,0.01,0.03,0.1")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default="/tmp/smf-lr-ws")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    shutil.rmtree(args.work, ignore_errors=True)
    ws = Workspace.init(args.work)
    ingest_default(ws, "sotu")
    common = {"steps": args.steps, "batch_size": 16, "lr": 1e-3, "eval_tokens": 4096, "usage_tokens": 4096}
    rows = []
    for lr in [float(v) for v in args.lrs.split(",")]:
        t0 = time.time()
        over = {**common, "seed": args.seed, "expert_lr": lr, "base_data": args.base_data}
        run = new_run(ws, "sotu", "smf", over, base=args.base, run_id=f"smf-lr{lr:g}")
        results = run_phases(run)
        row = {"expert_lr": lr, "validation": summary(results, "validation"), "test": summary(results, "test")}
        row["seconds"] = time.time() - t0
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    print(f"smf, {args.steps} steps per era, base {Path(args.base).name} ({args.base_data}); bits per byte")
    print(
        f"{'expert_lr':>9} | {'val final':>9} {'val gain':>9} {'val forget':>10} {'val newest':>10} | {'test final':>10} {'test gain':>9}"
    )
    for r in rows:
        v, t = r["validation"], r["test"]
        print(
            f"{r['expert_lr']:9g} | {v['final_avg']:9.4f} {v['gain']:9.4f} {v['forgetting']:10.4f} {v['newest']:10.4f} | "
            f"{t['final_avg']:10.4f} {t['gain']:9.4f}"
        )
    meta = {"command": "python benchmarks/smf_lr.py " + " ".join(sys.argv[1:]), "rows": rows}
    meta["machine"] = system.machine()  # issue 25
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(meta, indent=2))


if __name__ == "__main__":
    main()
