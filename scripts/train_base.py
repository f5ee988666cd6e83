"""Train the small base model that ships with lifelong-peer (``lifelong_peer/assets/sotu-base.safetensors``).

Continual learning is about continuing a trained model (issue 4): from scratch, a byte-level model
is still learning English in every phase and nothing looks forgotten. This script trains the base
that the demo and the published results start from: the default model on a shuffled mix of all six
State of the Union eras' training splits (held-out splits untouched).

    python scripts/train_base.py [--steps 800] [--out lifelong_peer/assets/sotu-base.safetensors]
    python scripts/train_base.py --num-subkeys 128 --out sotu-base-128.safetensors   # a start-big base (issue 24)
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from lifelong_peer.run import new_run
from lifelong_peer.streams import ingest, ingest_default
from lifelong_peer.train import run_phases
from lifelong_peer.workspace import Workspace

DEFAULT_MODEL = {"peer_blocks": "all", "peer": {"num_subkeys": 32, "heads": 4, "topk": 8, "dim_key": 64}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument(
        "--base-data",
        choices=("first", "mix"),
        default="first",
        help="first: the first era's training split only (headroom for the later eras, issue 16); mix: all eras",
    )
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(Path(__file__).parents[1] / "lifelong_peer/assets/sotu-base.safetensors"))
    parser.add_argument(
        "--num-subkeys",
        type=int,
        default=DEFAULT_MODEL["peer"]["num_subkeys"],
        help="sub-keys per half n (n² experts per layer): the memory budget of a start-big base (issue 24)",
    )
    parser.add_argument("--source", default=None, help="another stream: a file `lpeer ingest` reads (default: SOTU)")
    parser.add_argument("--slice", default=None, help="with --source: its slicing (e.g. eras:2019,2021)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ws = Workspace.init(Path(tmp) / "ws")
        if args.source:
            ingest(ws, args.source, "stream", slice=args.slice)
        else:
            ingest_default(ws, "stream")
        run = new_run(
            ws,
            "stream",
            "naive",
            {
                "base_steps": args.steps,
                "base_data": args.base_data,
                "base_lr": args.lr,
                "seed": args.seed,
                "eval_tokens": 8192,
            },
            {**DEFAULT_MODEL, "peer": {**DEFAULT_MODEL["peer"], "num_subkeys": args.num_subkeys}},
            run_id="base",
        )
        start = time.time()

        def progress(event: dict) -> None:
            if event["event"] == "step" and event["step"] % 100 == 0:
                print(f"step {event['step']:5d}  loss {event['loss']:.3f}  {time.time() - start:.0f} s", flush=True)

        results = run_phases(run, phases=[], progress=progress)
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(run.checkpoints / "base.safetensors", out)
        before = results.eval["validation"].before
        print(json.dumps({"out": str(out), "seconds": round(time.time() - start), "validation_bpb": before.bpb}))


if __name__ == "__main__":
    main()
