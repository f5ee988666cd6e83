"""Loss and memory of the expert tables' moment storages (issue 8): prints a table, writes
``benchmarks/results/moments.json``.

The same small byte-level ``LanguageModel`` (default ModelConfig: dim 128, 4 blocks, PEER in the
middle block; ``--subkeys`` sets the pool, 32² = 1,024 experts by default) is trained from the same
seed on the same batches of the shipped State of the Union text with each storage of the expert
tables' Adam moments (``lifelong_peer.optim.MOMENTS``) and compared on final train loss (mean of the
last 10% of steps) and held-out loss (every 10th address, fixed windows), next to the bytes of the
expert tables' optimizer state. ``rowwise-bf16m`` (row-wise v, bf16 m) is measured to choose the
first moment's dtype of ``rowwise``.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/moments.py                       # ~2 min per option and seed
    OMP_NUM_THREADS=1 python benchmarks/moments.py --steps 50 --seeds 0  # smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from lifelong_peer.model import LanguageModel, ModelConfig
from lifelong_peer.optim import MOMENTS, Moments, build_optimizer
from lifelong_peer.peer import PEERConfig
from lifelong_peer.streams.default import addresses
from lifelong_peer.system import info

RESULTS = Path(__file__).parent / "results" / "moments.json"
OPTIONS = {**MOMENTS, "rowwise-bf16m": Moments("rowwise-bf16m", torch.bfloat16, None, rowwise=True)}


def corpus() -> tuple[np.ndarray, np.ndarray]:
    """UTF-8 bytes of the addresses: (train, eval), every 10th address held out (all eras in both)."""
    texts = [a["text"] for a in addresses()]
    split = {"train": [t for i, t in enumerate(texts) if i % 10], "eval": texts[::10]}
    return tuple(np.frombuffer("\n\n".join(split[k]).encode("utf-8"), dtype=np.uint8) for k in ("train", "eval"))


def windows(data: np.ndarray, starts: np.ndarray, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets), each (len(starts), context)."""
    idx = torch.from_numpy(np.stack([data[s : s + context + 1] for s in starts]).astype(np.int64))
    return idx[:, :-1], idx[:, 1:]


def moment_bytes(opt, model: LanguageModel) -> int:
    """Bytes of the expert tables' (U, V) optimizer state in every PEER layer."""
    tables = [p for layer in model.peer_layers() for p in (layer.U, layer.V)]
    return sum(t.numel() * t.element_size() for p in tables for t in opt.state[p].values())


def train_one(option: str, seed: int, args, train: np.ndarray, held_out: np.ndarray) -> dict:
    torch.manual_seed(seed)
    peer = PEERConfig(dim=128, num_subkeys=args.subkeys, heads=4, topk=8, dim_key=64)
    model = LanguageModel(ModelConfig(context=args.context, peer=peer))
    opt = build_optimizer(model, lr=args.lr, moments=OPTIONS[option])
    rng = np.random.default_rng(seed)  # the same batches for every option
    losses = []
    t0 = time.perf_counter()
    model.train()
    for step in range(args.steps):
        # the trainer's schedule: linear warm-up, cosine decay to 10%
        progress = max(0, step - args.warmup) / max(1, args.steps - args.warmup)
        scale = min(1.0, (step + 1) / args.warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))
        for group in opt.param_groups:
            group["lr"] = args.lr * scale
        x, y = windows(train, rng.integers(0, len(train) - args.context - 1, args.batch), args.context)
        opt.zero_grad()
        _, loss = model(x, y)
        loss.backward()
        opt.clip_grad_norm_(1.0)
        opt.step()
        losses.append(loss.item())
    seconds = time.perf_counter() - t0
    model.eval()
    starts = np.linspace(0, len(held_out) - args.context - 1, args.eval_windows).astype(np.int64)
    with torch.no_grad():
        x, y = windows(held_out, starts, args.context)
        eval_loss = sum(model(xb, yb)[1].item() for xb, yb in zip(x.split(16), y.split(16), strict=True))
        eval_loss /= math.ceil(len(starts) / 16)
    tail = max(1, args.steps // 10)
    return {
        "option": option,
        "seed": seed,
        "train_loss": sum(losses[-tail:]) / tail,
        "eval_loss": eval_loss,
        "moment_bytes": moment_bytes(opt, model),
        "experts": sum(layer.num_experts for layer in model.peer_layers()),
        "seconds": seconds,
        "loss_curve": losses[:: max(1, args.steps // 50)],
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--options", nargs="+", default=list(OPTIONS), choices=list(OPTIONS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--subkeys", type=int, default=32, help="sub-keys per half: pool of subkeys² experts")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--eval-windows", type=int, default=128)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    train, held_out = corpus()
    runs = []
    for seed in args.seeds:
        for option in args.options:
            runs.append(train_one(option, seed, args, train, held_out))
            r = runs[-1]
            print(
                f"  {option} seed {seed}: train {r['train_loss']:.4f} eval {r['eval_loss']:.4f} ({r['seconds']:.0f} s)",
                file=sys.stderr,
            )
    summary = {}
    for option in args.options:
        rs = [r for r in runs if r["option"] == option]
        summary[option] = {
            key: sum(r[key] for r in rs) / len(rs) for key in ("train_loss", "eval_loss", "moment_bytes", "seconds")
        }
    base = summary.get("fp32")
    print(
        f"\nExpert moments, {args.steps} steps × {args.batch}×{args.context} bytes, seeds {args.seeds}, {runs[0]['experts']:,} experts"
    )
    print(
        f"{'moments':<15}{'train loss':>11}{'eval loss':>11}{'Δ eval vs fp32':>16}{'state bytes':>13}{'× fp32':>8}{'s/run':>7}"
    )
    for option, s in summary.items():
        delta = f"{s['eval_loss'] - base['eval_loss']:+.4f}" if base else "-"
        ratio = f"{s['moment_bytes'] / base['moment_bytes']:.3f}" if base else "-"
        print(
            f"{option:<15}{s['train_loss']:>11.4f}{s['eval_loss']:>11.4f}{delta:>16}"
            f"{s['moment_bytes']:>13,.0f}{ratio:>8}{s['seconds']:>7.0f}"
        )
    res = {
        "command": " ".join(["python", "benchmarks/moments.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": info(),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "summary": summary,
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2))
    print(f"\nwrote {args.out}", file=sys.stderr)
    return res


if __name__ == "__main__":
    main()
