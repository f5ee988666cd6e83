"""Phase hooks (issue 15): each regulariser against its formula (value and gradient) on a tiny model,
the batch sources of replay and joint, every hook's state through a checkpoint, and that each preset
changes what it should — a weight of 0 is naive bit for bit, a weight > 0 is not."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from test_train import TINY, final_weights, make_run

from lifelong_peer import LanguageModel
from lifelong_peer.data import sample_batch
from lifelong_peer.errors import UserError
from lifelong_peer.hooks import EWC, HOOKS, L2SP, MAS, Distillation, Joint, PhaseContext, Replay
from lifelong_peer.hooks.mas import mas_importance
from lifelong_peer.regularize import EXPERT_TABLES, fisher_diagonal
from lifelong_peer.strategies import preset_hooks
from lifelong_peer.train import run_phases


def _model(seed: int = 0) -> LanguageModel:
    torch.manual_seed(seed)
    return LanguageModel(TINY)


def _shared(model) -> dict[str, torch.Tensor]:
    """By hand: every parameter outside the expert tables U, V and the sub-keys."""
    return {n: p for n, p in model.named_parameters() if n.rsplit(".", 1)[-1] not in EXPERT_TABLES}


def _anchor_and_importance(model, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    anchor = {n: p.detach() + 0.1 * torch.randn(p.shape, generator=g) for n, p in _shared(model).items()}
    importance = {n: torch.rand(p.shape, generator=g) for n, p in _shared(model).items()}
    return anchor, importance


def _grads(value: torch.Tensor, model) -> dict[str, torch.Tensor | None]:
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(value, list(params.values()), allow_unused=True)
    return dict(zip(params, grads, strict=True))


def _batch(seed: int = 0, rows: int = 3) -> torch.Tensor:
    return torch.randint(0, 256, (rows, TINY.context + 1), generator=torch.Generator().manual_seed(seed))


def test_l2sp_penalty_and_gradient_match_the_formula():
    model = _model()
    anchor, _ = _anchor_and_importance(model)
    hook = L2SP(0.7)
    hook.anchor = anchor
    value = hook.penalty(model, None, None)
    want = 0.7 * 0.5 * sum(((p - anchor[n]) ** 2).sum() for n, p in _shared(model).items())
    assert torch.allclose(value, want, rtol=1e-5)
    grads = _grads(value, model)
    for name, p in model.named_parameters():
        if name in anchor:
            assert torch.allclose(grads[name], 0.7 * (p - anchor[name]), rtol=1e-5, atol=1e-8), name
        else:
            assert grads[name] is None, name  # expert tables are not held


def test_ewc_penalty_and_gradient_match_the_formula():
    model = _model()
    anchor, fisher = _anchor_and_importance(model)
    hook = EWC(3.0, batches=2)
    assert hook.penalty(model, None, None) is None  # no Fisher yet (phase 0): no term
    hook.importance, hook.anchor = fisher, anchor
    value = hook.penalty(model, None, None)
    want = 3.0 * 0.5 * sum((fisher[n] * (p - anchor[n]) ** 2).sum() for n, p in _shared(model).items())
    assert torch.allclose(value, want, rtol=1e-5)
    grads = _grads(value, model)
    for name, p in _shared(model).items():
        assert torch.allclose(grads[name], 3.0 * fisher[name] * (p - anchor[name]), rtol=1e-5, atol=1e-8), name


def test_fisher_diagonal_is_the_mean_squared_gradient():
    model = _model()
    batches = [_batch(s) for s in range(3)]
    got = fisher_diagonal(model, batches)
    model.eval()
    want = {n: torch.zeros_like(p) for n, p in _shared(model).items()}
    for b in batches:
        _, loss = model(b[:, :-1], b[:, 1:])
        for n, g in _grads(loss, model).items():
            if n in want and g is not None:
                want[n] += g**2 / len(batches)
    assert got.keys() == want.keys()
    for n in want:
        assert torch.allclose(got[n], want[n], rtol=1e-4, atol=1e-12), n


def test_distillation_penalty_and_gradient_match_the_formula():
    T, w = 2.0, 0.5
    teacher = _model(1).eval()
    hook = Distillation(w, T)
    hook.teacher = teacher
    batch = _batch()
    student = torch.randn(3, TINY.context, 256, requires_grad=True)
    value = hook.penalty(None, batch, student)
    with torch.no_grad():
        t_logits, _ = teacher(batch[:, :-1])
    p_t = F.softmax(t_logits / T, -1)
    log_p_s = F.log_softmax(student / T, -1)
    rows = batch.shape[0] * TINY.context
    want = w * T * T * (p_t * (p_t.log() - log_p_s)).sum() / rows  # KL(teacher ‖ student), mean over tokens
    assert torch.allclose(value, want, rtol=1e-4)
    (grad,) = torch.autograd.grad(value, student)
    assert torch.allclose(grad, w * T * (F.softmax(student / T, -1) - p_t) / rows, rtol=1e-4, atol=1e-9)


def test_distillation_on_replay_rows_is_the_kl_of_the_replayed_rows_only(tmp_path, memory_stream):
    """distill_on = replay: begin_phase takes the replayed rows' count from the run (rows [0, r·B) of a batch,
    none in phase 0); the penalty is the KL over those rows' tokens alone, the new rows get no gradient."""
    from test_train import make_run

    from lifelong_peer.hooks.base import PhaseContext as Ctx

    T, w = 2.0, 0.5
    _, run = make_run(
        tmp_path, memory_stream, "replay", base_steps=2, replay=0.5, batch_size=4, distill=w, distill_on="replay"
    )
    run_phases(run, phases=[0])
    hook = next(h for h in run.hooks if isinstance(h, Distillation))
    hooks = [h for h in run.hooks if isinstance(h, (Replay, Distillation))]
    for phase, rows in ((0, 0), (1, 2)):  # phase 0 has nothing to replay
        ctx = Ctx(run=run, phase=phase, start_step=0, emit=lambda e: None, pools=[], existed=[])
        for h in hooks:
            h.begin_phase(ctx)
        assert hook.replay_rows == rows
    batch = _batch(rows=4)
    student = torch.randn(4, TINY.context, 256, requires_grad=True)
    value = hook.penalty(None, batch, student)
    with torch.no_grad():
        t_logits, _ = hook.teacher(batch[:2, :-1])
    p_t = F.softmax(t_logits / T, -1)
    want = w * T * T * (p_t * (p_t.log() - F.log_softmax(student[:2] / T, -1))).sum() / (2 * TINY.context)
    assert torch.allclose(value, want, rtol=1e-4)
    (grad,) = torch.autograd.grad(value, student)
    assert grad[2:].abs().max() == 0 and grad[:2].abs().max() > 0


