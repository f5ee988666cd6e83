"""The row-sparse, masked optimizer (issue 2): frozen rows bit-identical, lazy rows untouched."""

import pytest
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


# --- compact moments (issue 8): fp32, bf16, rowwise -------------------------------------------------

MOMENT_OPTIONS = ("fp32", "bf16", "rowwise")


class Table(torch.nn.Module):
    """A bare row parameter with a frozen mask, as a PEER layer exposes its tables."""

    def __init__(self, rows=6, width=5, frozen=(1, 4), seed=0):
        super().__init__()
        self.U = torch.nn.Parameter(torch.randn(rows, width, generator=torch.Generator().manual_seed(seed)))
        self.frozen = torch.zeros(rows, dtype=torch.bool)
        self.frozen[list(frozen)] = True

    def row_masks(self):
        return {"U": self.frozen}


def sparse_grads(steps, rows=6, width=5, seed=0):
    """Dense gradients where each step leaves a different set of rows at exactly zero (not used)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        grad = torch.randn(rows, width, generator=g)
        grad[torch.rand(rows, generator=g) < 0.4] = 0
        out.append(grad)
    return out


def reference_lazy_adamw(w0, grads, frozen, option, lr, wd, b1=0.9, b2=0.999, eps=1e-8):
    """Row by row in float64: lazy AdamW with per-row step counts; stored moments rounded as the
    option stores them (bf16: round to nearest), the step computed from the unrounded ones."""
    store = (lambda x: x.to(torch.bfloat16).double()) if option == "bf16" else (lambda x: x.float().double())
    w = w0.double().clone()
    rows, width = w.shape
    m = torch.zeros(rows, width, dtype=torch.float64)
    v = torch.zeros(rows, 1 if option == "rowwise" else width, dtype=torch.float64)
    t = [0] * rows
    for grad in grads:
        grad = grad.double()
        for r in range(rows):
            if frozen[r] or not grad[r].any():
                continue
            t[r] += 1
            g2 = (grad[r] ** 2).mean(0, keepdim=True) if option == "rowwise" else grad[r] ** 2
            mr, vr = b1 * m[r] + (1 - b1) * grad[r], b2 * v[r] + (1 - b2) * g2
            m[r], v[r] = store(mr), store(vr)
            step = (mr / (1 - b1 ** t[r])) / (vr.sqrt() / (1 - b2 ** t[r]) ** 0.5 + eps)
            w[r] = w[r] * (1 - lr * wd) - lr * step
    return w, m, v, torch.tensor(t, dtype=torch.int32)


def run_table(table, opt, grads):
    for g in grads:
        table.U.grad = g.clone()
        opt.step()


@pytest.mark.parametrize("option", MOMENT_OPTIONS)
def test_moments_match_a_float64_reference_with_lazy_and_frozen_rows(option):
    from lifelong_peer.optim import PEEROptimizer

    table = Table()
    w0 = table.U.detach().clone()
    opt = PEEROptimizer([], [{"sources": [(table, "U")], "lr": 0.05, "weight_decay": 0.1, "moments": option}], lr=0.05)
    grads = sparse_grads(8)
    run_table(table, opt, grads)
    w, m, v, t = reference_lazy_adamw(w0, grads, table.frozen, option, lr=0.05, wd=0.1)
    state = opt.state[table.U]
    assert torch.equal(state["step"], t)
    assert state["exp_avg"].dtype == (torch.bfloat16 if option == "bf16" else torch.float32)
    assert state["exp_avg_sq"].shape == ((6, 1) if option == "rowwise" else (6, 5))
    torch.testing.assert_close(table.U.detach().double(), w, rtol=1e-5, atol=1e-6)
    # bf16 storage: the stored moments are the reference's, rounded the same way (≤ 1 bf16 ulp apart)
    tol = {"rtol": 8e-3, "atol": 1e-12} if option == "bf16" else {"rtol": 1e-5, "atol": 1e-9}
    torch.testing.assert_close(state["exp_avg"].double(), m, **tol)
    torch.testing.assert_close(state["exp_avg_sq"].double(), v, **tol)
    assert torch.equal(table.U[table.frozen], w0[table.frozen])


def test_bf16_reference_tells_rounded_from_unrounded_storage():
    """The reference is sharp enough to notice if bf16 moments were kept unrounded (fp32)."""
    table = Table()
    w0 = table.U.detach().clone()
    grads = sparse_grads(8)
    w_bf16 = reference_lazy_adamw(w0, grads, table.frozen, "bf16", lr=0.05, wd=0.1)[0]
    w_fp32 = reference_lazy_adamw(w0, grads, table.frozen, "fp32", lr=0.05, wd=0.1)[0]
    assert not torch.allclose(w_bf16, w_fp32, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("option", ["bf16", "rowwise"])
def test_compact_moments_frozen_rows_bit_identical(option):
    model = tiny_model()
    layer = model.peer_layers()[0]
    opt = build_optimizer(model, lr=1e-2, weight_decay=0.1, moments=option)
    train(model, opt, 3)
    frozen = torch.arange(0, layer.num_experts, 2)
    layer.freeze(frozen, subkeys=True)
    before = {k: v.detach().clone() for k, v in layer.state_dict().items()}
    states = {name: {k: v.clone() for k, v in opt.state[getattr(layer, name)].items()} for name in ("U", "V")}
    train(model, opt, 6, seed=100)
    for name in ("U", "V"):
        assert torch.equal(layer.state_dict()[name][frozen], before[name][frozen])
        for key, value in states[name].items():
            assert torch.equal(opt.state[getattr(layer, name)][key][frozen], value[frozen]), (name, key)
        assert (opt.state[getattr(layer, name)]["step"] > states[name]["step"]).any()


def state_bytes(opt, params):
    return sum(t.numel() * t.element_size() for p in params for t in opt.state[p].values())


def test_compact_moments_take_about_half_the_bytes():
    sizes = {}
    for option in MOMENT_OPTIONS:
        model = tiny_model()
        opt = build_optimizer(model, lr=1e-2, moments=option)
        train(model, opt, 1)
        layer = model.peer_layers()[0]
        sizes[option] = state_bytes(opt, [layer.U, layer.V])
        rows, dim = layer.U.shape
        assert sizes[option] == 2 * rows * {"fp32": 8 * dim + 4, "bf16": 4 * dim + 4, "rowwise": 4 * dim + 8}[option]
        assert opt.state[layer.subkeys]["exp_avg"].dtype == torch.float32  # sub-keys stay fp32
    assert sizes["bf16"] < 0.52 * sizes["fp32"] and sizes["rowwise"] < 0.53 * sizes["fp32"]


@pytest.mark.parametrize("option", ["bf16", "rowwise"])
def test_compact_moments_through_growth_equal_a_layer_built_grown(option):
    """Growth mid-training extends the compact state in place; a checkpoint of it (safetensors)
    resumed into a layer built at the grown size trains bit-identically."""
    from lifelong_peer import PEER
    from lifelong_peer.checkpoint import load_tensors, save_tensors

    torch.manual_seed(0)
    cfg = PEERConfig(dim=16, num_subkeys=6, heads=2, topk=3, dim_key=8)
    grown = PEER(cfg).train()
    opt = build_optimizer(grown, lr=1e-2, weight_decay=0.1, moments=option)
    _peer_train(grown, opt, 3, seed=0)
    grown.freeze(list(range(0, 36, 3)))
    ptr = opt.state[grown.U]["exp_avg_sq"].data_ptr()
    frozen_state = {k: v[grown.frozen].clone() for k, v in opt.state[grown.U].items()}
    grown.grow(2)
    _peer_train(grown, opt, 2, seed=10)
    state = opt.state[grown.U]
    assert state["exp_avg_sq"].data_ptr() == ptr and state["exp_avg_sq"].shape[0] == 64
    for key, value in frozen_state.items():
        assert torch.equal(state[key][:36][grown.frozen[:36]], value), key
    assert (state["step"][36:] > 0).any(), "no new expert was trained"

    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        save_tensors(f"{tmp}/opt.safetensors", opt.state_tensors(dict(grown.named_parameters())), {})
        saved, _ = load_tensors(f"{tmp}/opt.safetensors")
    assert saved["U::exp_avg"].dtype == state["exp_avg"].dtype
    assert saved["U::exp_avg_sq"].shape == state["exp_avg_sq"].shape
    direct = PEER(PEERConfig(**grown.config.to_dict())).train()
    direct.load_state_dict(grown.state_dict())
    opt_direct = build_optimizer(direct, lr=1e-2, weight_decay=0.1, moments=option)
    opt_direct.load_state_tensors(dict(direct.named_parameters()), saved)
    _peer_train(grown, opt, 3, seed=20)
    _peer_train(direct, opt_direct, 3, seed=20)
    for name, p in grown.named_parameters():
        assert torch.equal(p, dict(direct.named_parameters())[name]), name
    ours, theirs = (
        opt.state_tensors(dict(grown.named_parameters())),
        opt_direct.state_tensors(dict(direct.named_parameters())),
    )
    for key, value in ours.items():  # (rows never used hold whatever was in memory: compared as saved)
        assert torch.equal(theirs[key], value), key


def test_checkpoint_moments_convert_or_refuse_across_settings():
    """fp32 → bf16 casts, per-element → rowwise takes the row mean (exact); rowwise → per-element
    has nothing to restore from and raises a CheckpointError that names the parameter."""
    from lifelong_peer.errors import CheckpointError

    model = tiny_model()
    opt = build_optimizer(model, lr=1e-2, moments="fp32")
    train(model, opt, 2)
    named = dict(model.named_parameters())
    name = next(n for n in named if n.endswith(".U"))
    saved = opt.state_tensors(named)
    v = saved[f"{name}::exp_avg_sq"]

    to_bf16 = build_optimizer(model, lr=1e-2, moments="bf16")
    to_bf16.load_state_tensors(named, saved)
    assert torch.equal(to_bf16.state[named[name]]["exp_avg_sq"], v.to(torch.bfloat16))
    to_rowwise = build_optimizer(model, lr=1e-2, moments="rowwise")
    to_rowwise.load_state_tensors(named, saved)
    torch.testing.assert_close(to_rowwise.state[named[name]]["exp_avg_sq"], v.mean(1, keepdim=True))
    train(model, to_rowwise, 1, seed=7)  # the converted state trains

    rowwise_saved = to_rowwise.state_tensors(named)
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        build_optimizer(model, lr=1e-2, moments="fp32").load_state_tensors(named, rowwise_saved)


def test_moments_setting_is_validated_in_optimizer_and_config():
    from lifelong_peer.config import TrainConfig
    from lifelong_peer.errors import UserError

    with pytest.raises(ValueError, match="fp32, bf16, rowwise"):
        build_optimizer(tiny_model(), moments="fp16")
    with pytest.raises(UserError, match="expert_moments"):
        TrainConfig(expert_moments="fp16")
    assert TrainConfig(expert_moments="rowwise").expert_moments == "rowwise"
