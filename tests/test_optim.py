"""The row-sparse, masked optimizer (issue 2): frozen rows bit-identical, lazy rows untouched."""

import torch

from lifelong_peer import LanguageModel, ModelConfig, PEERConfig
from lifelong_peer.optim import build_optimizer


def tiny_model(seed=0) -> LanguageModel:
    torch.manual_seed(seed)
    cfg = ModelConfig(dim=32, layers=2, heads=2, context=16, peer=PEERConfig(num_subkeys=8, heads=2, topk=2, dim_key=8))
    return LanguageModel(cfg)


def batch(seed=0, vocab=256):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (4, 17), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def train(model, opt, steps, seed=0):
    for s in range(steps):
        x, y = batch(seed + s)
        opt.zero_grad()
        _, loss = model(x, y)
        loss.backward()
        opt.step()


def test_frozen_rows_bit_identical_with_weight_decay_and_momentum():
    model = tiny_model()
    layer = model.peer_layers()[0]
    opt = build_optimizer(model, lr=1e-2, weight_decay=0.1)
    train(model, opt, 3)  # build up momentum on many rows first
    frozen = torch.arange(0, layer.num_experts, 2)
    layer.freeze(frozen, subkeys=True)
    before = {k: v.detach().clone() for k, v in layer.state_dict().items()}
    moments = {k: v.clone() for k, v in opt.state[layer.U].items()}
    train(model, opt, 15, seed=100)
    after = layer.state_dict()
    for name in ("U", "V"):
        assert torch.equal(after[name][frozen], before[name][frozen])
        unfrozen = layer.frozen.logical_not().nonzero().flatten()
        assert not torch.equal(after[name][unfrozen], before[name][unfrozen])
    mask = layer.frozen_subkeys
    assert torch.equal(after["subkeys"][mask], before["subkeys"][mask])
    for key in ("exp_avg", "exp_avg_sq", "step"):
        assert torch.equal(opt.state[layer.U][key][frozen], moments[key][frozen])


def test_rows_never_retrieved_are_untouched():
    model = tiny_model()
    layer = model.peer_layers()[0]
    layer.grow(8)  # 256 experts, a few batches use only some of them
    opt = build_optimizer(model, lr=1e-2, weight_decay=0.1)
    before = layer.U.detach().clone(), layer.V.detach().clone()
    used = set()
    hook = layer.register_forward_hook(lambda m, inp, out: used.update(m.retrieve(inp[0])[1].flatten().tolist()))
    train(model, opt, 2)
    hook.remove()
    unused = torch.tensor(sorted(set(range(layer.num_experts)) - used))
    assert len(unused) > 0
    assert torch.equal(layer.U[unused], before[0][unused]) and torch.equal(layer.V[unused], before[1][unused])
    used_t = torch.tensor(sorted(used))
    assert (layer.U[used_t] != before[0][used_t]).any(dim=1).all()


