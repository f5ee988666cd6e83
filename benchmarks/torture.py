"""Crash torture (issue 10): SIGKILL a real ``lpeer run`` again and again, resume it, compare bit for bit.

A small multi-phase ``lifelong-grow`` run (growth, freezing, L2-SP, mid-phase checkpoints) on an
ingested JSONL stream is trained twice as real ``python -m lifelong_peer.cli`` processes:

- **reference** — uninterrupted;
- **tortured** — killed with SIGKILL ``--kills`` times and resumed with ``--resume`` after each kill.

Kill points are chosen two ways (``--mode``):

- ``hooks`` — precise: the child process installs a hook (``--child SPEC``) that SIGKILLs itself at
  the N-th occurrence of an event: ``write`` (half-way through writing a file: a torn temp file),
  ``publish`` (just after a file is renamed into place, before the next write: between a checkpoint
  and state.json, or state.json and results.json), ``step`` (inside an optimizer step), ``forward``
  (inside any model forward: training, evaluation, usage recording, growth), ``grow`` (after the pool
  grew in memory, before anything was saved) and ``log`` (half a metrics.jsonl line written);
- ``random`` — a uniformly random moment of the process's life.

After every kill the workspace manifest must parse and validate, and state.json (if any) must be
valid and point at a checkpoint matching its recorded size and sha256. At the end the model tensors
of the last phase checkpoint, the per-step losses in metrics.jsonl and the evaluation matrix in
results.json must equal the reference bit for bit, and no temp file may be left behind.

Usage: python benchmarks/torture.py [--kills 10] [--mode both] [--seed 0] [--out benchmarks/results/torture.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

KINDS = ("write", "publish", "step", "forward", "grow", "log")
CONFIG = """\
[train]
steps = 6
batch_size = 4
warmup = 2
base_steps = 2
eval_tokens = 128
usage_tokens = 128

[model]
dim = 16
layers = 2
heads = 2
context = 16

