"""Ingest memory is bounded by the batch, not the file (issue 3): generate a large JSONL, ingest it in
a child process, and report peak memory and throughput.

Peak memory is sampled from ``/proc/<pid>/status`` every 20 ms and reported in two parts:
``anon`` (heap: what the process really needs) and ``file`` (file-backed pages of memory-mapped
Arrow/raw files — page cache the kernel can drop at any time, so not memory the ingest needs);
``VmHWM`` is the kernel's peak of both together.

Usage: python benchmarks/ingest_memory.py [--mb 1024] [--out benchmarks/results/ingest_memory.json]
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, sys, threading, time
from lifelong_peer.streams import ingest
from lifelong_peer.workspace import Workspace

def status():
    out = {}
    for line in open("/proc/self/status"):
        key, _, value = line.partition(":")
        if key in ("RssAnon", "RssFile", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out

peak = {"RssAnon": 0, "RssFile": 0}
done = threading.Event()
def sample():
    while not done.is_set():
        s = status()
        for k in peak:
            peak[k] = max(peak[k], s[k])
        time.sleep(0.02)

ws = Workspace.init(sys.argv[2])
baseline = status()
thread = threading.Thread(target=sample, daemon=True)
thread.start()
t0 = time.perf_counter()
summary = ingest(ws, sys.argv[1], "big", slice="year")
seconds = time.perf_counter() - t0
done.set(); thread.join()
final = status()
print(json.dumps({"seconds": seconds, "documents": summary["documents"], "slices": len(summary["slices"]),
                  "baseline_anon": baseline["RssAnon"], "peak_anon": peak["RssAnon"], "peak_file": peak["RssFile"],
                  "vmhwm": final["VmHWM"]}))
"""


def generate(path: Path, megabytes: float, seed: int = 0) -> tuple[int, int]:
    """A JSONL file of about ``megabytes`` MB: 1–8 KB documents over ten years. Returns (docs, bytes)."""
    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(5000)]
    pool = [" ".join(rng.choices(words, k=rng.randint(150, 1300))) for _ in range(500)]
    target, written, n = int(megabytes * 2**20), 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            t = 1_262_304_000 + rng.randrange(10 * 365 * 86400)  # 2010..2019
            line = json.dumps({"id": f"doc{n}", "time": t, "text": pool[n % len(pool)]}) + "\n"
            f.write(line)
            written += len(line)
            n += 1
    return n, written


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=1024, help="size of the generated JSONL file in MB")
    ap.add_argument("--out", default="benchmarks/results/ingest_memory.json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "big.jsonl"
        t0 = time.perf_counter()
        docs, nbytes = generate(src, args.mb)
        gen_s = time.perf_counter() - t0
        proc = subprocess.run(
            [sys.executable, "-c", CHILD, str(src), str(Path(tmp) / "ws")], capture_output=True, text=True, check=False
        )
        if proc.returncode != 0:
            sys.exit(f"ingest failed:\n{proc.stderr}")
        result = json.loads(proc.stdout.strip().splitlines()[-1])
    mib = 2**20
    result.update({"file_mb": nbytes / mib, "file_documents": docs, "generate_seconds": gen_s})
    rows = [
        ("source file", f"{nbytes / mib:,.0f} MB, {docs:,} documents"),
        ("ingest time", f"{result['seconds']:.1f} s ({nbytes / mib / result['seconds']:.1f} MB/s, two passes)"),
        ("slices", str(result["slices"])),
        ("heap (RssAnon) at start", f"{result['baseline_anon'] / mib:,.0f} MB"),
        ("heap (RssAnon) peak", f"{result['peak_anon'] / mib:,.0f} MB"),
        ("file-backed mapped peak", f"{result['peak_file'] / mib:,.0f} MB (page cache, reclaimable)"),
        ("VmHWM (both)", f"{result['vmhwm'] / mib:,.0f} MB"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from lifelong_peer.system import machine

    out.write_text(json.dumps(result | {"machine": machine()}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