def test_row_update_equals_dense_adamw_on_touched_rows():
    """With every row touched each step and no freezing, lazy Adam == torch AdamW."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(5, 3))
    ref = torch.nn.Parameter(w.detach().clone())
    from lifelong_peer.optim import PEEROptimizer

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.U = w

        def row_masks(self):
            return {"U": torch.zeros(5, dtype=torch.bool)}

    holder = Holder()
    opt = PEEROptimizer([], [{"sources": [(holder, "U")], "lr": 0.1, "weight_decay": 0.01}], lr=0.1)
    ref_opt = torch.optim.AdamW([ref], lr=0.1, weight_decay=0.01)
    for s in range(5):
        g = torch.randn(5, 3, generator=torch.Generator().manual_seed(s))
        w.grad, ref.grad = g.clone(), g.clone()
        opt.step()
        ref_opt.step()
    torch.testing.assert_close(w, ref, rtol=1e-5, atol=1e-6)


def test_optimizer_survives_growth_and_keeps_state():
    model = tiny_model()
    layer = model.peer_layers()[0]
    opt = build_optimizer(model, lr=1e-2)
    train(model, opt, 2)
    m_before = opt.state[layer.U]["exp_avg"].clone()
    step_before = opt.state[layer.U]["step"].clone()
    N_old = layer.num_experts
    model.grow(4)
    train(model, opt, 2, seed=50)
    state = opt.state[layer.U]
    assert state["exp_avg"].shape == layer.U.shape
    untouched = state["step"][:N_old] == step_before
    assert 0 < untouched.sum() < N_old
    assert torch.equal(state["exp_avg"][:N_old][untouched], m_before[untouched])


def test_clip_grad_norm_counts_sparse_rows_once():
    model = tiny_model()
    opt = build_optimizer(model, lr=1e-2)
    x, y = batch()
    _, loss = model(x, y)
    loss.backward()
    dense = {n: (p.grad.to_dense() if p.grad.is_sparse else p.grad).clone() for n, p in model.named_parameters()}
    expected = torch.linalg.vector_norm(torch.stack([g.norm() for g in dense.values()]))
    total = opt.clip_grad_norm_(1e-3)
    torch.testing.assert_close(total, expected)
    clipped = torch.linalg.vector_norm(
        torch.stack([(p.grad.to_dense() if p.grad.is_sparse else p.grad).norm() for p in model.parameters()])
    )
    torch.testing.assert_close(clipped, torch.tensor(1e-3), rtol=1e-3, atol=0)


def _peer_train(layer, opt, steps, seed):
    for s in range(steps):
        g = torch.Generator().manual_seed(seed + s)
        x, dy = torch.randn(24, 16, generator=g), torch.randn(24, 16, generator=g)
        opt.zero_grad()
        layer(x).backward(dy)
        opt.step()


def test_training_after_growth_equals_a_layer_built_at_the_bigger_size():
    """Issue 8: growth extends the Adam state in place without writing the new rows' moments; training
    must match a layer built directly at the grown size with the same rows and zero moments there."""
    from lifelong_peer import PEER
    from lifelong_peer.peer import extend_rows

    torch.manual_seed(0)
    cfg = PEERConfig(dim=16, num_subkeys=6, heads=2, topk=3, dim_key=8)
    grown = PEER(cfg).train()
    opt = build_optimizer(grown, lr=1e-2, weight_decay=0.1)
    _peer_train(grown, opt, 3, seed=0)
    grown.freeze(list(range(0, 36, 3)), subkeys=True)
    state = opt.state[grown.U]
    moments = {key: state[key].clone() for key in state}
    for key in ("exp_avg", "exp_avg_sq"):  # poison the spare rows: growth must never read them
        extend_rows(state[key], 64)[36:].fill_(float("nan"))
    ptr = state["exp_avg"].data_ptr()
    grown.grow(2)
    _peer_train(grown, opt, 1, seed=10)  # the optimizer re-binds and extends its state here
    state = opt.state[grown.U]
    assert state["exp_avg"].data_ptr() == ptr and state["exp_avg"].shape == (64, 16)  # in place
    frozen = grown.frozen[:36]
    for key, before in moments.items():  # frozen rows' moments bit-identical across growth
        assert torch.equal(state[key][:36][frozen], before[frozen]), key

    saved = opt.state_tensors(dict(grown.named_parameters()))
    assert saved["U::exp_avg"].shape == (64, 16) and torch.isfinite(saved["U::exp_avg"]).all()
    direct = PEER(PEERConfig(**grown.config.to_dict())).train()
    direct.load_state_dict(grown.state_dict())
    opt_direct = build_optimizer(direct, lr=1e-2, weight_decay=0.1)
    opt_direct.load_state_tensors(dict(direct.named_parameters()), saved)
    U_frozen = grown.U[grown.frozen].clone()
    _peer_train(grown, opt, 3, seed=20)
    _peer_train(direct, opt_direct, 3, seed=20)
    for name, p in grown.named_parameters():
        assert torch.equal(p, dict(direct.named_parameters())[name]), name
    used = opt.state[grown.V]["step"] > 0
    assert torch.isfinite(grown.U).all() and torch.isfinite(opt.state[grown.V]["exp_avg_sq"][used]).all()
    assert torch.equal(grown.U[grown.frozen], U_frozen)
    assert (opt.state[grown.U]["step"][36:] > 0).any(), "no new expert was trained"
