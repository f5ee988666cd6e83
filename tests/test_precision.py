"""bf16 autocast training (issue 9, ``TrainConfig.precision``), checked on CPU where autocast to
bf16 exists too: the PEER fast path runs under it with gradients in the parameters' dtype, a run
trains to nearly the fp32 losses, and weights, optimizer state and checkpoints stay float32."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import MemoryStream

from lifelong_peer import PEERConfig
from lifelong_peer.checkpoint import load_tensors
from lifelong_peer.config import RunConfig, TrainConfig, resolve_config
from lifelong_peer.errors import UserError
from lifelong_peer.model import ModelConfig
from lifelong_peer.peer import PEER
from lifelong_peer.run import create_run, open_run
from lifelong_peer.train import autocast, run_phases
from lifelong_peer.workspace import Workspace

TINY = ModelConfig(dim=32, layers=2, heads=2, context=32, peer=PEERConfig(num_subkeys=8, heads=2, topk=4, dim_key=16))
SLICES = ("a", "b")


def test_precision_choices():
    cpu = torch.device("cpu")
    with autocast("auto", cpu):  # auto: fp32 on CPU
        assert not torch.is_autocast_enabled("cpu")
    with autocast("fp32", cpu):
        assert not torch.is_autocast_enabled("cpu")
    with autocast("bf16", cpu):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    with pytest.raises(UserError, match="precision"):
        TrainConfig(precision="fp16")


def test_peer_fast_path_under_autocast_gives_fp32_gradients():
    """x arrives in bf16 (as from an autocast matmul); the sub-key scores are bf16 inside."""
    torch.manual_seed(0)
    layer = PEER(PEERConfig(dim=32, num_subkeys=16, heads=2, topk=4, dim_key=16)).train()
    x = torch.randn(64, 32)

    def grads(bf16: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        layer.zero_grad(set_to_none=True)
        with autocast("bf16" if bf16 else "fp32", torch.device("cpu")):
            y = layer(x.to(torch.bfloat16) if bf16 else x)
            loss = y.float().pow(2).mean()
        loss.backward()
        return loss.detach(), {n: p.grad.to_dense() for n, p in layer.named_parameters()}

    loss32, g32 = grads(False)
    loss16, g16 = grads(True)
    assert all(p.grad.dtype == torch.float32 for p in layer.parameters())
    assert layer.U.grad.is_sparse and layer.V.grad.is_sparse
    # bf16 keeps ~3 digits: the rounded input x changes ~6% of the top-k choices here, which moves
    # the output and gradients by ~10% (relative norm); a broken cast or scale would move them by ~100%
    torch.testing.assert_close(loss16, loss32, rtol=0.1, atol=0)
    for name in g32:
        rel = (g16[name] - g32[name]).norm() / g32[name].norm()
        assert rel < 0.2, (name, float(rel))


def test_router_runs_in_fp32_under_autocast():
    """Retrieval ignores autocast (peer.py): an fp32 input picks exactly the fp32 experts and gates."""
    torch.manual_seed(0)
    layer = PEER(PEERConfig(dim=64, num_subkeys=32, heads=4, topk=8, dim_key=32)).train()
    x = torch.randn(256, 64)
    _, r32 = layer(x, return_retrieval=True)
    with autocast("bf16", torch.device("cpu")):
        _, r16 = layer(x, return_retrieval=True)
    assert torch.equal(r16.ids, r32.ids)
    assert r16.gates.dtype == torch.float32 and torch.equal(r16.gates, r32.gates)


def _run(root, run_id: str, precision: str, progress=None):
    ws = Workspace.open(root) if root.exists() else Workspace.init(root)
    opts = {"steps": 4, "batch_size": 4, "eval_tokens": 256, "usage_tokens": 256, "warmup": 1, "base_steps": 2}
    opts |= {"checkpoint_every": 2, "precision": precision}
    model, train = resolve_config("lifelong-grow", opts, TINY)  # base training, growth and freezing included
    stream = MemoryStream(slices=SLICES)
    cfg = RunConfig(run=run_id, stream=stream.name, slices=list(SLICES), model=model, train=train)
    run = create_run(ws, cfg, stream=stream)
    run_phases(run, progress=progress)
    return run


def _losses(run_dir) -> list[float]:
    return [json.loads(x)["loss"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _final(run_dir) -> dict[str, torch.Tensor]:
    tensors, _ = load_tensors(run_dir / "checkpoints" / f"phase-{len(SLICES) - 1:03d}.safetensors")
    return tensors


def test_bf16_run_trains_like_fp32_stores_fp32_and_resumes_exactly(tmp_path):
    root = tmp_path / "ws"
    fp32, bf16 = _run(root, "fp32", "fp32"), _run(root, "bf16", "bf16")
    # autocast really ran (the losses differ) and costs only rounding
    assert _losses(bf16.dir) != _losses(fp32.dir)
    torch.testing.assert_close(_losses(bf16.dir), _losses(fp32.dir), rtol=2e-2, atol=0)
    assert all(p.dtype == torch.float32 for p in bf16.model.parameters())

    def crash(event):
        if event["event"] == "step" and (event["phase"], event["step"]) == (1, 3):
            raise SystemExit("killed")

    with pytest.raises(SystemExit):
        _run(root, "broken", "bf16", progress=crash)
    # the mid-phase checkpoint (phase 1, step 2) holds float32 weights and optimizer moments
    (path,) = (root / "runs" / "broken" / "checkpoints").glob("phase-001-step-*.safetensors")
    tensors, _ = load_tensors(path)
    assert any(k.startswith("opt::") for k in tensors) and any(k.startswith("model::") for k in tensors)
    assert all(
        v.dtype == torch.float32
        for k, v in tensors.items()
        if k.split("::")[0] in ("model", "opt") and v.is_floating_point()
    )
    assert torch.bfloat16 not in {v.dtype for v in tensors.values()}
    # resumed from it, the run ends bit-identical to the uninterrupted bf16 run
    resumed = open_run(Workspace.open(root), "broken", stream=MemoryStream(slices=SLICES))
    run_phases(resumed)
    want, got = _final(bf16.dir), _final(resumed.dir)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert _losses(resumed.dir) == _losses(bf16.dir)