[model.peer]
num_subkeys = 4
heads = 2
topk = 2
dim_key = 8
"""


# --- the child: a real CLI process that kills itself at a chosen event -----------------------------


def child(spec: str, argv: list[str]) -> None:
    """Run ``lpeer argv`` with hooks counting every event of ``KINDS``; SPEC ``kind:N`` SIGKILLs this
    process at the N-th event ``kind`` (``write:N:NAME`` / ``publish:N:NAME``: of files named NAME);
    SPEC ``count:PATH`` only writes the counts to PATH at the end."""
    from lifelong_peer import files, optim, train
    from lifelong_peer.hooks import growth
    from lifelong_peer.model import LanguageModel

    target, _, arg = spec.partition(":")
    arg, _, file_name = arg.partition(":") if target != "count" else (arg, "", "")
    counts = dict.fromkeys(KINDS, 0)
    matched = 0  # events of the target kind (and file name)

    def event(kind: str, before_death=None, path=None) -> None:
        nonlocal matched
        counts[kind] += 1
        if kind != target or (file_name and Path(path).name != file_name):
            return
        matched += 1
        if matched == int(arg):
            if before_death is not None:
                before_death()
            os.kill(os.getpid(), signal.SIGKILL)

    def wrap(owner, name: str, kind: str, after: bool = False, before_death=None) -> None:
        original = getattr(owner, name)

        def hooked(*args, **kwargs):
            if not after:
                event(kind, before_death and (lambda: before_death(*args)))
            out = original(*args, **kwargs)
            if after:
                event(kind)
            return out

        setattr(owner, name, hooked)

    original_write = files.atomic_write  # every durable write goes through it (looked up when called)

    def atomic_write(path, write):
        def torn(tmp):  # the kill comes half-way through the file
            write(tmp)
            event("write", lambda: os.truncate(tmp, os.path.getsize(tmp) // 2), path)

        original_write(path, torn)
        event("publish", path=path)

    def cut_line(run, *_):  # the kill comes half-way through a metrics.jsonl line
        with open(run.dir / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write('{"phase": 0, "step": 99, "lo')

    files.atomic_write = atomic_write
    wrap(optim.PEEROptimizer, "step", "step")
    wrap(LanguageModel, "forward", "forward")
    wrap(growth, "grow_model", "grow", after=True)  # the loop's growth planner calls it
    wrap(train, "_log_step", "log", before_death=cut_line)
    from lifelong_peer.cli.main import main

    sys.argv = ["lpeer", *argv]
    try:
        main()
    finally:
        if target == "count":
            Path(arg).write_text(json.dumps(counts))


# --- the parent ----------------------------------------------------------------------------------


def make_workspace(root: Path) -> Path:
    """A workspace with stream ``toy`` (3 yearly slices of a small JSONL file) and tiny.toml."""
    from lifelong_peer.streams import ingest
    from lifelong_peer.workspace import Workspace

    rng = random.Random(0)
    words = ["the", "and", "of", "peer", "expert", "stream", "slice", "time", "model", "data"]
    with open(root / "docs.jsonl", "w", encoding="utf-8") as f:
        for y, year in enumerate((2001, 2002, 2003)):
            vocab = words[2 * y :] + words[:2]
            for i in range(30):
                text = " ".join(rng.choice(vocab) for _ in range(60))
                f.write(json.dumps({"id": f"{year}-{i}", "time": f"{year}-03-01", "text": text}) + "\n")
    (root / "tiny.toml").write_text(CONFIG, encoding="utf-8")
    ws = Workspace.init(root / "ws")
    ingest(ws, str(root / "docs.jsonl"), "toy")
    return root / "ws"


def _env() -> dict:
    # one thread: the same kernels (so the same float sums) in every process, and no fight for cores
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "LPEER_DEBUG": "1"}


def lpeer(args: list[str], spec: str | None = None, kill_after: float | None = None) -> tuple[int, str]:
    """Run the CLI in a fresh process (via the hook child when ``spec``); SIGKILL it after ``kill_after`` s."""
    cmd = (
        [sys.executable, __file__, "--child", spec, "--", *args]
        if spec
        else [sys.executable, "-m", "lifelong_peer.cli", *args]
    )
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        _, err = proc.communicate(timeout=kill_after)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate()
    return proc.returncode, err


def run_args(ws: Path, root: Path, name: str) -> list[str]:
    return ["run", "-w", str(ws), "--stream", "toy", "--strategy", "lifelong-grow", "--config", str(root / "tiny.toml"),
            "--checkpoint-every", "2", "--name", name, "-q", "--format", "json"]  # fmt: skip


def check_consistent(ws: Path, run: str) -> None:
    """What must hold after any kill: a valid manifest, a valid state.json pointing at an intact checkpoint."""
    from lifelong_peer.files import verify_file
    from lifelong_peer.workspace import Workspace

    Workspace(ws).manifest()  # raises on invalid JSON or schema
    state_path = ws / "runs" / run / "state.json"
    if state_path.exists():
        state = json.loads(state_path.read_text())
        if state["checkpoint"] is not None:
            verify_file(ws / "runs" / run / state["checkpoint"], state["files"][state["checkpoint"]])


def outcome(run_dir: Path) -> dict:
    """What must be bit-identical: last phase checkpoint's model tensors, per-step losses, eval matrix."""
    from lifelong_peer.checkpoint import load_tensors

    last = sorted((run_dir / "checkpoints").glob("phase-[0-9][0-9][0-9].safetensors"))[-1]
    tensors, _ = load_tensors(last)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    results = json.loads((run_dir / "results.json").read_text())
    return {
        "checkpoint": last.name,
        "model": {k: v for k, v in tensors.items() if k.startswith("model::")},
        "losses": [(m["phase"], m["step"], m["loss"]) for m in metrics],
        "eval": {s: [r["nll"] for r in e["after"]] for s, e in results["eval"].items()},
    }


def same(a: dict, b: dict) -> list[str]:
    """Differences between two outcomes (empty: bit-identical)."""
    import torch

    problems = []
    if a["checkpoint"] != b["checkpoint"]:
        problems.append(f"last checkpoint {a['checkpoint']} vs {b['checkpoint']}")
    if a["model"].keys() != b["model"].keys():
        problems.append("model tensor names differ")
    else:
        problems += [f"tensor {k} differs" for k in a["model"] if not torch.equal(a["model"][k], b["model"][k])]
    if a["losses"] != b["losses"]:
        problems.append(f"metrics.jsonl losses differ ({len(a['losses'])} vs {len(b['losses'])} steps)")
    if a["eval"] != b["eval"]:
        problems.append("results.json evaluation differs")
    return problems


