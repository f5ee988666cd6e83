"""A small resumable sweep over strategy settings on the SOTU headroom protocol (issue 16).

Every run continues the same base (``--base``, by default the shipped first-era base) for ``--steps``
steps per era; its validation and test metrics are appended to ``--out`` (a JSON list) as soon as it
finishes, so a crash loses at most the runs in flight. Choices are made on the validation numbers;
test numbers are recorded only so that the final table can be traced back, never to choose.

The plan is a JSON file of ``{"name": ..., "strategy": ..., "overrides": {...}, "seeds": [...]}``
entries (optionally ``"stream"``, with ``"source"`` and ``"slice"`` for a stream other than SOTU, and
``"base"``), re-read before each run: entries can be appended while workers run. Several workers may
share one plan and one output file (claims and appends are serialised by a lock file):

    python benchmarks/sweep.py --plan benchmarks/results/sweep16-plan.json &
    python benchmarks/sweep.py --plan benchmarks/results/sweep16-plan.json &

A run is identified by (name, seed); finished ones are skipped. ``--release`` forgets the claims
of runs that never finished (after a crash).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
COMMON = {"steps": 80, "batch_size": 16, "lr": 1e-3, "eval_tokens": 4096, "usage_tokens": 4096}


@contextlib.contextmanager
def locked(path: Path):
    with open(path.with_suffix(".lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def read_json(path: Path, default):
    return json.loads(path.read_text()) if path.exists() else default


def write_json(path: Path, data) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def split_metrics(results, split: str) -> dict:
    """What a choice needs from one split: base/final averages, gain, forgetting, newest, and how much
    each phase lowered its own era's loss (L[j−1][j] − L[j][j], the base for j = 0)."""
    from lifelong_peer.metrics import summarize

    s = summarize(results, split)
    L = np.array(s["matrix_bpb"])
    before = np.array(s["before_bpb"])
    w = np.array(s["eval_bytes"], dtype=float)
    P = len(L)
    base_avg = float((before[:P] * w[:P]).sum() / w[:P].sum())
    prev = np.array([before[0]] + [L[j - 1, j] for j in range(1, P)])
    own = prev - np.diag(L)[:P]
    return {
        "final_avg": s["final_avg_bpb"],
        "base_avg": base_avg,
        "gain": base_avg - s["final_avg_bpb"],
        "forgetting": s["avg_forgetting_bpb"],
        "newest": s["newest_bpb"],
        "own_gain": own.tolist(),
        "matrix": L.tolist(),
        "before": before.tolist(),
    }


def phase_cost(metrics: Path, results, disk: list[int], layers: int) -> list[dict]:
    """Per phase (issue 24): median ms per training step (from metrics.jsonl's tokens/s at the batch size),
    experts (in all and per PEER layer), parameters, active parameters per token, and the run directory's bytes
    after the phase."""
    steps: dict[int, list[float]] = {}
    for line in metrics.read_text().splitlines():
        rec = json.loads(line)
        steps.setdefault(rec["phase"], []).append(rec["tok_s"])
    out = []
    for i, p in enumerate(results.phases):
        tok_s = steps.get(i, [])
        tokens = p.train_tokens / max(1, len(tok_s))
        out.append(
            {
                "ms_per_step": float(np.median([1000 * tokens / t for t in tok_s])) if tok_s else None,
                "experts": p.num_experts,
                "experts_per_layer": p.num_experts // max(1, layers),
                "params": p.params,
                "active_params": p.active_params,
                "run_bytes": disk[i] if i < len(disk) else None,
            }
        )
    return out


def train_fields(train) -> dict:
    """A TrainConfig as the JSON a record keeps, the seed and the strategy's name aside."""
    import dataclasses

    return {k: v for k, v in dataclasses.asdict(train).items() if k not in ("seed", "strategy")}


