"""GPU check (issue 8): the PEER layer and a short model step on CUDA against the CPU reference, and timings.

Run through ``benchmarks/gpu_check.sh`` (which checks the environment first); exit status 0 when every
check passes, 1 when one fails. Checks (CPU reference: ``impl="naive"``, fp32; TF32 off on the GPU):

* layer, standard config (dim 256, h 8, k 16, N 65,536, dim_key 128, 1,024 tokens): outputs and every
  gradient of the GPU layer (fp32) vs the CPU reference; bf16 autocast output vs the CPU fp32 output.
* model: one training step (default ModelConfig, batch 4 × 256, ``build_optimizer``): loss and every
  parameter after the step, GPU vs CPU.

Timings (median of CUDA-synchronised repeats): layer fwd+bwd vs a dense FFN 256→1024→256 (fp32 and
bf16 autocast, 1,024 and 16,384 tokens); training steps at N = 1024² (dim 256, row-sparse and dense
AdamW; dim 128 at 1024² and 2048²); peak GPU memory while training at N = 1024², dim 256, over the
bytes of U and V; whole-model tokens/s with a PEER block vs dense FFNs, and with the PEER block
under the trainer's bf16 autocast (``lifelong_peer.train.autocast``, ``TrainConfig.precision``).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from lifelong_peer.model import LanguageModel, ModelConfig
from lifelong_peer.optim import build_optimizer
from lifelong_peer.peer import PEER, PEERConfig
from lifelong_peer.system import info
from lifelong_peer.train import autocast  # the trainer's bf16 path (TrainConfig.precision)

STANDARD = {"dim": 256, "num_subkeys": 256, "heads": 8, "topk": 16, "dim_key": 128}
#: relative (Frobenius) error bounds. fp32 gradients allow for a few near-tie retrievals that differ
#: between CPU and GPU rounding (reported as ids_match); bf16 is a ~3-digit format.
TOL = {"layer_fp32": 1e-3, "layer_bf16": 5e-2, "ids_match": 0.995, "model_loss": 1e-4, "model_params": 1e-3}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a = (a.to_dense() if a.is_sparse else a).detach().float().cpu()
    b = (b.to_dense() if b.is_sparse else b).detach().float().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def sync_time(fn, repeats: int = 10, warmup: int = 3) -> float:
    """Median seconds of fn() on the GPU, synchronised around each call."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def layer_grads(layer: PEER, x: torch.Tensor, dy: torch.Tensor) -> dict[str, torch.Tensor]:
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    y, r = layer(x, return_retrieval=True)
    y.backward(dy)
    return {"y": y, "ids": r.ids, "x": x.grad, **{n: p.grad for n, p in layer.named_parameters()}}


def check_layer(dev: torch.device) -> dict:
    torch.manual_seed(0)
    ref = PEER(PEERConfig(**STANDARD), impl="naive").train()
    gpu = copy.deepcopy(ref).to(dev)
    gpu.impl = "fast"
    x, dy = torch.randn(1024, 256), torch.randn(1024, 256)
    a, b = layer_grads(gpu, x.to(dev), dy.to(dev)), layer_grads(ref, x, dy)
    out = {"ids_match": float((a.pop("ids").cpu() == b.pop("ids")).float().mean())}
    out.update({f"rel_{name}": rel(a[name], b[name]) for name in b})
    with torch.no_grad(), autocast("bf16", dev):
        out["rel_y_bf16"] = rel(gpu(x.to(dev)), b["y"])
    out["ok"] = (
        out["ids_match"] >= TOL["ids_match"]
        and all(v < TOL["layer_fp32"] for k, v in out.items() if k.startswith("rel_") and k != "rel_y_bf16")
        and out["rel_y_bf16"] < TOL["layer_bf16"]
    )
    return out


