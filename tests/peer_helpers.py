"""Shared checks of a PEER implementation against the naive reference (fast path and native kernels)."""

from __future__ import annotations

import copy

import torch

from lifelong_peer import PEER, PEERConfig
from lifelong_peer.optim import build_optimizer


@torch.no_grad()
def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a = a.to_dense() if a.is_sparse else a
    b = b.to_dense() if b.is_sparse else b
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


#: PEERConfig overrides every implementation is checked under: norms, activations, k, heads, pool size.
LAYER_VARIANTS = [
    {},
    {"query_norm": "layernorm", "activation": "relu"},
    {"query_norm": "none", "topk": 9, "heads": 1},
    {"num_subkeys": 40, "topk": 16, "heads": 8},
]


def pair(impl: str, seed=0, **kw) -> tuple[PEER, PEER]:
    """Two copies of one random layer: (``impl``, naive)."""
    torch.manual_seed(seed)
    cfg = {"dim": 24, "num_subkeys": 9, "heads": 3, "topk": 5, "dim_key": 12, **kw}
    layer = PEER(PEERConfig(**cfg), impl=impl)
    with torch.no_grad():  # random v for grown experts too, so every gradient is non-trivial
        layer.V.normal_()
    naive = copy.deepcopy(layer)
    naive.impl = "naive"
    return layer, naive


def forward_backward(layer: PEER, x: torch.Tensor, dy: torch.Tensor) -> dict[str, torch.Tensor]:
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    y, retrieval = layer(x, return_retrieval=True)
    y.backward(dy)
    return {"y": y.detach(), "ids": retrieval.ids, "x": x.grad, **{n: p.grad for n, p in layer.named_parameters()}}


def assert_same(layer: PEER, naive: PEER, x: torch.Tensor, run_layer=None) -> None:
    """Same retrieved ids, outputs and every gradient (rel. error < 1e-5, same sparsity) as the reference.

    ``run_layer(fn)`` wraps the tested layer's pass (e.g. to count kernel calls)."""
    dy = torch.randn_like(x)
    a = run_layer(lambda: forward_backward(layer, x, dy)) if run_layer else forward_backward(layer, x, dy)
    b = forward_backward(naive, x, dy)
    assert a.keys() == b.keys() and {"y", "x", "query.weight", "subkeys", "U", "V"} <= a.keys()
    assert torch.equal(a.pop("ids"), b.pop("ids"))
    for name in a:
        assert a[name] is not None, name
        assert rel_err(a[name], b[name]) < 1e-5, name
        assert a[name].is_sparse == b[name].is_sparse, name


def assert_same_before_and_after_growth(impl: str, kw: dict, sparse: bool, x: torch.Tensor, check=assert_same) -> None:
    """``check(layer, naive, x)`` on a layer with frozen experts and sub-keys, then again after growth."""
    layer, naive = pair(impl, **kw)
    layer.sparse_grad = naive.sparse_grad = sparse
    layer.freeze(torch.arange(0, layer.num_experts, 3), subkeys=True)
    naive.load_state_dict(layer.state_dict())
    check(layer, naive, x)
    for m in (layer, naive):
        torch.manual_seed(1)
        m.grow(4)
        with torch.no_grad():  # grown experts with non-zero v, so their gradients are non-trivial
            m.V[-20:].normal_()
    check(layer, naive, x)


def assert_trains_like_naive_with_frozen_rows_bit_identical(impl: str) -> None:
    layer, naive = pair(impl, num_subkeys=12)
    frozen = torch.arange(0, layer.num_experts, 2)
    start = layer.U.detach().clone(), layer.V.detach().clone()
    for m in (layer, naive):
        m.freeze(frozen)
    opts = [build_optimizer(m, lr=1e-2, weight_decay=0.1) for m in (layer, naive)]
    for step in range(4):
        x = torch.randn(16, 24, generator=torch.Generator().manual_seed(step))
        for m, opt in zip((layer, naive), opts, strict=True):
            opt.zero_grad()
            m(x).square().mean().backward()
            opt.step()
    for name in ("U", "V", "subkeys", "query.weight"):
        assert rel_err(layer.get_parameter(name), naive.get_parameter(name)) < 1e-5, name
    assert torch.equal(layer.U[frozen], start[0][frozen]) and torch.equal(layer.V[frozen], start[1][frozen])
    assert not torch.equal(layer.U, start[0])


#: a two-block language model with PEER in both blocks (so a layer option matters) that trains in seconds,
#: and the three years of words its tiny streams are written from (test_use, test_index_cli)
TINY_LM = {
    "dim": 32,
    "layers": 2,
    "heads": 2,
    "context": 32,
    "peer_blocks": "all",
    "peer": {"num_subkeys": 8, "heads": 2, "topk": 4, "dim_key": 16},
}
TOY_WORDS = {2001: "the peer expert stream", 2002: "time slice and of", 2003: "model growth frozen keys"}


def toy_workspace(root, words=("peer", "expert", "time", "slice"), per_year: int = 30, name: str = "ws"):
    """A workspace ``root/name`` with stream ``toy``: ``per_year`` documents of 40 random ``words`` in each of
    2001 and 2002 (seed 0), written to ``root/docs.jsonl`` and split 60/20/20."""
    import json

    import numpy as np

    from lifelong_peer.streams import ingest
    from lifelong_peer.workspace import Workspace

    rng = np.random.default_rng(0)
    lines = [
        json.dumps({"text": " ".join(rng.choice(list(words), 40)), "time": f"{y}-0{1 + d % 9}-01"})
        for y in (2001, 2002)
        for d in range(per_year)
    ]
    (root / "docs.jsonl").write_text("\n".join(lines) + "\n")
    ws = Workspace.init(root / name)
    ingest(ws, str(root / "docs.jsonl"), "toy", split=(0.6, 0.2, 0.2))
    return ws