def test_distillation_of_forgotten_tokens_matches_a_token_by_token_reference():
    """distill_tokens = forgotten: a token counts only where the teacher gave the true next byte more
    probability than the student; the sum runs over those, the mean over all tokens. A student equal to
    its teacher has forgotten nothing: no penalty, no gradient."""
    T, w = 2.0, 0.5
    teacher = _model(1).eval()
    hook = Distillation(w, T, tokens="forgotten")
    hook.teacher = teacher
    batch = _batch()
    with torch.no_grad():
        t_logits, _ = teacher(batch[:, :-1])
    student = t_logits + 0.7 * torch.randn(t_logits.shape, generator=torch.Generator().manual_seed(3))
    student.requires_grad_(True)
    value = hook.penalty(None, batch, student)
    want, kept = torch.zeros(()), 0
    for r in range(batch.shape[0]):
        for i in range(TINY.context):
            y = batch[r, i + 1]
            if F.log_softmax(t_logits[r, i], -1)[y] > F.log_softmax(student[r, i].detach(), -1)[y]:
                p_t = F.softmax(t_logits[r, i] / T, -1)
                want = want + (p_t * (p_t.log() - F.log_softmax(student[r, i] / T, -1))).sum()
                kept += 1
    assert 0 < kept < batch.shape[0] * TINY.context  # some tokens forgotten, some not: the mask matters
    want = w * T * T * want / (batch.shape[0] * TINY.context)
    assert torch.allclose(value, want, rtol=1e-4)
    (grad,) = torch.autograd.grad(value, student)
    (want_grad,) = torch.autograd.grad(want, student)
    assert torch.allclose(grad, want_grad, rtol=1e-4, atol=1e-10)
    same = t_logits.clone().requires_grad_(True)
    value = hook.penalty(None, batch, same)
    assert value == 0 and torch.autograd.grad(value, same)[0].abs().max() == 0