def check_model(dev: torch.device) -> dict:
    torch.manual_seed(0)
    ref = LanguageModel(ModelConfig()).train()
    gpu = copy.deepcopy(ref).to(dev)
    idx = torch.randint(0, 256, (4, ref.config.context + 1))
    losses = []
    for model, device in ((ref, "cpu"), (gpu, dev)):
        opt = build_optimizer(model, lr=1e-3, weight_decay=0.01)
        batch = idx.to(device)
        loss = model(batch[:, :-1], batch[:, 1:])[1]
        loss.backward()
        opt.step()
        losses.append(float(loss))
    params = {n: rel(p, q) for (n, p), (_, q) in zip(gpu.named_parameters(), ref.named_parameters(), strict=True)}
    worst = max(params, key=params.get)
    out = {"loss_cpu": losses[0], "loss_gpu": losses[1], "rel_loss": abs(losses[1] - losses[0]) / abs(losses[0])}
    out.update({"worst_param": worst, "rel_worst_param": params[worst]})
    out["ok"] = out["rel_loss"] < TOL["model_loss"] and params[worst] < TOL["model_params"]
    return out


def fwd_bwd(module: nn.Module, x: torch.Tensor, dy: torch.Tensor, bf16: bool):
    def run():
        module.zero_grad(set_to_none=True)
        with autocast("bf16" if bf16 else "fp32", x.device):
            y = module(x)
        y.backward(dy.to(y.dtype))

    return run


def time_layer(dev: torch.device, quick: bool) -> list[dict]:
    rows = []
    torch.manual_seed(0)
    ffn = nn.Sequential(nn.Linear(256, 1024), nn.GELU(), nn.Linear(1024, 256)).to(dev)
    peer = PEER(PEERConfig(**STANDARD)).to(dev).train()
    for tokens in (1024,) if quick else (1024, 16384):
        x = torch.randn(tokens, 256, device=dev, requires_grad=True)
        dy = torch.randn(tokens, 256, device=dev)
        for bf16 in (False, True):
            t_ffn = sync_time(fwd_bwd(ffn, x, dy, bf16))
            t_peer = sync_time(fwd_bwd(peer, x, dy, bf16))
            rows.append(
                {
                    "tokens": tokens,
                    "dtype": "bf16 autocast" if bf16 else "fp32",
                    "ffn_tokens_per_s": tokens / t_ffn,
                    "peer_tokens_per_s": tokens / t_peer,
                    "peer_vs_ffn": t_ffn / t_peer,
                }
            )
    return rows


def time_steps(dev: torch.device, quick: bool) -> list[dict]:
    rows = []
    configs = [(256, 1024, True), (128, 1024, True), (128, 2048, False)]
    if quick:
        configs = [(256, 128, True)]
    free = torch.cuda.mem_get_info(dev)[0]
    for dim, n, dense in configs:
        row = {"dim": dim, "N": n * n}
        if 2 * n * n * dim * 4 * 4.5 > free:
            rows.append({**row, "skipped": "not enough GPU memory"})
            continue
        for kind in ("sparse", "dense") if dense else ("sparse",):
            torch.manual_seed(0)
            layer = PEER(PEERConfig(dim=dim, num_subkeys=n, heads=8, topk=16, dim_key=128)).to(dev).train()
            if kind == "dense":
                layer.sparse_grad = False
                opt = torch.optim.AdamW(layer.parameters(), lr=1e-3, weight_decay=0.01)
            else:
                opt = build_optimizer(layer, lr=1e-3, weight_decay=0.01)
            x, dy = torch.randn(1024, dim, device=dev), torch.randn(1024, dim, device=dev)

            def step(layer=layer, opt=opt, x=x, dy=dy):
                opt.zero_grad(set_to_none=True)
                layer(x).backward(dy)
                opt.step()

            step()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(dev)
            base = torch.cuda.memory_allocated(dev) - 4 * layer.U.numel() * layer.U.element_size()  # less U, V, m, v
            row[f"{kind}_ms"] = 1e3 * sync_time(step, repeats=5, warmup=1)
            if kind == "sparse":
                uv = 2 * layer.U.numel() * layer.U.element_size()
                row["peak_over_uv"] = (torch.cuda.max_memory_allocated(dev) - max(base, 0)) / uv
            del layer, opt, x, dy, step
            torch.cuda.empty_cache()
        if "dense_ms" in row:
            row["dense_over_sparse"] = row["dense_ms"] / row["sparse_ms"]
        rows.append(row)
    return rows


