"""Is a large pool's low expert usage real, or too few tokens measured? (issue 18, Table 2)

``benchmarks/paper.py`` measures usage (% of experts retrieved at least once) on 16,384 test tokens
per era: 98,304 tokens × h·k retrievals, about 96 per expert at 65,536 experts, so an expert used
ten times less often than average can be missed by chance. This script re-measures the finished
PEER runs of one paper.py setup (their saved models) on more and more tokens — the test splits, then
the train splits at 4× and 16× as many — and prints per run and budget: usage %, the KL unevenness
(which should not move with the budget if it is not a small-sample artefact), and the share of each
half's sub-keys that reach a head's top-k *candidates* at all (dead sub-keys would bound usage); and, on
a sample of the test tokens, usage as retrieved vs with each query's two halves made independent
(the second half from another token): is it the halves' correlation that leaves pairs unused?

    python benchmarks/paper.py --steps 2000 ...          # first: the runs
    python benchmarks/paper_usage.py --steps 2000 [--seeds 0]

Writes ``benchmarks/results/paper-usage.json``.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("paper", ROOT / "benchmarks" / "paper.py")
paper = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(paper)

#: (split, tokens per era) in the order measured: paper.py's own budget first.
BUDGETS = [("test", 16384), ("train", 65536), ("train", 262144)]


def candidate_subkeys_pct(layer, inputs: torch.Tensor) -> list[float]:
    """% of each half's sub-keys among some query's top-k candidates (per head), over ``inputs`` (m, dim)."""
    c = layer.config
    half, out = c.dim_key // 2, []
    with torch.no_grad():
        q = layer.queries(inputs)  # (m, h, dk)
        for side in range(2):
            scores = q[..., side * half : (side + 1) * half] @ layer.subkeys[:, side].T  # (m, h, n)
            hit = torch.zeros(c.num_subkeys, dtype=torch.bool)
            hit[scores.topk(c.topk, dim=-1).indices.reshape(-1)] = True
            out.append(100.0 * float(hit.float().mean()))
    return out


def pair_usage_pct(layer, inputs: torch.Tensor, seed: int = 0) -> tuple[float, float]:
    """Expert usage % over ``inputs`` (m, dim) as retrieved, and with each query's second half taken
    from another, random token: the same two halves' marginals, but independent of each other. If the
    halves' correlation is what leaves pairs unused, the second number is much higher."""
    half = layer.config.dim_key // 2
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        q = layer.queries(inputs)  # (m, h, dk)
        mixed = torch.cat([q[..., :half], q[torch.randperm(len(q), generator=gen)][..., half:]], dim=-1)
        out = []
        for queries in (q, mixed):
            _, ids = layer.retrieve_queries(queries)
            out.append(100.0 * ids.unique().numel() / layer.num_experts)
    return out[0], out[1]


def measure(work: Path, row: dict) -> dict:
    from lifelong_peer.index import UsageLedger, collect_usage, layer_stats
    from lifelong_peer.run import open_run
    from lifelong_peer.workspace import Workspace

    run = open_run(Workspace.open(work), row["run"])
    run.load_latest()
    model = run.model.eval()
    out = {"run": row["run"], "spec": row["spec"], "budgets": []}
    for split, per_era in BUDGETS:
        ledger, inputs = UsageLedger(), {}
        for name in run.config.slices:
            got = collect_usage(model, run.windows(name, split, per_era)[:, :-1], ledger, name, sample_inputs=8192)
            for pos, x in got["inputs"].items():
                inputs.setdefault(pos, []).append(x)
        layers, tokens = [], 0
        for pos, layer in enumerate(model.peer_layers()):
            st = layer_stats(ledger, pos, layer.num_experts, layer.frozen)
            tokens = st["tokens"]  # the same for every layer
            layers.append(
                {
                    "usage_pct": st["usage_pct"],
                    "kl_unevenness": st["kl_unevenness"],
                    "candidate_subkeys_pct": candidate_subkeys_pct(layer, torch.cat(inputs[pos])),
                }
            )
            if split == BUDGETS[0][0]:  # on the sampled inputs of paper.py's own budget
                layers[-1]["sample_usage_pct"], layers[-1]["halves_independent_usage_pct"] = pair_usage_pct(
                    layer, torch.cat(inputs[pos])
                )
        out["budgets"].append({"split": split, "tokens_per_era": per_era, "tokens": tokens, "layers": layers})
        usage, kl = (sum(u[key] for u in layers) / len(layers) for key in ("usage_pct", "kl_unevenness"))
        cand = sum(sum(u["candidate_subkeys_pct"]) / 2 for u in layers) / len(layers)
        print(
            f"  {paper.run_name(row['spec']):24s} {split:5s} {tokens:>9,} tokens: usage {usage:5.1f}%  "
            f"KL {kl:.3f}  candidate sub-keys {cand:5.1f}%",
            file=sys.stderr,
            flush=True,
        )
        if "sample_usage_pct" in layers[0]:
            real, mixed = (
                sum(u[k] for u in layers) / len(layers) for k in ("sample_usage_pct", "halves_independent_usage_pct")
            )
            print(
                f"  {'':24s} sampled tokens: usage {real:5.1f}%, with independent query halves {mixed:5.1f}%",
                file=sys.stderr,
            )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="0", help="seeds to re-measure, comma-separated")
    p.add_argument("--json", default=str(paper.RESULTS / "paper-usage.json"))
    args, rest = p.parse_known_args(argv)
    pargs = paper.parse_args(rest)  # the paper.py setup flags (--steps, --dim, ...) name the setup
    torch.set_num_threads(1)
    setup, seeds = paper.setup_of(pargs), {int(s) for s in args.seeds.split(",")}
    sizes = {int(n) for n in pargs.sizes.split(",")}
    rows = [
        r
        for r in paper.finished(paper.load_rows(Path(pargs.out)), setup).values()
        if r["spec"]["model"] == "peer" and r["spec"]["seed"] in seeds and r["spec"]["n"] in sizes
    ]
    if not rows:
        raise SystemExit(f"{pargs.out}: no finished PEER run of setup {paper._tag(setup)} at seeds {sorted(seeds)}")
    start, results = time.time(), []
    for row in sorted(rows, key=lambda r: (r["spec"]["bn"], r["spec"]["n"], r["spec"]["lr"])):
        if not (Path(pargs.work) / "runs" / row["run"]).is_dir():
            print(f"  {row['run']}: its run folder is gone; skipped", file=sys.stderr)
            continue
        results.append(measure(Path(pargs.work), row))
    from lifelong_peer.files import atomic_write_json
    from lifelong_peer.system import machine

    atomic_write_json(Path(args.json), {"setup": setup, "budgets": BUDGETS, "runs": results, "machine": machine()})
    print(f"wrote {args.json} ({time.time() - start:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