class Bigram(torch.nn.Module):
    """logits = W · emb(x): small enough for ∂‖f(x)‖²/∂W by hand."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(11, 4)
        self.out = torch.nn.Linear(4, 11, bias=False)

    def forward(self, idx, targets=None):
        return self.out(self.emb(idx)), None


def test_mas_importance_is_the_mean_absolute_output_sensitivity():
    model = Bigram()
    batches = [torch.randint(0, 11, (2, 6), generator=torch.Generator().manual_seed(s)) for s in range(3)]
    got = mas_importance(model, batches)
    want = torch.zeros_like(model.out.weight)
    with torch.no_grad():
        for b in batches:
            h = model.emb(b[:, :-1]).reshape(-1, 4)  # (N, d)
            logits = h @ model.out.weight.T  # (N, V)
            want += (2 * logits.T @ h / len(h)).abs() / len(batches)  # |∂ mean_t ‖W h_t‖² / ∂W|
    assert torch.allclose(got["out.weight"], want, rtol=1e-5, atol=1e-8)
    assert (got["emb.weight"] >= 0).all()


def test_mas_penalty_and_gradient_match_the_formula():
    model = _model()
    anchor, omega = _anchor_and_importance(model)
    hook = MAS(2.0, batches=2)
    assert hook.penalty(model, None, None) is None
    hook.anchor, hook.importance = anchor, omega
    value = hook.penalty(model, None, None)
    want = 2.0 * sum((omega[n] * (p - anchor[n]) ** 2).sum() for n, p in _shared(model).items())
    assert torch.allclose(value, want, rtol=1e-5)
    grads = _grads(value, model)
    for name, p in _shared(model).items():
        assert torch.allclose(grads[name], 2 * 2.0 * omega[name] * (p - anchor[name]), rtol=1e-5, atol=1e-8), name


class _Run:
    """What the sampling hooks read of a run: its slices' train tokens."""

    def __init__(self, stream, tc):
        self.stream, self.config = stream, type("C", (), {"slices": [s.name for s in stream.slices], "train": tc})

    def slice_data(self, name):
        return self.stream.slice(name)


def _ctx(run, phase: int) -> PhaseContext:
    pools = [run.slice_data(run.config.slices[phase]).tokens("train")]
    return PhaseContext(run=run, phase=phase, start_step=0, emit=lambda e: None, pools=pools)


def _marked_pools():
    """Three one-valued token arrays: which pool a row came from is its value."""
    return [torch.full((500,), i, dtype=torch.uint8).numpy() for i in range(3)]


def test_replay_draws_its_fraction_of_each_batch_from_earlier_slices(memory_stream):
    from lifelong_peer.config import TrainConfig

    tc = TrainConfig(replay=0.25, batch_size=8)
    run = _Run(memory_stream, tc)
    ctx = _ctx(run, 2)
    Replay.from_config(tc).begin_phase(ctx)
    assert [id(p) for p in ctx.replay_pools] == [id(run.slice_data(n).tokens("train")) for n in ("a", "b")]
    current, old_a, old_b = _marked_pools()
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        batch = sample_batch([current], [old_a, old_b], tc, 16, gen)
        assert batch.shape == (8, 17)
        assert (batch[:, 0] != 0).sum() == round(0.25 * 8)  # exactly the replay rows
        assert (batch[:2] != 0).all() and (batch[2:] == 0).all()
    assert Replay.from_config(TrainConfig()) is None
    assert Replay.from_config(TrainConfig(replay=0.25, joint=True)) is None  # joint already sees everything


def test_joint_draws_every_batch_from_all_slices(memory_stream):
    from lifelong_peer.config import TrainConfig

    tc = TrainConfig(joint=True, batch_size=8)
    run = _Run(memory_stream, tc)
    ctx = _ctx(run, 0)
    Joint.from_config(tc).begin_phase(ctx)
    assert len(ctx.pools) == 3 and ctx.replay_pools == []
    gen = torch.Generator().manual_seed(0)
    seen = torch.cat([sample_batch(_marked_pools(), [], tc, 16, gen)[:, 0] for _ in range(30)])
    counts = torch.bincount(seen.long(), minlength=3)
    assert (counts > 0).all()  # all slices, about evenly: 240 rows, 80 expected each
    assert counts.min() > 240 / 3 - 4 * math.sqrt(240 * (1 / 3) * (2 / 3))


