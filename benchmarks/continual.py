"""Published results (issue 6): every strategy on the State of the Union eras, several seeds, → RESULTS.md.

All strategies continue the same shipped base (``lifelong_peer/assets/sotu-base.safetensors``;
``dense`` continues a dense base trained here with the same recipe) for the same number of steps
and tokens per era, and are evaluated on the eras' test splits. Also a small-scale check of the
paper's Fig. 3a: with h·k fixed, more experts should give lower bits per byte.

    python benchmarks/continual.py                 # the full table (~30-50 min on 2 cores)
    python benchmarks/continual.py --quick         # a smoke run: 2 strategies, 1 seed, few steps

Writes benchmarks/results/continual.json and RESULTS.md (with the command that reproduced it).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from pathlib import Path

import torch

from lifelong_peer.demo import BASE_CHECKPOINT
from lifelong_peer.metrics import load_results
from lifelong_peer.report import compare_runs, markdown
from lifelong_peer.run import new_run
from lifelong_peer.streams import ingest_default
from lifelong_peer.train import run_phases
from lifelong_peer.workspace import Workspace

ROOT = Path(__file__).resolve().parents[1]
STRATEGIES = ("naive", "lifelong", "replay", "ewc", "smf", "dense", "joint")


def dense_base(ws: Workspace, steps: int, cache: Path) -> Path:
    """A dense-FFN base trained like the shipped PEER base (scripts/train_base.py), cached."""
    if cache.exists():
        return cache
    run = new_run(ws, "sotu", "dense", {"base_steps": steps, "base_lr": 3e-3, "eval_tokens": 4096}, run_id="dense-base")
    run_phases(run, phases=[])
    cache.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(run.checkpoints / "base.safetensors", cache)
    return cache


def fig3a(ws: Workspace, steps: int, seeds: list[int], sizes: tuple[int, ...] = (32, 64, 128, 256)) -> list[dict]:
    """Models trained from scratch on the mix of eras with h·k = 32 fixed and N = n² growing."""
    rows = []
    for n in sizes:
        for seed in seeds:
            run = new_run(
                ws,
                "sotu",
                "naive",
                {"base_steps": steps, "base_lr": 3e-3, "seed": seed, "eval_tokens": 8192},
                {"peer_blocks": "all", "peer": {"num_subkeys": n, "heads": 4, "topk": 8, "dim_key": 64}},
                run_id=f"fig3a-n{n}-s{seed}",
            )
            results = run_phases(run, phases=[])
            before = results.eval["test"].before
            bpb = sum(b * w for b, w in zip(before.bpb, before.bytes, strict=True)) / sum(before.bytes)
            rows.append({"experts": n * n, "seed": seed, "steps": steps, "test_bpb": bpb})
            print(f"fig3a N={n * n:6d} seed {seed}: test bpb {bpb:.4f}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40, help="steps per era (the demo's size)")
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--fig3a-steps", type=int, default=300, help="0: skip the Fig. 3a check")
    parser.add_argument("--fig3a-seeds", type=int, default=1)
    parser.add_argument("--fig3a-sizes", default="32,64,128,256", help="sub-keys per half n (N = n²)")
    parser.add_argument("--fig3a-only", action="store_true", help="skip the strategies; only the Fig. 3a check")
    parser.add_argument("--base-steps", type=int, default=1500, help="steps of the dense base (as the shipped base)")
    parser.add_argument("--quick", action="store_true", help="smoke run: naive+lifelong, 1 seed, 5 steps")
    parser.add_argument("--work", default=str(ROOT / "benchmarks/results/continual-ws"))
    parser.add_argument(
        "--merge",
        default=None,
        help="comma-separated workspaces of earlier (parallel) invocations: only write RESULTS.md",
    )
    parser.add_argument("--out", default=str(ROOT / "RESULTS.md"))
    args = parser.parse_args()
    if args.merge:
        write_results([Path(w) for w in args.merge.split(",")], Path(args.out))
        return
    strategies = [] if args.fig3a_only else ["naive", "lifelong"] if args.quick else args.strategies.split(",")
    seeds = [0] if args.quick else list(range(args.seeds))
    steps = 5 if args.quick else args.steps
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    ws = Workspace.init(work)
    ingest_default(ws, "sotu")
    start = time.time()
    common = {"steps": steps, "batch_size": 16, "lr": 1e-3, "eval_tokens": 4096, "usage_tokens": 4096}
    for strategy in strategies:
        base = BASE_CHECKPOINT
        if strategy == "dense":
            base = dense_base(ws, 50 if args.quick else args.base_steps, work / "sotu-dense-base.safetensors")
        for seed in seeds:
            t0 = time.time()
            run = new_run(ws, "sotu", strategy, {**common, "seed": seed}, base=str(base), run_id=f"{strategy}-s{seed}")
            run_phases(run)
            print(f"{strategy} seed {seed}: {time.time() - t0:.0f} s", flush=True)
    sizes = tuple(int(n) for n in args.fig3a_sizes.split(","))
    fig = (
        [] if args.quick or not args.fig3a_steps else fig3a(ws, args.fig3a_steps, list(range(args.fig3a_seeds)), sizes)
    )
    command = "python benchmarks/continual.py " + " ".join(sys.argv[1:])
    machine = f"{platform.machine()}, {torch.get_num_threads()} thread(s), torch {torch.__version__}"
    meta = {"command": command, "machine": machine, "seconds": time.time() - start, "fig3a": fig}
    (work / "continual.json").write_text(json.dumps(meta, indent=2))
    if strategies:  # a --fig3a-only invocation is merged into RESULTS.md with --merge
        write_results([work], Path(args.out))


def write_results(workspaces: list[Path], out: Path) -> None:
    """RESULTS.md and benchmarks/results/continual.json from the runs of one or more workspaces."""
    runs, metas = [], []
    for work in workspaces:
        metas.append(json.loads((work / "continual.json").read_text()))
        for run_dir in sorted((work / "runs").iterdir()):
            if (run_dir / "results.json").exists() and not run_dir.name.startswith(("fig3a", "dense-base")):
                runs.append(load_results(run_dir))
    order = {s: i for i, s in enumerate(STRATEGIES)}
    runs.sort(key=lambda r: (order.get(r.strategy, 99), r.run))
    comparison = compare_runs(runs, "test")  # UserError when no workspace holds strategy runs
    fig = [row for m in metas for row in m["fig3a"]]
    minutes = sum(m["seconds"] for m in metas) / 60
    commands = "; ".join(f"`{m['command'].strip()}`" for m in metas)
    (ROOT / "benchmarks/results/continual.json").write_text(
        json.dumps({"invocations": metas, "comparison": comparison}, indent=2, default=str)
    )
    lines = [
        "# Results: forgetting on the State of the Union eras",
        "",
        f"Generated by {commands} (CPU time {minutes:.0f} min in all, on {metas[0]['machine']}),",
        "then `python benchmarks/continual.py --merge " + ",".join(str(w) for w in workspaces) + "`.",
        "",
        "Every strategy continues the same base (`lifelong_peer/assets/sotu-base.safetensors`; `dense`: a dense",
        "base trained with the same recipe) for the same steps and tokens per era (40 steps × 16 × 256 bytes).",
        "Numbers are bits per byte on the eras' **test** splits, token-weighted where averaged over eras,",
        "mean ± std over seeds. Forgetting: mean over earlier eras of (final − best), positive = forgot;",
        "BWT: negative = forgot; FWT: against the base model, positive = earlier eras helped.",
        "",
        markdown(comparison),
    ]
    if fig:
        lines += ["", "## Fig. 3a at small scale: more experts at fixed h·k = 32", ""]
        lines += ["Trained from scratch on the mix of eras; test bits per byte (token-weighted over eras).", ""]
        lines += ["| experts | training steps | seed | test bpb |", "|---:|---:|---:|---:|"]
        fig.sort(key=lambda r: (r.get("steps", 0), r["experts"], r["seed"]))
        lines += [f"| {r['experts']:,} | {r.get('steps', 300)} | {r['seed']} | {r['test_bpb']:.4f} |" for r in fig]
    out.write_text("\n".join(lines) + "\n")
    print(markdown(comparison))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
