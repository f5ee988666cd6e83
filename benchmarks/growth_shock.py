"""Function-preserving growth (issue 16): the growth shock, new_hit and learning of each grow mode.

From one trained model (default: the shipped SOTU base), the newest era is the new slice and the
earlier eras the old ones. For each ``TrainConfig.grow_mode`` (``index.GROW_MODES``) the model is
grown by K sub-keys per half as the phase loop grows it (``grow_model``: placed with the new slice's
train split and a sample of the old slices' validation splits), then:

* ``shock_max`` / ``shock_mean``: the change of each old slice's **test** bits per byte right after
  growth, before any step (``index.growth_shock``; test windows were not used to place anything);
  max of |change| and mean change over the old slices. Target: ≤ 0.002.
* ``new_hit``: fraction of the new slice's validation tokens retrieving at least one new expert
  (mean over PEER layers); ``changed_old``: fraction of sampled old tokens whose retrieved set changed.
* ``active``: parameters per token after growth (exact mode adds h·k' experts per generation).
* Then ``--steps`` steps on the new slice with the old experts (rows and sub-keys) frozen, in two regimes: ``experts``
  (only the expert tables train — query BatchNorm statistics frozen too: what the pool alone learns) and ``shared`` (shared weights train
  too, as the ``lifelong`` preset): ``new_bpb`` (new slice, test) and ``old_bpb`` (old slices' mean,
  test) after training. ``none`` is the same training without growth.

    python benchmarks/growth_shock.py            # ~10 min on 2 cores
    python benchmarks/growth_shock.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from lifelong_peer import system
from lifelong_peer.checkpoint import load_model
from lifelong_peer.config import TrainConfig
from lifelong_peer.data import eval_windows, sample_batch
from lifelong_peer.demo import BASE_CHECKPOINT
from lifelong_peer.index import GROW_MODES, collect_usage, grow_model, growth_shock, new_hit, set_frozen
from lifelong_peer.optim import build_optimizer
from lifelong_peer.regularize import shared_parameters
from lifelong_peer.streams import ingest_default, open_stream
from lifelong_peer.train import _lr_scale
from lifelong_peer.workspace import Workspace

RESULTS = Path(__file__).parent / "results" / "growth_shock.json"


def bpb(model, windows: torch.Tensor) -> float:
    """Bits per byte (byte tokenizer: tokens = bytes) of ``model`` on windows (n, T + 1)."""
    total, count = model.nll(windows)
    return total / (count * 0.6931471805599453)


def variant(model, mode: str | None, k: int, gen_topk: int | None, gate: str, data: dict, seed: int) -> tuple:
    """A grown copy of ``model`` and its growth measurements (mode None: not grown)."""
    m = copy.deepcopy(model)
    existed = [p.num_experts for p in m.peer_layers()]
    row = {"shock_max": 0.0, "shock_mean": 0.0, "new_hit": 0.0, "changed_old": 0.0}
    if mode is not None:
        g = torch.Generator().manual_seed(seed)
        new_inputs = collect_usage(m, data["new_train"], None, sample_inputs=4096, generator=g)["inputs"]
        old_inputs = collect_usage(m, data["old_val"], None, sample_inputs=4096, generator=g)["inputs"]
        reports, shock = growth_shock(
            m,
            lambda: grow_model(
                m, k, new_inputs, old_inputs, seed=seed, mode=mode, generation_topk=gen_topk, generation_gate=gate
            ),
            data["old_test"],
        )
        held = collect_usage(m, data["new_val"], None, sample_inputs=4096, generator=g)["inputs"]
        hits = [new_hit(p, held[pos], existed[pos]) for pos, p in enumerate(m.peer_layers())]
        row = {
            "shock_max": shock["max_bpb"],
            "shock_mean": shock["mean_bpb"],
            "new_hit": statistics.mean(hits),
            "changed_old": statistics.mean(r["changed_old"] for r in reports),
        }
    row["active"] = m.active_params_per_token()
    return m, existed, row


def train(m, existed: list[int], regime: str, data: dict, args, seed: int) -> None:
    """``args.steps`` steps on the new slice; old experts and their sub-keys frozen; shared weights train
    in regime ``shared``."""
    for p, n in zip(m.peer_layers(), existed, strict=True):
        set_frozen(p, torch.arange(n), subkeys=True)
    for p in shared_parameters(m).values():
        p.requires_grad_(regime == "shared")
    opt = build_optimizer(m, lr=args.lr, expert_lr=args.expert_lr)
    tc = TrainConfig(steps=args.steps, batch_size=16, warmup=min(10, args.steps // 4))
    m.train()
    if regime == "experts":  # frozen shared weights include the query BatchNorms' running statistics
        for mod in m.modules():
            if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
                mod.eval()
    for step in range(args.steps):
        gen = torch.Generator().manual_seed(seed * 7919 + step)
        batch = sample_batch([data["new_pool"]], [], tc, 256, gen)
        for group in opt.param_groups:
            group["lr"] = group.setdefault("peak_lr", group["lr"]) * _lr_scale(step, args.steps, tc)
        _, loss = m(batch[:, :-1], batch[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.clip_grad_norm_(1.0)
        opt.step()
    for p in m.parameters():
        p.requires_grad_(True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default=str(BASE_CHECKPOINT))
    parser.add_argument("--k", type=int, default=8, help="sub-keys per half added (the lifelong preset's grow)")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--expert-lr", type=float, default=1e-2)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=8192, help="held-out tokens per slice and split")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", default=None, help="comma-separated settings to run, merged into --out")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    if args.quick:
        args.steps, args.seeds, args.tokens = 4, 1, 2048
    torch.set_num_threads(1)
    start = time.time()
    ws = Workspace.init(Path(tempfile.mkdtemp(prefix="growth-shock-")) / "ws")
    ingest_default(ws, "sotu")
    stream = open_stream(ws, "sotu")
    names = [s.name for s in stream.slices]
    old, new = names[:-1], names[-1]
    win = lambda name, split, n: eval_windows(stream.slice(name).tokens(split), 256, n)  # noqa: E731
    data = {
        "old_val": torch.cat([win(s, "validation", args.tokens // len(old)) for s in old])[:, :-1],
        "old_test": {s: win(s, "test", args.tokens) for s in old},
        "new_train": win(new, "train", args.tokens)[:, :-1],
        "new_val": win(new, "validation", args.tokens)[:, :-1],
        "new_test": win(new, "test", args.tokens),
        "new_pool": stream.slice(new).tokens("train"),
    }
    model = load_model(args.base).eval()
    settings = [("none", None, None, "own")] + [(m, m, None, "own") for m in GROW_MODES]
    settings += [("exact-k4", "exact", 4, "own"), ("exact-nested", "exact", None, "nested")]
    if args.only:
        settings = [s for s in settings if s[0] in args.only.split(",")]
    rows = []
    for label, mode, gen_topk, gate in settings:
        for regime in ("experts", "shared"):
            cells = []
            for seed in range(args.seeds):
                m, existed, row = variant(model, mode, args.k, gen_topk, gate, data, seed)
                train(m, existed, regime, data, args, seed)
                row["new_bpb"] = bpb(m, data["new_test"])
                row["old_bpb"] = statistics.mean(bpb(m, w) for w in data["old_test"].values())
                cells.append(row)
            out = {"mode": label, "regime": regime, "seeds": args.seeds}
            for key in cells[0]:
                values = [c[key] for c in cells]
                out[key] = statistics.mean(values)
                out[key + "_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
            rows.append(out)
            print(json.dumps(out), file=sys.stderr, flush=True)
    base_row = {
        "new_bpb": bpb(model, data["new_test"]),
        "old_bpb": statistics.mean(bpb(model, w) for w in data["old_test"].values()),
    }
    if args.only and Path(args.out).exists():  # merge into an earlier invocation's rows
        ran = {r["mode"] for r in rows}
        rows = [r for r in json.loads(Path(args.out).read_text())["rows"] if r["mode"] not in ran] + rows
    print_table(rows, base_row, args)
    meta = {
        "command": "python benchmarks/growth_shock.py " + " ".join(sys.argv[1:]),
        "base": str(args.base),
        "old": old,
        "new": new,
        "untrained": base_row,
        "seconds": time.time() - start,
        "rows": rows,
        "machine": system.machine(),  # issue 25
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(meta, indent=2))


def print_table(rows: list[dict], base_row: dict, args) -> None:
    print(f"grow {args.k} sub-keys per half, then {args.steps} steps on the new slice (test bits per byte)")
    print(f"untrained model: new {base_row['new_bpb']:.4f}, old mean {base_row['old_bpb']:.4f}")
    head = f"{'mode':10} {'regime':8} {'shock max':>10} {'shock mean':>11} {'new_hit':>8} {'chg old':>8} {'active':>8} {'new bpb':>14} {'old bpb':>14}"
    print(head)
    for r in rows:
        print(
            f"{r['mode']:12} {r['regime']:8} {r['shock_max']:10.4f} {r['shock_mean']:11.4f} {r['new_hit']:8.3f} "
            f"{r['changed_old']:8.3f} {int(r['active']):8d} {r['new_bpb']:8.4f}±{r['new_bpb_std']:.3f} "
            f"{r['old_bpb']:8.4f}±{r['old_bpb_std']:.3f}"
        )


if __name__ == "__main__":
    main()