def test_presets_name_their_hooks():
    assert preset_hooks("naive") == []
    assert preset_hooks("ewc") == ["EWC"]
    assert preset_hooks("mas") == ["MAS"]
    assert preset_hooks("replay") == ["Replay"]
    assert preset_hooks("joint") == ["Joint"]
    assert preset_hooks("lifelong") == ["Replay", "Distillation"]  # issue 24: start big, no growth
    assert preset_hooks("lifelong-grow") == ["Growth", "Freezing", "Replay"]
    assert preset_hooks("smf") == ["Freezing"]
    assert preset_hooks("smf-shared") == ["Freezing"]


def test_every_hooks_state_survives_a_checkpoint(tmp_path, memory_stream):
    everything = {"ewc": 1.0, "mas": 1.0, "l2sp": 1.0, "distill": 1.0, "replay": 0.25, "grow": "2"}
    _, run = make_run(tmp_path, memory_stream, "naive", freeze="all-old", ewc_batches=2, **everything)
    assert {type(h) for h in run.hooks} == set(HOOKS) - {Joint}  # all but joint (it excludes replay)
    run_phases(run, phases=[0])
    saved = {type(h).__name__: h.state_tensors() for h in run.hooks}
    assert saved["EWC"] and saved["MAS"]  # measured at the end of phase 0
    from lifelong_peer.run import open_run
    from lifelong_peer.workspace import Workspace

    again = open_run(Workspace.open(tmp_path / "ws"), "r", stream=memory_stream)
    assert all(not h.state_tensors() for h in again.hooks)
    again.load_latest()
    for hook in again.hooks:
        state = hook.state_tensors()
        assert state.keys() == saved[type(hook).__name__].keys()
        for k, v in state.items():
            assert torch.equal(v, saved[type(hook).__name__][k]), (type(hook).__name__, k)


def _weights_after(tmp_path, memory_stream, run_id, **train):
    _, run = make_run(tmp_path, memory_stream, "naive", run_id=run_id, ewc_batches=2, **train)
    run_phases(run)
    return final_weights(run.dir)


@pytest.mark.parametrize("field", ["ewc", "mas"])
def test_a_regulariser_at_weight_0_is_naive_bit_for_bit_and_at_weight_1_is_not(tmp_path, memory_stream, field):
    naive = _weights_after(tmp_path, memory_stream, "naive")
    off = _weights_after(tmp_path, memory_stream, f"{field}-0", **{field: 0.0})
    on = _weights_after(tmp_path, memory_stream, f"{field}-on", **{field: 1e4})
    assert all(torch.equal(naive[k], off[k]) for k in naive)
    assert any(not torch.equal(naive[k], on[k]) for k in naive)


def test_lpeer_grow_and_the_loop_grow_alike(tmp_path, memory_stream):
    """One growth planner (issue 15): ``grow_run`` before phase 1 places exactly the sub-keys the
    loop's Growth hook places there (same seed rule, same input samples)."""
    from lifelong_peer.hooks import Growth
    from lifelong_peer.run import open_run
    from lifelong_peer.runops import grow_run
    from lifelong_peer.workspace import Workspace

    ws, run = make_run(tmp_path, memory_stream, "naive", grow="2", base_steps=2)
    run_phases(run, phases=[0])
    by_loop = open_run(Workspace.open(tmp_path / "ws"), "r", stream=memory_stream)
    by_loop.load_latest()  # before the edit below replaces the phase-0 checkpoint
    Growth("2").begin_phase(_ctx(by_loop, 1))
    by_hand = open_run(ws, "r", stream=memory_stream)
    report = grow_run(by_hand, subkeys=2, slice_name="b")
    assert report["old_slices"] == ["a"] and all(r["k"] == 2 for r in report["layers"])
    for a, b in zip(by_hand.model.peer_layers(), by_loop.model.peer_layers(), strict=True):
        assert a.num_subkeys == b.num_subkeys
        assert torch.equal(a.subkeys, b.subkeys)