def torture(
    root: Path, kills: int = 10, mode: str = "both", seed: int = 0, schedule: list[str] | None = None, log=print
) -> dict:
    """Reference run, then a run killed ``kills`` times and resumed; returns the report (``ok`` and details).

    ``schedule``: explicit hook kill points (``kind:N[:NAME]``) instead of random ones."""
    rng = random.Random(seed)
    ws = make_workspace(root)
    t0 = time.perf_counter()
    rc, err = lpeer(run_args(ws, root, "reference"), spec=f"count:{root / 'counts.json'}")
    ref_seconds = time.perf_counter() - t0
    if rc != 0:
        raise RuntimeError(f"reference run failed ({rc}): {err[-2000:]}")
    reference = outcome(ws / "runs" / "reference")
    totals = json.loads((root / "counts.json").read_text())  # events of a whole run: spreads the kills over it
    log(f"reference: {ref_seconds:.1f} s, {len(reference['losses'])} steps")

    events, finished = [], False
    for i in range(len(schedule) if schedule else kills):
        use_hooks = schedule or mode == "hooks" or (mode == "both" and i % 2 == 0)
        args = (
            run_args(ws, root, "tortured")
            if i == 0
            else ["run", "-w", str(ws), "--resume", "tortured", "-q", "--format", "json"]
        )
        t0 = time.perf_counter()
        if use_hooks:
            kind = KINDS[rng.randrange(len(KINDS))]
            what = schedule[i] if schedule else f"{kind}:{rng.randint(1, max(1, 2 * totals[kind] // kills))}"
            rc, err = lpeer(args, spec=what)
        else:
            delay = rng.uniform(0.3, 1.0) * ref_seconds
            what = f"after {delay:.1f} s"
            rc, err = lpeer(args, kill_after=delay)
        seconds = time.perf_counter() - t0
        if rc not in (0, -signal.SIGKILL):
            raise RuntimeError(f"kill {i} ({what}): process failed with {rc}: {err[-2000:]}")
        check_consistent(ws, "tortured")
        killed = rc == -signal.SIGKILL
        state = (
            json.loads((ws / "runs" / "tortured" / "state.json").read_text())
            if (ws / "runs" / "tortured" / "state.json").exists()
            else {}
        )
        events.append({"kill": what, "killed": killed, "seconds": round(seconds, 2), "state": state.get("checkpoint")})
        log(
            f"  {i + 1:2d}. {what:>14}: {'killed' if killed else 'finished first'}; resumes from {state.get('checkpoint')}"
        )
        if not killed:
            finished = True
            break
    if not finished:
        rc, err = lpeer(["run", "-w", str(ws), "--resume", "tortured", "-q", "--format", "json"])
        if rc != 0:
            raise RuntimeError(f"final resume failed ({rc}): {err[-2000:]}")
    run_dir = ws / "runs" / "tortured"
    problems = same(reference, outcome(run_dir))
    leftovers = [str(p.relative_to(ws)) for p in ws.rglob("*.tmp")]
    if leftovers:
        problems.append(f"temp files left behind: {leftovers}")
    return {
        "ok": not problems,
        "problems": problems,
        "kills": sum(e["killed"] for e in events),
        "events": events,
        "reference_seconds": round(ref_seconds, 2),
        "steps": len(reference["losses"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--mode", choices=("hooks", "random", "both"), default="both")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "torture.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        report = torture(Path(tmp), args.kills, args.mode, args.seed)
        report["seconds"] = round(time.perf_counter() - t0, 1)
    print(f"\n{'kill point':>16} | killed | seconds | resumed from")
    for e in report["events"]:
        print(f"{e['kill']:>16} | {e['killed']!s:>6} | {e['seconds']:7.1f} | {e['state']}")
    print(
        f"\n{report['kills']} kills; bit-identical to the uninterrupted run: {report['ok']} {report['problems'] or ''}"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    from lifelong_peer.system import machine

    record = {**report, "mode": args.mode, "seed": args.seed, "machine": machine()}
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    sys.exit(0 if report["ok"] else 1)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[4:] if sys.argv[3:4] == ["--"] else sys.argv[3:])
    else:
        main()