def time_model(dev: torch.device) -> dict:
    out = {}
    for name, blocks, precision in (
        ("dense", "none", "fp32"),
        ("peer", "middle", "fp32"),
        ("peer_bf16", "middle", "bf16"),
    ):
        torch.manual_seed(0)
        model = LanguageModel(ModelConfig(peer_blocks=blocks)).to(dev).train()
        opt = build_optimizer(model, lr=1e-3)
        idx = torch.randint(0, 256, (16, model.config.context + 1), device=dev)

        def step(model=model, opt=opt, idx=idx, precision=precision):
            opt.zero_grad(set_to_none=True)
            with autocast(precision, dev):  # as the trainer's step
                loss = model(idx[:, :-1], idx[:, 1:])[1]
            loss.backward()
            opt.step()

        out[f"{name}_tokens_per_s"] = 16 * model.config.context / sync_time(step, repeats=5)
    out["peer_vs_dense"] = out["peer_tokens_per_s"] / out["dense_tokens_per_s"]
    return out


def print_report(res: dict) -> None:
    print(f"\nGPU: {res['gpu']}")
    for name in ("layer", "steps", "model"):
        if isinstance(res[name], dict) and "error" in res[name]:
            print(f"{name}: ERROR {res[name]['error']}")
            res = {**res, name: [] if name != "model" else None}
    for name in ("layer_check", "model_check"):
        c = res[name]
        details = ", ".join(f"{k} {v:.2e}" if isinstance(v, float) else f"{k} {v}" for k, v in c.items() if k != "ok")
        print(f"{name:<12} {'PASS' if c['ok'] else 'FAIL'}  {details}")
    print(f"\n{'tokens':>7} {'dtype':<14}{'FFN tok/s':>12}{'PEER tok/s':>12}{'× FFN':>7}")
    for r in res["layer"]:
        print(
            f"{r['tokens']:>7} {r['dtype']:<14}{r['ffn_tokens_per_s']:>12,.0f}{r['peer_tokens_per_s']:>12,.0f}"
            f"{r['peer_vs_ffn']:>7.2f}"
        )
    print(f"\n{'dim':>4}{'N':>12}{'sparse ms':>11}{'dense ms':>10}{'dense/sparse':>14}{'peak/UV':>9}")
    for r in res["steps"]:
        if "skipped" in r:
            print(f"{r['dim']:>4}{r['N']:>12,}  skipped: {r['skipped']}")
            continue
        dense = f"{r['dense_ms']:>10.1f}{r['dense_over_sparse']:>14.2f}" if "dense_ms" in r else f"{'-':>10}{'-':>14}"
        print(f"{r['dim']:>4}{r['N']:>12,}{r['sparse_ms']:>11.1f}{dense}{r['peak_over_uv']:>9.2f}")
    m = res["model"]
    if m is None:
        return
    print(
        f"\nLanguageModel step (batch 16 × 256): dense {m['dense_tokens_per_s']:,.0f} tok/s, "
        f"PEER {m['peer_tokens_per_s']:,.0f} tok/s ({m['peer_vs_dense']:.2f}×), "
        f"PEER under bf16 autocast {m['peer_bf16_tokens_per_s']:,.0f} tok/s"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="JSON output path")
    ap.add_argument("--quick", action="store_true", help="small timings only (a smoke run)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: torch sees no CUDA device", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = False  # compare fp32 with fp32
    torch.backends.cudnn.allow_tf32 = False
    res: dict = {"command": " ".join(["benchmarks/gpu_check.sh", *sys.argv[1:]]), "machine": info()}
    res["gpu"] = torch.cuda.get_device_name(dev)
    res["tolerances"] = TOL
    steps = [
        ("layer_check", check_layer),
        ("model_check", check_model),
        ("layer", lambda d: time_layer(d, args.quick)),
        ("steps", lambda d: time_steps(d, args.quick)),
        ("model", time_model),
    ]
    for name, fn in steps:
        t0 = time.perf_counter()
        print(f"gpu_check: {name} …", file=sys.stderr, flush=True)
        try:
            res[name] = fn(dev)
        except Exception as exc:  # report and go on: one broken stage must not hide the others
            res[name] = {"error": f"{type(exc).__name__}: {exc}", "ok": False}
        print(f"gpu_check: {name} done in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
        if args.out:  # partial results survive a timeout
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(res, indent=2))
    print_report(res)
    ok = all(not (isinstance(res[n], dict) and "error" in res[n]) for n, _ in steps)
    ok = ok and res["layer_check"]["ok"] and res["model_check"]["ok"]
    print(
        f"\ngpu_check: {'all checks passed' if ok else 'CHECKS FAILED'}" + (f"; wrote {args.out}" if args.out else "")
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
