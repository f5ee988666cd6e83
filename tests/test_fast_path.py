"""The fast PEER path (``lifelong_peer.peer_ops``, issue 8) against the naive reference path."""

import pytest
import torch
from peer_helpers import (
    LAYER_VARIANTS,
    assert_same_before_and_after_growth,
    assert_trains_like_naive_with_frozen_rows_bit_identical,
    pair,
)

from lifelong_peer import PEER, PEERConfig
from lifelong_peer.peer_ops import SubkeyTopK, expert_mix, product_key_topk


@pytest.mark.parametrize("kw", LAYER_VARIANTS)
@pytest.mark.parametrize("sparse", [True, False])
def test_fast_equals_naive_outputs_and_gradients_before_and_after_growth(kw, sparse):
    assert_same_before_and_after_growth("fast", kw, sparse, torch.randn(2, 7, 24))


def test_fast_and_naive_train_alike_and_frozen_rows_stay_bit_identical():
    assert_trains_like_naive_with_frozen_rows_bit_identical("fast")


@pytest.mark.parametrize("n,k", [(1, 1), (5, 1), (5, 5), (16, 4), (33, 16)])
def test_pruned_grid_topk_equals_full_grid(n, k):
    g = torch.Generator().manual_seed(n * k)
    q, subkeys = torch.randn(50, 3, 8, generator=g), torch.randn(n, 2, 4, generator=g)
    scores, i, j = product_key_topk(q, subkeys, k)
    s1, s2 = q[..., :4] @ subkeys[:, 0].T, q[..., 4:] @ subkeys[:, 1].T  # (50, 3, n)
    full = (s1.unsqueeze(-1) + s2.unsqueeze(-2)).flatten(-2)  # (…, n·n), index i·n + j
    ref_scores, ref_flat = full.topk(k, dim=-1)
    torch.testing.assert_close(scores, ref_scores, rtol=0, atol=1e-5)
    assert torch.equal(i * n + j, ref_flat)


def test_subkey_topk_sparse_backward_equals_dense_backward():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 30, 3, 10, generator=g, dtype=torch.double).requires_grad_()
    subkeys = torch.randn(12, 2, 5, generator=g, dtype=torch.double).requires_grad_()
    dy = torch.randn(2, 30, 3, 4, generator=g, dtype=torch.double)
    grads = []
    for sparse in (True, False):
        scores, _, _ = product_key_topk(q, subkeys, 4, sparse_backward=sparse)
        grads.append(torch.autograd.grad(scores, [q, subkeys], dy))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    fn = lambda q, subkeys: SubkeyTopK.apply(q, subkeys[:, 0], 4)[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q[0, :, 0, :5].detach().requires_grad_(), subkeys), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("activation", ["gelu", "relu"])
@pytest.mark.parametrize("N", [5, 9])  # S > N takes the gather fallback, S ≤ N sampled_addmm
def test_expert_mix_gradcheck_float64(activation, N):
    g = torch.Generator().manual_seed(0)
    T, S, D = 4, 6, 3
    ids = torch.randint(0, N, (T, S), generator=g)
    ids[:, 1] = ids[:, 0]  # ids repeat within a token (two heads retrieving one expert) and across tokens
    x, gates = torch.randn(T, D, generator=g, dtype=torch.double), torch.rand(T, S, generator=g, dtype=torch.double)
    U, V = torch.randn(N, D, generator=g, dtype=torch.double), torch.randn(N, D, generator=g, dtype=torch.double)
    inputs = [t.requires_grad_() for t in (x, gates, U, V)]

    def fn(x, gates, U, V):
        return expert_mix(x, ids, gates, U, V, activation, False)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7)


def test_expert_mix_sparse_gradients_are_compact_and_coalesced():
    g = torch.Generator().manual_seed(0)
    ids = torch.tensor([[7, 2, 7], [2, 9, 9]])
    x, gates = torch.randn(2, 4, generator=g), torch.rand(2, 3, generator=g)
    U, V = (torch.randn(20, 4, generator=g).requires_grad_() for _ in range(2))
    for grad in torch.autograd.grad(expert_mix(x, ids, gates, U, V, "gelu", True).sum(), [U, V]):
        assert grad.is_sparse and grad.is_coalesced()
        assert grad.indices()[0].tolist() == [2, 7, 9]  # one row per distinct expert, sorted


def test_fast_path_handles_no_tokens():
    fast, naive = pair("fast", query_norm="layernorm")
    x = torch.randn(0, 24, requires_grad=True)
    y = fast(x)
    assert y.shape == (0, 24) and torch.equal(y, naive(x))
    y.sum().backward()


def test_bad_impl_is_rejected():
    with pytest.raises(ValueError, match="impl"):
        PEER(PEERConfig(dim=8, num_subkeys=4, topk=2, dim_key=4), impl="turbo")
