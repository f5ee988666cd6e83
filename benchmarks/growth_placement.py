"""Growth placement (issue 5): k-means-placed vs random new sub-keys. Prints a table, writes JSON.

When a PEER pool grows, the new sub-keys should serve the new slice without stealing the old
slices' retrievals. For each growth this measures, on held-out layer inputs:

* ``changed_old``  fraction of old-slice tokens whose retrieved expert set changed (lower is better);
* ``new_hit``      fraction of new-slice tokens that retrieve at least one new expert (higher is better);
* ``old_slots_new`` / ``new_slots_new``  fraction of the old / new slice's retrieved (token, head,
  slot) entries that hold a new expert: selectivity of the new sub-keys (low / high is better);
* ``poor_before`` / ``poor_after``  fraction of the new slice's query halves that are poorly served
  (below the old slices' 10th-percentile best sub-key score, worse half) before and after growth.

Placements: ``random`` (``PEER.grow``'s default draw), ``kmeans`` (centroids of poorly served new
query halves at the old sub-keys' median length), ``kmeans+safe`` (the same directions, shortened
until they enter at most ``--budget`` of old (token, head) top-k sets — ``grow_model``'s default).

Setup (synthetic, so it runs in seconds on a CPU): a PEER layer inside a small LanguageModel; the
old slice's layer inputs are a mixture of Gaussian clusters, the new slice's a mixture of *other*
clusters. A trained pool is simulated by putting each half's sub-keys at spherical k-means
centroids of the old query halves (what key learning converges towards), scaled to the init norm.
K is ``auto`` (``decide_growth``) and a few fixed values; each cell is the mean over seeds.

    python benchmarks/growth_placement.py            # ~1 minute on 2 cores
    python benchmarks/growth_placement.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from pathlib import Path

import faiss
import numpy as np
import torch
import torch.nn.functional as F

from lifelong_peer import LanguageModel, ModelConfig, PEERConfig, system
from lifelong_peer.index import changed_fraction, decide_growth, new_hit, place_subkeys, poorly_served, retrieved_ids

RESULTS = Path(__file__).parent / "results" / "growth_placement.json"


def mixture(centers: torch.Tensor, count: int, noise: float, g: torch.Generator) -> torch.Tensor:
    """``count`` points (count, dim) around random ``centers`` (c, dim)."""
    pick = torch.randint(0, len(centers), (count,), generator=g)
    return centers[pick] + noise * torch.randn(count, centers.shape[1], generator=g)


def trained_model(args, seed: int) -> tuple[LanguageModel, torch.Tensor, torch.Tensor]:
    """A model whose PEER sub-keys sit on the old slice's query halves, and (old, new) layer inputs."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    peer = PEERConfig(num_subkeys=args.n, heads=args.heads, topk=args.topk, dim_key=args.dim_key)
    model = LanguageModel(ModelConfig(dim=args.dim, layers=2, heads=4, context=16, peer=peer)).eval()
    old_c = torch.randn(args.clusters, args.dim, generator=g) * 2
    new_c = torch.randn(args.clusters // 2, args.dim, generator=g) * 2
    old_x = mixture(old_c, args.tokens, 0.5, g)
    new_x = mixture(new_c, args.tokens, 0.5, g)
    layer = model.peer_layers()[0]
    half = args.dim_key // 2
    with torch.no_grad():
        q = layer.queries(old_x)  # (T, h, dk)
        for side in range(2):
            pts = F.normalize(q[..., side * half : (side + 1) * half].reshape(-1, half), dim=-1)
            km = faiss.Kmeans(half, args.n, niter=20, seed=seed, spherical=True)
            km.train(np.ascontiguousarray(pts.numpy()))
            norm = layer.subkeys[:, side].norm(dim=-1).median()
            layer.subkeys[:, side] = F.normalize(torch.from_numpy(km.centroids), dim=-1) * norm
    return model, old_x, new_x


PLACEMENTS = ("random", "kmeans", "kmeans+safe")


def grown_copy(model, k: int, placement: str, fit_new, fit_old, budget: float, seed: int):
    """A copy of ``model`` grown by k sub-keys per half with one placement."""
    model = copy.deepcopy(model)
    layer = model.peer_layers()[0]
    g = torch.Generator().manual_seed(seed)
    subkeys = None
    if placement != "random":
        poor, _ = poorly_served(layer, fit_new, fit_old)
        half = layer.config.dim_key // 2
        with torch.no_grad():
            q = layer.eval().queries(fit_new)
        halves = [q[..., s * half : (s + 1) * half][poor[..., s]] for s in range(2)]
        safe = fit_old if placement == "kmeans+safe" else None
        subkeys = place_subkeys(layer, halves, k, g, seed, old_x=safe, budget=budget)
    model.grow(k, subkeys=subkeys, generator=g)
    return model


def run(args) -> list[dict]:
    rows = []
    for k in args.k:
        cells = {p: [] for p in PLACEMENTS}
        for seed in range(args.seeds):
            model, old_x, new_x = trained_model(args, seed)
            half = len(old_x) // 2  # place with one half of each slice, measure on the other
            fit_old, eval_old = old_x[:half], old_x[half:]
            fit_new, eval_new = new_x[:half], new_x[half:]
            layer = model.peer_layers()[0]
            kk = decide_growth(layer, fit_new, fit_old) if k == "auto" else int(k)
            before = retrieved_ids(layer, eval_old)
            poor_before = float(poorly_served(layer, eval_new, eval_old)[0].float().flatten(0, 1).mean(0).max())
            for placement in PLACEMENTS:
                if kk == 0:
                    cells[placement].append(
                        {
                            "k": 0,
                            "old_slots_new": 0.0,
                            "new_slots_new": 0.0,
                            "changed_old": 0.0,
                            "changed_old_heads": 0.0,
                            "new_hit": 0.0,
                            "poor_before": poor_before,
                            "poor_after": poor_before,
                        }
                    )
                    continue
                glayer = grown_copy(model, kk, placement, fit_new, fit_old, args.budget, seed).peer_layers()[0]
                after = retrieved_ids(glayer, eval_old)
                cells[placement].append(
                    {
                        "k": kk,
                        "old_slots_new": float((after >= layer.num_experts).float().mean()),
                        "new_slots_new": float((retrieved_ids(glayer, eval_new) >= layer.num_experts).float().mean()),
                        "changed_old": changed_fraction(before, after),
                        "changed_old_heads": changed_fraction(before, after, per="head"),
                        "new_hit": new_hit(glayer, eval_new, layer.num_experts),
                        "poor_before": poor_before,
                        "poor_after": float(
                            poorly_served(glayer, eval_new, eval_old)[0].float().flatten(0, 1).mean(0).max()
                        ),
                    }
                )
        for placement in PLACEMENTS:
            row = {"k_setting": str(k), "placement": placement}
            row |= {key: statistics.mean(c[key] for c in cells[placement]) for key in cells[placement][0]}
            rows.append(row)
            print(f"  {row}", file=sys.stderr)
    return rows


def print_table(rows: list[dict], args) -> None:
    print(
        f"\nGrowth placement: n={args.n} (N={args.n**2:,}), heads={args.heads}, topk={args.topk}, "
        f"dim_key={args.dim_key}, {args.tokens // 2} held-out tokens per slice, mean of {args.seeds} seeds"
    )
    print(
        f"{'K':>6}{'placement':>13}{'K used':>8}{'changed_old':>13}{'(per head)':>11}{'new_hit':>9}"
        f"{'old→new slots':>15}{'new→new slots':>15}"
        f"{'poor before':>13}{'poor after':>12}"
    )
    for r in rows:
        print(
            f"{r['k_setting']:>6}{r['placement']:>13}{r['k']:>8.1f}{r['changed_old']:>13.3f}{r['changed_old_heads']:>11.3f}"
            f"{r['new_hit']:>9.3f}{r['old_slots_new']:>15.3f}{r['new_slots_new']:>15.3f}{r['poor_before']:>13.3f}{r['poor_after']:>12.3f}"
        )


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, one seed")
    p.add_argument("--n", type=int, default=32, help="sub-keys per half before growth")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--dim-key", type=int, default=32)
    p.add_argument("--clusters", type=int, default=16, help="clusters of the old slice (the new has half as many)")
    p.add_argument("--tokens", type=int, default=4000, help="tokens per slice (half to place, half to measure)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument(
        "--budget", type=float, default=0.05, help="kmeans+safe: old (token, head) intrusion budget per side"
    )
    p.add_argument("--k", nargs="+", default=["auto", "2", "4", "8"], help="growth sizes: auto or integers")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.tokens, args.seeds, args.k = 12, 600, 1, ["auto", "2"]
    torch.set_num_threads(min(2, torch.get_num_threads()))
    rows = run(args)
    print_table(rows, args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in vars(args).items() if k != "out"}
    args.out.write_text(json.dumps({"config": config, "rows": rows, "machine": system.machine()}, indent=2) + "\n")
    print(f"\nwrote {args.out}", file=sys.stderr)
    return rows


if __name__ == "__main__":
    main()
