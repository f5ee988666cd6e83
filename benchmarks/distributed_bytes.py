"""Bytes exchanged per step for the expert tables (issue 9): they follow the rows touched, not N.

Two gloo ranks on this machine run ``lifelong_peer.distributed.average_sparse`` — the exchange the
trainer uses — and log, per expert table and step:

* ``rows/rank``   distinct rows one rank's gradient touches;
* ``rows``        distinct rows after the exchange (the union over ranks);
* ``sent``        bytes one rank feeds the all-gather (ids + values, padded to the largest rank);
  it receives world × that;
* ``dense``       what a dense all-reduce of the N × dim gradient would move per rank (ring:
  2 (world − 1) / world × N × dim × 4 bytes), never done here.

Sections:

* ``synthetic``  one table of dim 256, tokens/rank × h·k = 128 retrievals per token with ids uniform
  over N (the worst case: real retrieval is skewed and touches fewer rows), N = 64² … 4096²; no N × dim
  tensor is ever allocated, so N = 16M costs nothing.
* ``model``      a real PEER layer (dim 128, h 8, k 16) forward+backward on 256 tokens per rank through
  ``data_parallel`` (DistributedDataParallel all-reduces the dense gradients: query net, BatchNorm,
  sub-keys), then ``average_expert_gradients``: U and V exchanged row-sparse.

Usage::

    python benchmarks/distributed_bytes.py           # ~1 minute on 2 cores
    python benchmarks/distributed_bytes.py --quick   # smoke run
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results" / "distributed_bytes.json"
WORLD = 2
DIM = 256
RETRIEVALS = 128  # h·k = 8 heads × top-16


def _dense_bytes(n: int, dim: int, world: int = WORLD) -> int:
    return int(2 * (world - 1) / world * n * dim * 4)


def _synthetic(sizes: list[int], tokens: list[int], repeats: int) -> list[dict]:
    from lifelong_peer import distributed

    rows_out = []
    rank = distributed.rank()
    for n in sizes:
        for t in tokens:
            gen = torch.Generator().manual_seed(1000 * rank + t)
            ids = torch.randint(n * n, (t * RETRIEVALS,), generator=gen)
            grad = torch.sparse_coo_tensor(
                ids[None], torch.randn(ids.numel(), DIM, generator=gen), (n * n, DIM), check_invariants=True
            )
            grad = grad.coalesce()
            times = []
            for _ in range(repeats):
                distributed.barrier()
                t0 = time.perf_counter()
                (avg,), sent = distributed.average_sparse([grad])
                times.append(time.perf_counter() - t0)
            rows_out.append(
                {
                    "N": n * n,
                    "tokens_per_rank": t,
                    "rows_per_rank": grad._nnz(),
                    "rows": avg._nnz(),
                    "sent_bytes": sent,
                    "dense_allreduce_bytes": _dense_bytes(n * n, DIM),
                    "ms": 1000 * statistics.median(times),
                }
            )
    return rows_out


def _model(sizes: list[int], tokens: int) -> list[dict]:
    from lifelong_peer import distributed
    from lifelong_peer.peer import PEER, PEERConfig

    out = []
    for n in sizes:
        torch.manual_seed(0)  # identical replicas
        layer = PEER(PEERConfig(dim=128, num_subkeys=n, heads=8, topk=16, dim_key=64))
        replica = distributed.data_parallel(layer)
        x = torch.randn(tokens, 128, generator=torch.Generator().manual_seed(distributed.rank()))
        replica(x).pow(2).mean().backward()
        stats = distributed.average_expert_gradients(layer)
        table_rows = layer.U.grad._nnz()
        out.append(
            {
                "N": n * n,
                "tokens_per_rank": tokens,
                "rows": table_rows,
                "sparse_sent_bytes": stats.sparse_bytes,
                "dense_sent_bytes": stats.dense_bytes,
                "dense_allreduce_bytes_U_V": 2 * _dense_bytes(n * n, 128),
            }
        )
    return out


def _rank_main(rank: int, port: int, job: dict, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from lifelong_peer import distributed

    distributed.init_from_env(timeout_s=300)
    res = {
        "synthetic": _synthetic(job["sizes"], job["tokens"], job["repeats"]),
        "model": _model(job["model_sizes"], 256),
    }
    if rank == 0:
        Path(out).write_text(json.dumps(res))
    distributed.shutdown()


def run(job: dict) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp, "res.json"))
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=_rank_main, args=(r, port, job, out)) for r in range(WORLD)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        if any(p.exitcode for p in procs):
            sys.exit(f"a rank failed: exit codes {[p.exitcode for p in procs]}")
        return json.loads(Path(out).read_text())


def print_tables(res: dict) -> None:
    mib = 2**20
    print(f"\nRow-sparse exchange of one expert table, dim {DIM}, {WORLD} gloo ranks, ids uniform over N")
    print(f"{'N':>12}{'tokens/rank':>12}{'rows/rank':>11}{'rows':>10}{'sent MiB':>10}{'dense MiB':>11}{'ms':>8}")
    for r in res["synthetic"]:
        print(
            f"{r['N']:>12,}{r['tokens_per_rank']:>12,}{r['rows_per_rank']:>11,}{r['rows']:>10,}"
            f"{r['sent_bytes'] / mib:>10.2f}{r['dense_allreduce_bytes'] / mib:>11.1f}{r['ms']:>8.1f}"
        )
    print("\nA PEER layer (dim 128, h 8, k 16), 256 tokens per rank: DDP (dense) + average_expert_gradients (U, V)")
    print(f"{'N':>12}{'rows':>8}{'U+V sent MiB':>14}{'dense sent MiB':>16}{'U+V dense MiB':>15}")
    for r in res["model"]:
        print(
            f"{r['N']:>12,}{r['rows']:>8,}{r['sparse_sent_bytes'] / mib:>14.2f}"
            f"{r['dense_sent_bytes'] / mib:>16.2f}{r['dense_allreduce_bytes_U_V'] / mib:>15.1f}"
        )


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: small pools, one repeat")
    ap.add_argument("--out", type=Path, default=RESULTS, help="JSON output path")
    args = ap.parse_args(argv)
    job = (
        {"sizes": [64, 256], "tokens": [16, 64], "repeats": 1, "model_sizes": [32, 64]}
        if args.quick
        else {"sizes": [64, 256, 1024, 4096], "tokens": [16, 128, 1024], "repeats": 3, "model_sizes": [64, 256, 512]}
    )
    from lifelong_peer.system import info

    res = {
        "command": " ".join(["python", "benchmarks/distributed_bytes.py", *sys.argv[1:]]),
        "machine": info(full=True),
    }
    res |= {"quick": args.quick, "world": WORLD, "dim": DIM, "retrievals_per_token": RETRIEVALS}
    res |= run(job)
    print_tables(res)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2))
    print(f"\nwrote {args.out}", file=sys.stderr)
    return res


if __name__ == "__main__":
    main()
