"""The PEER layer against slow, obvious references (issue 2)."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from lifelong_peer import PEER, PEERConfig
from lifelong_peer.peer import ROW_HEADROOM, empty_rows, extend_rows, id_of, pair_of


def brute_force(layer: PEER, x: torch.Tensor):
    """Every expert's score q1·c_i + q2·c'_j built by hand from the pair of each id, then a full top-k."""
    c = layer.config
    q = layer.queries(x)  # (T, h, dk)
    half = c.dim_key // 2
    n = c.num_subkeys
    s1 = torch.einsum("thd,nd->thn", q[..., :half], layer.subkeys[:, 0])
    s2 = torch.einsum("thd,nd->thn", q[..., half:], layer.subkeys[:, 1])
    scores = torch.empty(x.shape[0], c.heads, n * n, dtype=x.dtype)
    for i in range(n):
        for j in range(n):
            scores[..., int(id_of(torch.tensor(i), torch.tensor(j)))] = s1[..., i] + s2[..., j]
    return scores.topk(c.topk, dim=-1)


def dense_reference(layer: PEER, x: torch.Tensor) -> torch.Tensor:
    """f(x) = Σ_heads Σ_{i∈topk} softmax(scores)_i · σ(u_i·x) v_i over brute-force top-k (Eq. 6–8)."""
    scores, ids = brute_force(layer, x)
    gates = scores.softmax(-1)  # (T, h, k)
    act = F.gelu if layer.config.activation == "gelu" else F.relu
    hidden = act(torch.einsum("thkd,td->thk", layer.U[ids], x))
    return torch.einsum("thk,thkd->td", gates * hidden, layer.V[ids])


def make(n=6, h=2, k=3, dim=16, dk=8, **kw) -> PEER:
    torch.manual_seed(n * 100 + h * 10 + k)
    return PEER(PEERConfig(dim=dim, num_subkeys=n, heads=h, topk=k, dim_key=dk, **kw)).eval()


@pytest.mark.parametrize("n,h,k", [(4, 1, 1), (5, 2, 3), (8, 4, 8), (11, 3, 5)])
def test_retrieve_equals_brute_force_before_and_after_growth(n, h, k):
    layer = make(n, h, k)
    x = torch.randn(20, 16)
    for _ in range(2):
        scores, ids = layer.retrieve(x)
        ref_scores, ref_ids = brute_force(layer, x)
        torch.testing.assert_close(scores, ref_scores, rtol=1e-5, atol=1e-5)
        assert torch.equal(ids, ref_ids)
        assert (scores[..., :-1] >= scores[..., 1:]).all()
        layer.grow(3)


def test_all_scores_match_brute_force_and_forward_matches_dense():
    layer = make(7, 2, 4, query_norm="layernorm", activation="relu")
    x = torch.randn(12, 16)
    ref = torch.topk(layer.all_scores(x), 4, dim=-1)
    torch.testing.assert_close(ref.values, brute_force(layer, x).values)
    torch.testing.assert_close(layer(x), dense_reference(layer, x), rtol=1e-5, atol=1e-6)
    layer.grow(2)
    torch.testing.assert_close(layer(x), dense_reference(layer, x), rtol=1e-5, atol=1e-6)


def test_forward_keeps_leading_shape():
    layer = make()
    x = torch.randn(2, 3, 5, 16)
    assert layer(x).shape == x.shape
    scores, ids = layer.retrieve(x)
    assert scores.shape == ids.shape == (2, 3, 5, 2, 3)
    assert layer.all_scores(x).shape == (2, 3, 5, 2, 36)


def test_gradcheck_float64():
    torch.manual_seed(0)
    layer = PEER(PEERConfig(dim=6, num_subkeys=4, heads=2, topk=2, dim_key=4, query_norm="none")).double()
    layer.sparse_grad = False  # gradcheck compares dense Jacobians
    x = torch.randn(3, 6, dtype=torch.double, requires_grad=True)
    params = dict(layer.named_parameters())

    def fn(x, query, subkeys, U, V):
        return torch.func.functional_call(layer, {"query.weight": query, "subkeys": subkeys, "U": U, "V": V}, (x,))

    inputs = (x, *(params[k].detach().clone().requires_grad_() for k in ("query.weight", "subkeys", "U", "V")))
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5)


def test_sparse_gradients_hold_only_retrieved_rows():
    layer = make(6, 2, 3)
    x = torch.randn(4, 16)
    layer(x).sum().backward()
    _, ids = layer.retrieve(x)
    for table in (layer.U, layer.V):
        assert table.grad.is_sparse
        rows = set(table.grad.coalesce().indices()[0].tolist())
        assert rows == set(ids.flatten().tolist())


@given(st.integers(0, 10**12))
def test_pair_of_inverts_id_of(expert_id):
    i, j = pair_of(torch.tensor([expert_id]))
    assert int(id_of(i, j)) == expert_id


def test_shell_order_is_a_bijection_with_appended_ids():
    for n in range(1, 30):
        ii, jj = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
        ids = id_of(ii, jj).flatten()
        assert sorted(ids.tolist()) == list(range(n * n))


@settings(max_examples=25)
@given(st.integers(1, 6), st.lists(st.integers(1, 4), min_size=1, max_size=4))
def test_growth_keeps_old_experts_and_appends_new_ids(n0, steps):
    torch.manual_seed(0)
    layer = PEER(PEERConfig(dim=8, num_subkeys=n0, heads=1, topk=1, dim_key=4)).eval()
    x = torch.randn(5, 8)
    y0 = layer(x)
    for k in steps:
        n_old, N_old = layer.num_subkeys, layer.num_experts
        old = {name: t.detach().clone() for name, t in layer.state_dict().items()}
        new_ids = layer.grow(k)
        assert layer.num_subkeys == layer.config.num_subkeys == n_old + k
        assert torch.equal(new_ids, torch.arange(N_old, (n_old + k) ** 2))
        i, j = pair_of(torch.arange(N_old))
        assert (i < n_old).all() and (j < n_old).all()  # old ids still name old sub-key pairs
        i, j = pair_of(new_ids)
        assert (torch.maximum(i, j) >= n_old).all()
        state = layer.state_dict()
        for name, before in old.items():
            if before.ndim and before.shape[0] in (n_old, N_old) and name not in ("query.weight",):
                assert torch.equal(state[name][: before.shape[0]], before), name
            else:
                assert torch.equal(state[name], before), name
        assert torch.equal(layer.V[N_old:], torch.zeros_like(layer.V[N_old:]))
    # new experts have v = 0: where retrieval is unchanged the output is unchanged
    assert y0.shape == layer(x).shape


def test_growth_with_zero_v_changes_output_only_through_retrieval():
    layer = make(5, 2, 2)
    x = torch.randn(200, 16)
    y0 = layer(x)
    _, ids0 = layer.retrieve(x)
    layer.grow(1)
    _, ids1 = layer.retrieve(x)
    same = (ids0 == ids1).flatten(1).all(dim=1)  # tokens whose retrieved set did not change
    assert 0 < same.sum() < len(x)
    torch.testing.assert_close(layer(x)[same], y0[same], rtol=0, atol=0)


def test_grow_and_freeze_reject_bad_arguments():
    layer = make()
    with pytest.raises(ValueError, match="positive"):
        layer.grow(0)
    with pytest.raises(ValueError, match="shape"):
        layer.grow(2, subkeys=torch.zeros(3, 2, 4))
    with pytest.raises(ValueError, match="expert ids"):
        layer.freeze([layer.num_experts])


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"dim_key": 7}, "even"),
        ({"topk": 9, "num_subkeys": 8}, "at most"),
        ({"heads": 0}, "positive"),
        ({"query_norm": "rms"}, "one of"),
        ({"num_subkeys": 10**6}, "supported"),
    ],
)
def test_config_rejects_nonsense(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PEERConfig(**kwargs)


def test_freeze_marks_experts_and_subkeys():
    layer = make(6)
    ids = torch.tensor([0, 7, 30])
    layer.freeze(ids, subkeys=True)
    assert layer.frozen.nonzero().flatten().tolist() == [0, 7, 30]
    i, j = pair_of(ids)
    assert set(layer.frozen_subkeys[:, 0].nonzero().flatten().tolist()) == set(i.tolist())
    assert set(layer.frozen_subkeys[:, 1].nonzero().flatten().tolist()) == set(j.tolist())
    layer.unfreeze(ids, subkeys=True)
    assert not layer.frozen.any() and not layer.frozen_subkeys.any()
    layer.freeze([1])
    layer.grow(2)
    assert layer.frozen.shape == (64,) and layer.frozen.nonzero().flatten().tolist() == [1]


def test_growth_writes_in_place_while_room_lasts_and_copies_once_after():
    """Issue 8: old rows are neither moved nor copied while the storage has room; past it, one copy."""
    layer = make(6, 2, 3)  # N = 36; CPU tables reserve ROW_HEADROOM × N rows
    start = layer.U.data_ptr(), layer.V.data_ptr()
    U0, V0 = layer.U.detach().clone(), layer.V.detach().clone()
    grown, n = 0, layer.num_subkeys
    while (n + 1) ** 2 <= 36 * ROW_HEADROOM:
        U_param = layer.U
        layer.grow(1)
        n, grown = n + 1, grown + 1
        assert layer.U is not U_param  # a new Parameter object (autograd caches leaf shapes)
        assert (layer.U.data_ptr(), layer.V.data_ptr()) == start  # same storage: no old row copied
    assert grown >= 2
    layer.freeze([0, 5])
    layer.grow(1)  # past the room: one copy into a bigger storage, with room again
    assert layer.U.data_ptr() != start[0]
    assert layer.U.untyped_storage().nbytes() > layer.U.numel() * layer.U.element_size()
    N = layer.num_experts
    assert layer.U.shape == layer.V.shape == (N, 16) and layer.frozen.shape == (N,)
    assert layer.frozen_subkeys.shape == (layer.num_subkeys, 2) and layer.frozen.sum() == 2
    assert torch.equal(layer.U[:36], U0) and torch.equal(layer.V[:36], V0)
    assert not layer.V[36:].any()  # new experts: v = 0
    assert torch.isfinite(layer.U).all() and layer.U[36:].std() > 0
    state = layer.state_dict()  # exactly N rows, also in a checkpoint file
    assert state["U"].shape[0] == state["V"].shape[0] == N


def test_checkpoint_after_growth_holds_exactly_n_rows_and_round_trips(tmp_path):
    from lifelong_peer.checkpoint import load_tensors, save_tensors

    layer = make(5, 2, 2)
    layer.grow(2)
    save_tensors(tmp_path / "p.safetensors", layer.state_dict(), {})
    tensors, _ = load_tensors(tmp_path / "p.safetensors")
    assert tensors["U"].shape == (49, 16) and tensors["frozen"].shape == (49,)
    back = PEER(PEERConfig(**layer.config.to_dict())).eval()
    back.load_state_dict(tensors)
    x = torch.randn(10, 16)
    assert torch.equal(back(x), layer(x))
    back.grow(1)  # a loaded layer grows too (its tables are exact-size copies here: one copy)
    assert torch.equal(back.U[:49], layer.U) and back.num_experts == 64


def test_extend_rows_views_its_storage_when_there_is_room():
    t = empty_rows(3, 2, dtype=torch.float64).fill_(1.0)
    e = extend_rows(t, 5)
    assert e.shape == (5, 2) and e.data_ptr() == t.data_ptr() and torch.equal(e[:3], t)
    exact = torch.ones(3, 2)  # no room behind it: a copy, with room for later growth
    c = extend_rows(exact, 4)
    assert c.data_ptr() != exact.data_ptr() and torch.equal(c[:3], exact)
    assert extend_rows(c, 5).data_ptr() == c.data_ptr()
    with pytest.raises(ValueError):
        extend_rows(t, 2)