#: issue 25: every hook whose anchor (or teacher) is the previous phase's model, at a weight that moves the weights
ANCHORED = {"l2sp": {"l2sp": 1.0}, "ewc": {"ewc": 3e5}, "mas": {"mas": 0.01}, "distillation": {"distill": 1.0}}


def _resumed_weights(tmp_path, run_id: str, train: dict) -> dict[str, torch.Tensor]:
    """A two-slice run killed at phase 1, step 3 (its state as after SIGKILL: the step-2 checkpoint), then
    resumed to the end; its final weights."""
    from conftest import MemoryStream

    from lifelong_peer.run import open_run
    from lifelong_peer.workspace import Workspace

    stream = MemoryStream(slices=("a", "b"))
    _, run = make_run(tmp_path, stream, "naive", run_id=run_id, base_steps=2, checkpoint_every=2, **train)

    def kill(event):
        if event["event"] == "step" and (event["phase"], event["step"]) == (1, 3):
            raise SystemExit("killed")

    with pytest.raises(SystemExit):
        run_phases(run, progress=kill)
    resumed = open_run(Workspace.open(tmp_path / "ws"), run_id, stream=stream)
    run_phases(resumed)
    return final_weights(resumed.dir)


@pytest.mark.parametrize("hook", sorted(ANCHORED))
def test_a_regulariser_resumed_mid_phase_anchors_to_the_previous_phase(tmp_path, hook, monkeypatch, one_thread):
    """Killed mid-phase with a regulariser on and resumed, a run ends bit for bit where the uninterrupted run
    does: begin_phase takes its anchor from the previous phase's checkpoint, not from the model it resumes
    with. The check has teeth: with the anchor taken from the current model on resume, the weights differ."""
    from conftest import MemoryStream

    _, straight = make_run(tmp_path, MemoryStream(slices=("a", "b")), "naive", run_id="straight", base_steps=2,
                           checkpoint_every=2, **ANCHORED[hook])  # fmt: skip
    run_phases(straight)
    want = final_weights(straight.dir)
    got = _resumed_weights(tmp_path, "resumed", ANCHORED[hook])
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want), hook

    previous = PhaseContext.previous

    def current_model_on_resume(ctx):  # the bug this test is for
        return copy.deepcopy(ctx.run.model).eval() if ctx.start_step else previous(ctx)

    monkeypatch.setattr(PhaseContext, "previous", current_model_on_resume)
    wrong = _resumed_weights(tmp_path, "wrong-anchor", ANCHORED[hook])
    assert any(not torch.equal(want[k], wrong[k]) for k in want), hook


def test_replay_share_grows_with_the_number_of_earlier_slices():
    """replay_growth γ: with k earlier slices a batch replays round((1 − (1 − replay)·k^−γ)·B) rows, and the
    distillation hook counts the same rows as replayed; γ = 0 keeps the share at every k."""
    from types import SimpleNamespace

    from lifelong_peer.config import TrainConfig

    tc = TrainConfig(replay=0.5, replay_growth=0.5, batch_size=16)
    current, old, _ = _marked_pools()
    gen = torch.Generator().manual_seed(0)
    hook = Distillation(0.5, 2.0, on="replay")
    for k, want in ((0, 0), (1, 8), (4, 12), (16, 14)):  # 1 − 0.5/√k of 16 rows
        batch = sample_batch([current], [old] * k, tc, 16, gen)
        assert (batch[:, 0] != 0).sum() == want
        run = SimpleNamespace(config=SimpleNamespace(train=tc))
        hook.begin_phase(SimpleNamespace(run=run, previous=lambda: None, replay_pools=[old] * k))
        assert hook.replay_rows == want
    flat = TrainConfig(replay=0.5)
    assert [flat.replay_share(k) for k in (1, 4, 58)] == [0.5, 0.5, 0.5]
    for bad in ({"replay_growth": -0.1, "replay": 0.5}, {"replay_growth": float("nan"), "replay": 0.5}):
        with pytest.raises(UserError, match="replay_growth"):
            TrainConfig(**bad)
    with pytest.raises(UserError, match="needs replay"):
        TrainConfig(replay_growth=0.1)
