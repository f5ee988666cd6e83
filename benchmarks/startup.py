"""How long ``lpeer`` takes to answer commands that train nothing (issue 25, item 9).

Every command once took ~4 s, ``--help`` and ``lpeer streams`` too: the command line imported torch,
faiss and datasets before parsing its arguments. This script builds a tiny workspace (a stream and a
finished two-phase run), then times each command in a fresh process, as a user runs it: the median
of ``--repeats`` runs after one warm-up run (so the file cache is warm), with the modules of the big
three that each command imported. Target: under 1 s for ``--help``, ``streams`` and ``eval``.

Usage: python benchmarks/startup.py [--repeats 5] [--out benchmarks/results/startup.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HEAVY = ("torch", "faiss", "datasets")
# runs the command line in-process, then reports which of HEAVY it imported (on stderr's last line)
PROBE = (
    "import sys, json\n"
    "from lifelong_peer.cli.main import main\n"
    "sys.argv = ['lpeer', *sys.argv[1:]]\n"
    "try:\n"
    "    main()\n"
    "except SystemExit:\n"
    "    pass\n"
    f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)), file=sys.stderr)\n"
)


def make_workspace(root: Path) -> Path:
    """A workspace with stream ``toy`` (two yearly slices) and a finished run ``r`` on it."""
    import warnings

    from lifelong_peer.run import new_run
    from lifelong_peer.streams import ingest
    from lifelong_peer.train import run_phases
    from lifelong_peer.workspace import Workspace

    words = ["peer", "expert", "time", "slice", "model"]
    lines = [
        json.dumps({"text": " ".join(words[(i * 7 + j) % 5] for j in range(60)), "time": f"{y}-0{1 + i % 9}-01"})
        for y in (2001, 2002)
        for i in range(40)
    ]
    (root / "docs.jsonl").write_text("\n".join(lines) + "\n")
    ws = Workspace.init(root / "ws")
    ingest(ws, str(root / "docs.jsonl"), "toy", split=(0.6, 0.2, 0.2))
    model = {"dim": 32, "layers": 1, "heads": 2, "context": 32, "peer": {"num_subkeys": 4, "heads": 2, "topk": 2}}
    train = {"steps": 2, "batch_size": 2, "eval_tokens": 128, "usage_tokens": 128, "warmup": 1}
    with warnings.catch_warnings():  # "starts from a random init": the run only needs to exist
        warnings.simplefilter("ignore")
        run_phases(new_run(ws, "toy", "naive", train, model, run_id="r"))
    return root / "ws"


def time_command(args: list[str], workspace: Path, repeats: int) -> dict:
    env = {**os.environ, "LPEER_WORKSPACE": str(workspace)}
    seconds, imported = [], []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-c", PROBE, *args], env=env, capture_output=True, text=True, check=False
        )
        elapsed = time.perf_counter() - t0
        if done.returncode != 0 and "--help" not in args:
            raise SystemExit(f"lpeer {' '.join(args)} failed:\n{done.stderr}")
        imported = json.loads(done.stderr.strip().splitlines()[-1])
        if i:  # the first run warms the file cache
            seconds.append(elapsed)
    return {"median_s": statistics.median(seconds), "min_s": min(seconds), "imports": imported}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "startup.json")
    args = parser.parse_args()
    commands = {
        "lpeer --help": ["--help"],
        "lpeer run --help": ["run", "--help"],
        "lpeer streams": ["streams"],
        "lpeer eval r": ["eval", "r"],
        "lpeer info": ["info"],
    }
    references = {  # what no command can go below, and what info pays for CUDA and threads
        "python -c pass (the interpreter alone)": "pass",
        "python -c 'import torch'": "import torch",
    }
    with tempfile.TemporaryDirectory() as tmp:
        workspace = make_workspace(Path(tmp))
        rows = {label: time_command(argv, workspace, args.repeats) for label, argv in commands.items()}
    for label, code in references.items():
        t = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-c", code], check=True)
            t.append(time.perf_counter() - t0)
        rows[label] = {"median_s": statistics.median(t), "min_s": min(t), "imports": []}
    print(f"{'command':42} {'median s':>9} {'min s':>7}  imports of {', '.join(HEAVY)}")
    for label, r in rows.items():
        print(f"{label:42} {r['median_s']:9.2f} {r['min_s']:7.2f}  {', '.join(r['imports']) or '—'}")
    result = {
        "machine": f"{platform.platform()}, python {platform.python_version()}, {os.cpu_count()} CPUs",
        "load_average": os.getloadavg()[0],
        "repeats": args.repeats,
        "commands": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