def run_one(ws, entry: dict, seed: int, base: str, steps: int) -> dict:
    from lifelong_peer.run import new_run
    from lifelong_peer.train import run_phases

    overrides = {**COMMON, "steps": steps, **entry.get("overrides", {}), "seed": seed}
    t0 = time.time()
    run_id = f"{entry['name']}-s{seed}"
    shutil.rmtree(ws.run_dir(run_id), ignore_errors=True)
    run = new_run(ws, entry.get("stream", "sotu"), entry["strategy"], overrides, base=base, run_id=run_id)
    disk = []  # issue 24: the run directory's bytes after each phase (checkpoints pruned or kept)

    def on_event(event: dict) -> None:
        if event["event"] == "phase_end":
            disk.append(sum(f.stat().st_size for f in run.dir.rglob("*") if f.is_file()))

    results = run_phases(run, progress=on_event)
    record = {
        "name": entry["name"],
        "seed": seed,
        "strategy": entry["strategy"],
        "overrides": entry.get("overrides", {}),
        "base": base,
        "steps": steps,
        "train": train_fields(run.config.train),  # what it trained with: continual.py spots stale records
        "wall_s": round(time.time() - t0, 1),
        "validation": split_metrics(results, "validation"),
        "test": split_metrics(results, "test"),
        "phase_extra": [p.extra for p in results.phases],
        "phase_cost": phase_cost(run.dir / "metrics.jsonl", results, disk, len(run.model.peer_layers())),
        "results": results.to_dict(),  # the run's whole results.json: tables are rebuilt from it
    }
    shutil.rmtree(run.dir, ignore_errors=True)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plan", required=True)
    parser.add_argument("--out", default=None, help="default: the plan's name with -plan → -results")
    parser.add_argument("--base", default=str(ROOT / "lifelong_peer/assets/sotu-base.safetensors"))
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--work", default="/tmp/lpeer-sweep")
    parser.add_argument("--release", action="store_true", help="drop claims of unfinished runs, then exit")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    plan = Path(args.plan)
    out = Path(args.out) if args.out else plan.with_name(plan.name.replace("-plan", "-results"))
    claims = out.with_suffix(".claims")
    if args.release:
        with locked(out):
            write_json(claims, [])
        return
    from lifelong_peer.streams import ingest, ingest_default
    from lifelong_peer.workspace import Workspace

    ws_dir = Path(args.work) / f"worker-{os.getpid()}"
    shutil.rmtree(ws_dir, ignore_errors=True)
    ws = Workspace.init(ws_dir)
    ingested = set()
    while True:
        with locked(out):
            done = {(r["name"], r["seed"]) for r in read_json(out, [])}
            taken = {tuple(c) for c in read_json(claims, [])}
            todo = [
                (e, s) for e in read_json(plan, []) for s in e.get("seeds", [0]) if (e["name"], s) not in done | taken
            ]
            if not todo:
                shutil.rmtree(ws_dir, ignore_errors=True)
                return
            entry, seed = todo[0]
            write_json(claims, [*map(list, taken), [entry["name"], seed]])
        print(f"{time.strftime('%H:%M:%S')} start {entry['name']} seed {seed}", flush=True)
        stream = entry.get("stream", "sotu")
        if stream not in ingested:  # a stream of the plan's own (source, slice), or the default SOTU eras
            if entry.get("source"):
                ingest(ws, entry["source"], stream, slice=entry["slice"])
            else:  # the shipped SOTU addresses, in six eras or in the entry's slicing (a long stream, issue 24)
                ingest_default(ws, stream, **({"slice": entry["slice"]} if entry.get("slice") else {}))
            ingested.add(stream)
        record = run_one(ws, entry, seed, entry.get("base", args.base), args.steps)
        with locked(out):
            write_json(out, [*read_json(out, []), record])
            write_json(claims, [c for c in read_json(claims, []) if tuple(c) != (entry["name"], seed)])
        v = record["validation"]
        print(
            f"{time.strftime('%H:%M:%S')} done {entry['name']} s{seed}: val final {v['final_avg']:.4f} "
            f"gain {v['gain']:.4f} forg {v['forgetting']:+.4f} newest {v['newest']:.4f} "
            f"own {' '.join(f'{x:+.3f}' for x in v['own_gain'])} ({record['wall_s']:.0f} s)",
            flush=True,
        )


if __name__ == "__main__":
    main()
