"""Function-preserving growth and the growth shock (issue 16, part 2)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from peer_helpers import assert_same, pair

from lifelong_peer import LanguageModel, ModelConfig, PEERConfig
from lifelong_peer.checkpoint import load_model, save_model
from lifelong_peer.index import collect_usage, grow_model, growth_shock, set_frozen
from lifelong_peer.optim import build_optimizer
from lifelong_peer.peer import pair_of

IMPLS = ("naive", "fast", "native")


@pytest.mark.parametrize("impl", IMPLS)
def test_exact_growth_leaves_the_output_bit_identical_through_two_generations(impl):
    torch.manual_seed(0)
    layer, _ = pair(impl)
    layer.eval()
    x = torch.randn(64, 24)
    y0 = layer(x)
    layer.grow(4, generation_topk=5)
    assert torch.equal(layer(x), y0)
    with torch.no_grad():  # the first generation learns something; the second growth must keep that too
        layer.V[81:].normal_()
    y1 = layer(x)
    layer.grow(3, generation_topk=2)
    assert torch.equal(layer(x), y1)
    assert layer.config.generations == [[9, 5], [13, 2]] and layer.config.slots() == [5, 5, 2]


@pytest.mark.parametrize("impl", IMPLS)
def test_each_generation_retrieves_the_exact_top_k_of_its_own_experts(impl):
    torch.manual_seed(1)
    layer, _ = pair(impl)
    layer.grow(4, generation_topk=5)
    layer.grow(3, generation_topk=3)
    layer.grow(1, generation_topk=6)  # one new sub-key: fewer rows than the generation's top-k
    x = torch.randn(40, 24)
    scores, ids = layer.retrieve(x)
    every = layer.all_scores(x)  # (T, h, N) by id, brute force
    spans, slots = [(0, 9), (9, 13), (13, 16), (16, 17)], [(0, 5), (5, 10), (10, 13), (13, 19)]
    for (lo, hi), (a, b) in zip(spans, slots, strict=True):
        top = every[..., lo * lo : hi * hi].topk(b - a, dim=-1)
        assert torch.equal(ids[..., a:b], top.indices + lo * lo)
        torch.testing.assert_close(scores[..., a:b], top.values)
        i, j = pair_of(ids[..., a:b])
        assert ((torch.maximum(i, j) >= lo) & (torch.maximum(i, j) < hi)).all()
    gates = layer.gates(scores)
    for a, b in slots:  # one softmax per generation
        torch.testing.assert_close(gates[..., a:b].sum(-1), torch.ones(40, 3))


@pytest.mark.parametrize("impl", ("fast", "native"))
def test_generations_match_the_naive_reference_with_gradients(impl):
    layer, naive = pair(impl)
    for m in (layer, naive):
        torch.manual_seed(2)
        m.grow(4, generation_topk=5)
        m.grow(2, generation_topk=3)
        with torch.no_grad():
            m.V[81:].normal_()
    assert_same(layer, naive, torch.randn(30, 24))


def test_new_experts_receive_gradient_and_train_in_the_first_step_after_exact_growth():
    layer, _ = pair("fast")
    layer.freeze(torch.arange(layer.num_experts))  # old experts frozen, as all-old does
    new = layer.grow(4, generation_topk=5)
    opt = build_optimizer(layer, lr=1e-2)
    before = layer.V.detach().clone()
    x = torch.randn(64, 24)
    opt.zero_grad()
    layer(x).square().mean().backward()
    grad = layer.V.grad.to_dense()
    retrieved = layer.retrieve(x)[1][..., 5:].unique()
    assert (grad[retrieved].abs().sum(-1) > 0).all()  # every retrieved new expert's v gets gradient
    opt.step()
    assert not torch.equal(layer.V[new], before[new])
    assert torch.equal(layer.V[: new[0]], before[: new[0]])


def _small_model(seed=0, **peer):
    torch.manual_seed(seed)
    cfg = ModelConfig(
        peer_blocks="all",
        dim=32,
        layers=2,
        heads=2,
        context=32,
        peer=PEERConfig(num_subkeys=8, heads=2, topk=4, dim_key=16, **peer),
    )
    return LanguageModel(cfg)


def test_grown_model_round_trips_through_a_checkpoint_bit_identically(tmp_path):
    model = _small_model()
    model.grow(4, generation_topk=3)
    model.grow(2, layer=0, generation_topk=2)
    with torch.no_grad():
        for p in model.peer_layers():
            p.V.normal_()
    path = tmp_path / "m.safetensors"
    save_model(model, path)
    loaded = load_model(path)
    assert loaded.config.peer_generations == [[[8, 3], [12, 2]], [[8, 3]]]
    assert [p.config.generations for p in loaded.peer_layers()] == [[[8, 3], [12, 2]], [[8, 3]]]
    idx = torch.randint(0, 256, (3, 32))
    model.eval(), loaded.eval()
    assert torch.equal(model(idx)[0], loaded(idx)[0])
    assert (
        loaded.active_params_per_token() == model.active_params_per_token() > _small_model().active_params_per_token()
    )


def test_bad_generations_in_a_config_are_refused():
    with pytest.raises(ValueError, match="generations"):
        PEERConfig(num_subkeys=10, topk=4, generations=[[12, 4]])
    with pytest.raises(ValueError, match="generations"):
        PEERConfig(num_subkeys=10, topk=4, generations=[[6, 4], [5, 4]])
    with pytest.raises(ValueError, match="top-k"):
        PEERConfig(num_subkeys=10, topk=4, generations=[[9, 20]])  # 100 - 81 = 19 experts


# --- the growth shock on a small trained model -----------------------------------------------------


def _corpus(seed: int, words: list[bytes], n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    text = b"".join(words[int(i)] for i in torch.randint(len(words), (n,), generator=g))
    return torch.tensor(list(text), dtype=torch.long)


@pytest.fixture(scope="module")
def trained():
    """A small model trained on an 'old' text; a 'new' text of other words; windows of both."""
    old = _corpus(0, [b"the ", b"state ", b"of ", b"union ", b"is ", b"strong ", b"and "], 12000)
    new = _corpus(1, [b"peer ", b"expert ", b"stream ", b"slice ", b"time ", b"grow "], 12000)
    model = _small_model(3)
    opt = build_optimizer(model, lr=3e-3)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(150):
        starts = torch.randint(0, 8000 - 33, (16,), generator=g)
        batch = torch.stack([old[s : s + 33] for s in starts])
        _, loss = model(batch[:, :-1], batch[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    windows = lambda t, a, b: t[a:b].unfold(0, 33, 33)  # noqa: E731
    return model, {
        "old_fit": windows(old, 8000, 10000)[:, :-1],
        "old_eval": windows(old, 10000, 12000),
        "new_fit": windows(new, 0, 4000)[:, :-1],
    }


def _grow(model, data, mode):
    g = torch.Generator().manual_seed(0)
    new = collect_usage(model, data["new_fit"], None, sample_inputs=2048, generator=g)["inputs"]
    old = collect_usage(model, data["old_fit"], None, sample_inputs=2048, generator=g)["inputs"]
    return lambda: grow_model(model, 4, new, old, seed=0, mode=mode)


@pytest.mark.parametrize("mode", ("exact", "safe"))
def test_function_preserving_modes_keep_the_growth_shock_small(trained, mode):
    model, data = trained
    model = copy.deepcopy(model)
    reference = copy.deepcopy(model)
    _, shock = growth_shock(model, _grow(model, data, mode), {"old": data["old_eval"]})
    if mode == "exact":  # the default: a new generation with its own retrieval leaves the function as it was
        assert shock["max_bpb"] == 0.0
    else:
        # safe placement shortens the new keys until (nearly) no sampled old retrieval meets them: its
        # shock is small but only approximately zero — 0.0034 bpb on this model, where the earlier
        # 5%-budget placement gives 0.0034 too; only exact growth keeps the function (issue 16)
        assert shock["max_bpb"] <= 0.01, shock
    # the shock is the change against the un-grown copy, here scored on the naive reference path
    for m in (model, reference):
        for p in m.peer_layers():
            p.impl = "naive"
    change = (model.nll(data["old_eval"])[0] - reference.nll(data["old_eval"])[0]) / (
        data["old_eval"][:, 1:].numel() * 0.6931471805599453
    )
    assert abs(change - shock["per_slice_bpb"]["old"]) < 1e-6


def test_growth_shock_measures_what_a_shared_retrieval_growth_does(trained):
    """The earlier growth (new keys join the shared retrieval) shifts old losses; the measure sees it."""
    model, data = trained
    model = copy.deepcopy(model)
    before = model.nll(data["old_eval"])[0]

    def grow():  # long random sub-keys: they take over old retrievals with v = 0 experts
        for p in model.peer_layers():
            p.grow(4, subkeys=p.subkeys.detach()[:4] * 3)

    _, shock = growth_shock(model, grow, {"old": data["old_eval"]})
    expected = (model.nll(data["old_eval"])[0] - before) / (data["old_eval"][:, 1:].numel() * 0.6931471805599453)
    assert shock["max_bpb"] > 0.002 and shock["per_slice_bpb"]["old"] == pytest.approx(expected)


def test_exact_growth_in_the_phase_loop_records_zero_shock_and_trains_the_new_experts(tmp_path, memory_stream):
    from test_train import make_run

    from lifelong_peer.train import run_phases

    _, run = make_run(tmp_path, memory_stream, "lifelong-grow", base_steps=4, grow="8", grow_mode="exact", grow_topk=2)
    results = run_phases(run)
    shocks = [p.growth_shock_bpb for p in results.phases]
    assert shocks[0] is None and shocks[1] == shocks[2] == 0.0  # phase 0 has no old slice to shock
    assert set(results.phases[2].extra["growth_shock_per_slice_bpb"]) == {"a", "b"}
    layer = run.model.peer_layers()[0]
    assert layer.config.generations == [[8, 2], [16, 2], [24, 2]]
    assert run.model.config.peer_generations[0] == layer.config.generations
    assert not torch.equal(layer.V[24 * 24 :], torch.zeros_like(layer.V[24 * 24 :]))  # the newest generation learned


def test_set_frozen_still_applies_to_grown_generations():
    model = _small_model()
    model.grow(4, generation_topk=3)
    layer = model.peer_layers()[0]
    set_frozen(layer, torch.arange(64))
    assert layer.frozen[:64].all() and not layer.frozen[64:].any()


def test_a_run_resumed_mid_phase_keeps_its_generations_and_growth_shock(tmp_path, memory_stream):
    import json

    from test_train import final_weights, make_run

    from lifelong_peer.run import open_run
    from lifelong_peer.train import run_phases
    from lifelong_peer.workspace import Workspace

    kw = {"base_steps": 4, "checkpoint_every": 2, "grow": "8", "grow_mode": "exact", "grow_topk": 3}
    _, straight = make_run(tmp_path, memory_stream, "lifelong-grow", run_id="straight", **kw)
    run_phases(straight)
    _, broken = make_run(tmp_path, memory_stream, "lifelong-grow", run_id="broken", **kw)

    def crash(event):
        if event["event"] == "step" and event["phase"] == 2 and event["step"] == 3:
            raise SystemExit("killed")

    with pytest.raises(SystemExit):
        run_phases(broken, progress=crash)
    resumed = open_run(Workspace.open(tmp_path / "ws"), "broken", stream=memory_stream)
    run_phases(resumed)
    a, b = final_weights(straight.dir), final_weights(broken.dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (
        resumed.model.config.peer_generations == straight.model.config.peer_generations == [[[8, 3], [16, 3], [24, 3]]]
    )
    phases = lambda run: json.loads((run.dir / "results.json").read_text())["phases"]  # noqa: E731
    assert [p["growth_shock_bpb"] for p in phases(broken)] == [p["growth_shock_bpb"] for p in phases(straight)]
    assert phases(broken)[2]["growth_shock_per_slice_bpb"] == {"a": 0.0, "b": 0.0}


@pytest.mark.parametrize("impl", IMPLS)
def test_nested_gates_keep_the_function_and_weigh_a_generation_by_its_share(impl):
    torch.manual_seed(3)
    layer, _ = pair(impl)
    layer.eval()
    x = torch.randn(48, 24)
    y0 = layer(x)
    layer.grow(4, generation_topk=5, generation_gate="nested")
    assert torch.equal(layer(x), y0)
    with torch.no_grad():
        layer.V[81:].normal_()
    y1 = layer(x)
    layer.grow(2, generation_topk=3, generation_gate="nested")
    assert torch.equal(layer(x), y1)
    scores, _ = layer.retrieve(x)
    gates = layer.gates(scores)
    # generation g's slots: exp(s) / Σ exp over the slots of generations 0..g
    torch.testing.assert_close(gates[..., :5], scores[..., :5].softmax(-1))
    torch.testing.assert_close(gates[..., 5:10], scores[..., :10].softmax(-1)[..., 5:])
    torch.testing.assert_close(gates[..., 10:], scores.softmax(-1)[..., 10:])
    with pytest.raises(ValueError, match="gated"):
        layer.grow(1, generation_topk=1, generation_gate="own")


def test_the_gate_of_grown_generations_survives_a_checkpoint(tmp_path):
    model = _small_model()
    model.grow(4, generation_topk=3, generation_gate="nested")
    path = tmp_path / "m.safetensors"
    save_model(model, path)
    loaded = load_model(path)
    assert [p.config.generation_gate for p in loaded.peer_layers()] == ["nested", "nested"]


def _repeat_and_novel_stream(size: int = 12000):
    """Slices a, again (a's bytes exactly: nothing new), novel (bytes the model never saw)."""
    from conftest import MemorySlice, MemoryStream

    stream = MemoryStream(slices=("a",), size=size)
    a = stream.slices[0]
    again = MemorySlice("again", {split: a.tokens(split).tobytes() for split in ("train", "validation", "test")})
    rng = np.random.default_rng(1)
    symbols = np.frombuffer(b"0123456789#@%&*{}[]<>|~^$", dtype=np.uint8)
    novel = MemorySlice(
        "novel",
        {
            split: rng.choice(symbols, n).tobytes()
            for split, n in (("train", size), ("validation", size // 4), ("test", size // 4))
        },
    )
    stream.slices += [again, novel]
    return stream


def test_auto_growth_grows_nothing_for_repeated_data_and_never_passes_the_budget(tmp_path):
    """Issue 24: growth on demand — a slice that repeats an earlier one's data grows nothing, a novel one
    grows, within max_experts per layer; each phase records what it grew and why."""
    from test_train import make_run

    from lifelong_peer.train import run_phases

    stream = _repeat_and_novel_stream()
    budget = 11 * 11  # 8 sub-keys per half now: room for 3 more
    kw = {"base_steps": 20, "grow": "auto", "max_experts": budget, "usage_tokens": 2048, "grow_topk": 2}
    _, run = make_run(tmp_path, stream, "lifelong-grow", **kw)
    results = run_phases(run)
    grown = [p.extra.get("grow") for p in results.phases]
    assert all(r["k"] == 0 and "no old slices" in r["reason"] for r in grown[0])  # nothing to compare with
    again, novel = grown[1], grown[2]
    assert all(r["k"] == 0 and r["need"] < 0.02 and "no growth" in r["reason"] for r in again)
    assert all(r["need"] >= 0.02 and r["k"] > 0 for r in novel)
    for r in novel:  # the need asks for more than the budget holds: cut to fit, and said so
        assert r["experts_after"] == budget and "budget 121 experts per layer" in r["reason"]
    assert all(p.num_experts <= budget * len(run.model.peer_layers()) for p in results.phases)
    assert all(layer.num_experts <= budget for layer in run.model.peer_layers())
