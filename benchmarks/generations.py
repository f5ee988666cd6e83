"""Grown generations' cost (issue 16): prints a table and writes ``benchmarks/results/generations.json``.

A PEER layer as the SOTU model has it (dim 128, 4 heads, top-8, dim_key 64, 32 sub-keys), grown the
way the ``lifelong`` preset grows it (a generation of 16 sub-keys, top-4 per head, per era). After each
growth, over one batch (16 × 256 tokens): forward + backward of the whole layer (native kernels), and of
the generations' retrieval alone, in the native kernel (``pk_topk_shell``) and in PyTorch
(``peer_ops.shell_topk``, the code it replaced). Medians after a warm-up; ratios only mean something
within one run, as other processes share this CPU.

    python benchmarks/generations.py [--threads 1] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from lifelong_peer import peer_ops, system
from lifelong_peer.peer import PEER, PEERConfig

OUT = Path(__file__).resolve().parent / "results" / "generations.json"


def median_s(fn, repeats: int) -> float:
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        fn()
        if i:  # the first is warm-up
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def retrieval(layer: PEER, q: torch.Tensor, native: bool) -> None:
    """Every grown generation's top-k, forward and backward (into the queries and sub-keys)."""
    c = layer.config
    ends = [g[0] for g in c.generations[1:]] + [c.num_subkeys]
    total = 0
    for (lo, k), hi in zip(c.generations, ends, strict=True):
        if native:
            scores, _, _ = peer_ops.product_key_topk(q, layer.subkeys[:hi], k, native=True, lo=lo)
        else:
            scores, _, _ = peer_ops.shell_topk(q, layer.subkeys[:hi], lo, k)
        total = total + scores.sum()
    total.backward()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--growths", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    layer = PEER(PEERConfig(dim=128, heads=4, topk=8, dim_key=64, num_subkeys=32), impl="native")
    x = torch.randn(16 * 256, 128)
    rows = []
    print(
        f"{'growths':>7} {'experts':>8} {'layer ms':>9} {'retrieval: native ms':>21} {'pytorch ms':>11} {'speed-up':>9}"
    )
    for g in range(args.growths + 1):
        if g:
            layer.grow(16, generation_topk=4, generation_gate="nested")
        layer_s = median_s(lambda: layer(x).square().mean().backward(), args.repeats)
        row = {"growths": g, "experts": layer.num_experts, "layer_s": layer_s}
        if g:
            q = layer.queries(x).detach().requires_grad_()
            row["retrieval_native_s"] = median_s(lambda q=q: retrieval(layer, q, True), args.repeats)
            row["retrieval_pytorch_s"] = median_s(lambda q=q: retrieval(layer, q, False), args.repeats)
            nat, pt = row["retrieval_native_s"], row["retrieval_pytorch_s"]
            print(
                f"{g:>7} {layer.num_experts:>8,} {layer_s * 1e3:>9.1f} {nat * 1e3:>21.1f} {pt * 1e3:>11.1f} {pt / nat:>8.1f}×"
            )
        else:
            print(f"{g:>7} {layer.num_experts:>8,} {layer_s * 1e3:>9.1f} {'—':>21} {'—':>11} {'—':>9}")
        rows.append(row)
        layer.zero_grad(set_to_none=True)
    machine = system.machine()  # issue 25: the CPU, threads and kernel build the rows were measured with
    OUT.write_text(
        json.dumps({"threads": args.threads, "tokens": x.shape[0], "rows": rows, "machine": machine}, indent=1)
    )
    print(f"→ {OUT}")


if __name__ == "__main__":
    main()
