"""The index manager (issue 5) against hand computation and brute force."""

import copy
import math
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from lifelong_peer import LanguageModel, ModelConfig, PEERConfig
from lifelong_peer.errors import CheckpointError, UserError
from lifelong_peer.index import (
    ExpertIndex,
    FreezePolicy,
    GrowthRule,
    Usage,
    UsageLedger,
    changed_fraction,
    collect_usage,
    coverage,
    decide_growth,
    expert_vectors,
    freeze_ids,
    freeze_model,
    grow_model,
    inspect_expert,
    inspect_model,
    inspect_text,
    kl_unevenness,
    layer_stats,
    overlap,
    parse_policy,
    place_subkeys,
    poorly_served,
    tfidf_scores,
)
from lifelong_peer.peer import PEER, id_of, pair_of


def usage(pairs: dict[int, tuple[int, float]], tokens: int = 1) -> Usage:
    """A Usage from {id: (count, mass)}."""
    ids = sorted(pairs)
    return Usage(
        torch.tensor(ids, dtype=torch.long),
        torch.tensor([pairs[i][0] for i in ids], dtype=torch.long),
        torch.tensor([pairs[i][1] for i in ids], dtype=torch.float64),
        tokens,
    )


def small_layer(n: int = 8, seed: int = 0, **kw) -> PEER:
    torch.manual_seed(seed)
    cfg = dict(dim=16, num_subkeys=n, heads=2, topk=3, dim_key=8) | kw
    return PEER(PEERConfig(**cfg)).eval()


# --- ledger -------------------------------------------------------------------------------------


def test_record_counts_and_mass_match_a_counter():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 20, (3, 5, 2, 4), generator=g)  # (B, T, heads, topk)
    gates = torch.rand(3, 5, 2, 4, generator=g).softmax(-1)
    ledger = UsageLedger()
    ledger.record("a", 0, ids, gates)
    counts, mass = Counter(), Counter()
    for i, w in zip(ids.flatten().tolist(), gates.flatten().tolist(), strict=True):
        counts[i] += 1
        mass[i] += w
    u = ledger.get("a", 0)
    assert u.ids.tolist() == sorted(counts)
    assert u.counts.tolist() == [counts[i] for i in sorted(counts)]
    torch.testing.assert_close(u.mass, torch.tensor([mass[i] for i in sorted(mass)], dtype=torch.float64))
    assert u.tokens == 15
    with pytest.raises(ValueError):
        ledger.record("a", 0, ids, gates[..., :2])


def test_merge_equals_recording_everything_in_one_ledger():
    g = torch.Generator().manual_seed(1)
    batches = [("s1", 0), ("s2", 0), ("s1", 1), ("s1", 0)]
    data = [(torch.randint(0, 30, (4, 2, 3), generator=g), torch.rand(4, 2, 3, generator=g)) for _ in batches]
    one, a, b = UsageLedger(), UsageLedger(), UsageLedger()
    for k, ((name, layer), (ids, gates)) in enumerate(zip(batches, data, strict=True)):
        one.record(name, layer, ids, gates)
        (a if k % 2 else b).record(name, layer, ids, gates)
    b.merge(a)
    assert set(b.slices()) == set(one.slices()) == {"s1", "s2"}
    for name, layer in set(batches):
        x, y = b.get(name, layer), one.get(name, layer)
        assert torch.equal(x.ids, y.ids) and torch.equal(x.counts, y.counts) and x.tokens == y.tokens
        torch.testing.assert_close(x.mass, y.mass)
    assert b.get("s2", 1).ids.numel() == 0  # never recorded: empty


def test_ledger_round_trips_through_tensors_and_a_file(tmp_path):
    ledger = UsageLedger()
    ledger.add("1790-1850", 0, usage({3: (2, 0.5), 7: (1, 0.25)}, tokens=5))
    ledger.add("a/b weird name", 1, usage({0: (4, 1.0)}, tokens=2))
    ledger.add("empty", 0, Usage.empty())
    tensors, meta = ledger.to_tensors()
    assert all(isinstance(t, torch.Tensor) for t in tensors.values())
    back = UsageLedger.from_tensors(tensors, meta)
    ledger.save(tmp_path / "usage.safetensors")
    loaded = UsageLedger.load(tmp_path / "usage.safetensors")
    for other in (back, loaded):
        assert other.slices() == ["1790-1850", "a/b weird name", "empty"]
        for name, layer in [("1790-1850", 0), ("a/b weird name", 1), ("empty", 0)]:
            x, y = ledger.get(name, layer), other.get(name, layer)
            assert torch.equal(x.ids, y.ids) and torch.equal(x.counts, y.counts) and torch.equal(x.mass, y.mass)
            assert x.tokens == y.tokens
    del tensors["usage.1.mass"]
    with pytest.raises(CheckpointError, match="entry 1"):
        UsageLedger.from_tensors(tensors, meta)
    with pytest.raises(CheckpointError, match="format"):
        UsageLedger.from_tensors({}, {"format": "something else"})


# --- statistics ---------------------------------------------------------------------------------


def test_kl_unevenness_by_hand():
    # z = (3/4, 1/4, 0, 0) over N = 4: log 4 + 3/4 log 3/4 + 1/4 log 1/4
    expected = math.log(4) + 0.75 * math.log(0.75) + 0.25 * math.log(0.25)
    assert kl_unevenness(torch.tensor([3.0, 1.0]), 4) == pytest.approx(expected)
    assert kl_unevenness(torch.tensor([2.0, 2.0, 2.0, 2.0]), 4) == pytest.approx(0.0, abs=1e-12)
    assert kl_unevenness(torch.tensor([5.0]), 4) == pytest.approx(math.log(4))  # all mass on one expert
    assert kl_unevenness(torch.zeros(0), 4) is None


def test_layer_stats_and_overlap_by_hand():
    ledger = UsageLedger()
    ledger.add("a", 0, usage({0: (3, 3.0), 1: (1, 1.0)}, tokens=2))
    ledger.add("b", 0, usage({1: (2, 2.0), 2: (2, 2.0)}, tokens=3))
    frozen = torch.tensor([True, False, False, True, False, False, False, False, False])
    s = layer_stats(ledger, 0, 9, frozen)
    assert s["num_experts"] == 9 and s["frozen"] == 2
    assert s["usage_pct"] == pytest.approx(100 * 3 / 9)
    assert s["dead"] == 6 and s["tokens"] == 5
    z = torch.tensor([3.0, 3.0, 2.0]) / 8
    assert s["kl_unevenness"] == pytest.approx(math.log(9) + float((z * z.log()).sum()))
    assert [t["id"] for t in s["top"]] == [0, 1, 2]  # masses 3, 3 (tie → lower id first), 2
    assert s["slices"]["a"]["usage_pct"] == pytest.approx(100 * 2 / 9)
    assert s["slices"]["b"]["kl_unevenness"] == pytest.approx(math.log(9) + math.log(0.5))
    only_b = layer_stats(ledger, 0, 9, frozen, slice_name="b")
    assert only_b["tokens"] == 3 and "slices" not in only_b
    assert overlap(ledger, 0, "a", "b") == pytest.approx(1 / 3)  # {0,1} vs {1,2}
    assert overlap(ledger, 0, "a", "a") == 1.0
    assert overlap(ledger, 0, "a", "nothing") == 0.0


# --- TF-IDF and freezing policies -----------------------------------------------------------------


def policy_ledger() -> UsageLedger:
    ledger = UsageLedger()
    ledger.add("old1", 0, usage({1: (5, 4.0), 2: (1, 1.0), 3: (2, 2.0)}))
    ledger.add("old2", 0, usage({1: (1, 2.0), 4: (1, 1.0)}))
    ledger.add("new", 0, usage({1: (3, 1.0), 2: (1, 1.0), 5: (4, 1.0), 30: (2, 1.0)}))
    return ledger


def test_tfidf_by_hand():
    ids, scores = tfidf_scores(policy_ledger(), 0, "new", ["old1", "old2"])
    # S = 2 old slices; tf over 10 retrievals; df: id 1 in both, id 2 in old1, ids 5, 30 in none
    assert ids.tolist() == [1, 2, 5, 30]
    expected = [0.3 * math.log(3 / 3), 0.1 * math.log(3 / 2), 0.4 * math.log(3 / 1), 0.2 * math.log(3 / 1)]
    torch.testing.assert_close(scores, torch.tensor(expected, dtype=torch.float64))


def test_each_policy_freezes_exactly_the_experts_it_should():
    layer = small_layer(n=5)  # N = 25 before growth
    layer.grow(1)  # N = 36: ids 25..35 are this phase's new experts
    ledger = policy_ledger()
    args = (layer, ledger, 0, "new", ["old1", "old2"], 25)
    assert freeze_ids("none", *args).tolist() == []
    assert freeze_ids("all-old", *args).tolist() == list(range(25))
    # old mass: id 1 → 6, 3 → 2, 2 → 1, 4 → 1 (total 10)
    assert freeze_ids("usage:60", *args).tolist() == [1]
    assert freeze_ids("usage:61", *args).tolist() == [1, 3]
    assert freeze_ids("usage:90", *args).tolist() == [1, 2, 3]  # tie 2 vs 4 at mass 1: lower id first
    assert freeze_ids("usage:100", *args).tolist() == [1, 2, 3, 4]
    # tfidf ranking: 5 (0.44), 30 (0.22, a new expert), 2 (0.04), 1 (0)
    assert freeze_ids("tfidf:1", *args).tolist() == [i for i in range(25) if i != 5]
    assert freeze_ids("tfidf:2", *args).tolist() == [i for i in range(25) if i != 5]  # 30 is new: not frozen
    assert freeze_ids("tfidf:3", *args).tolist() == [i for i in range(25) if i not in (2, 5)]
    with pytest.raises(UserError, match="usage of the new slice"):
        freeze_ids("tfidf:3", layer, ledger, 0, "unseen", ["old1"], 25)


def test_freeze_model_replaces_the_frozen_set_and_optionally_subkeys():
    model = LanguageModel(ModelConfig(dim=16, layers=2, heads=2, context=16, peer=PEERConfig(num_subkeys=4, topk=2)))
    layer = model.peer_layers()[0]
    layer.freeze([15])
    ledger = UsageLedger()
    ledger.add("old", 0, usage({id_of(torch.tensor(1), torch.tensor(2)).item(): (1, 1.0)}))
    reports = freeze_model(model, "usage:100", ledger, None, ["old"], subkeys=True)
    assert layer.frozen.nonzero().flatten().tolist() == [id_of(torch.tensor(1), torch.tensor(2)).item()]
    assert layer.frozen_subkeys.nonzero().tolist() == [[1, 0], [2, 1]]
    assert reports[0]["frozen"] == 1 and reports[0]["policy"] == "usage:100"
    assert reports[0]["frozen_subkeys_pct"] == pytest.approx(100 * 2 / 8)
    freeze_model(model, "none", ledger, None, ["old"])
    assert not layer.frozen.any() and not layer.frozen_subkeys.any()


@pytest.mark.parametrize("text", ["usage:0", "usage:101", "usage:x", "tfidf:0", "tfidf:2.5", "all", "tfidf"])
def test_bad_policies_are_user_errors(text):
    with pytest.raises(UserError, match="invalid freezing policy"):
        parse_policy(text)


def test_policy_text_round_trips():
    for text in ["none", "all-old", "usage:50", "usage:12.5", "tfidf:100"]:
        assert str(parse_policy(text)) == text
    assert parse_policy(" USAGE:50 ") == FreezePolicy("usage", 50.0)


# --- coverage, growth, placement ------------------------------------------------------------------


def test_coverage_is_the_best_subkey_score_per_half():
    layer = small_layer(n=10)
    x = torch.randn(7, 16)
    cov = coverage(layer, x)
    with torch.no_grad():
        q = layer.queries(x)
        s1 = torch.einsum("thd,nd->thn", q[..., :4], layer.subkeys[:, 0]).amax(-1)
        s2 = torch.einsum("thd,nd->thn", q[..., 4:], layer.subkeys[:, 1]).amax(-1)
    torch.testing.assert_close(cov, torch.stack([s1, s2], dim=-1), rtol=1e-5, atol=1e-5)


def test_coverage_leaves_batchnorm_statistics_alone():
    layer = small_layer().train()
    before = layer.norm.running_mean.clone()
    coverage(layer, torch.randn(20, 16) + 3)
    assert torch.equal(layer.norm.running_mean, before) and layer.training


def clusters(centers: torch.Tensor, per: int, noise: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    pts = centers.repeat_interleave(per, 0)
    return pts + noise * torch.randn(pts.shape, generator=g)


def test_placement_puts_new_subkeys_on_the_clusters_of_query_halves():
    layer = small_layer(n=6, dim_key=16)
    g = torch.Generator().manual_seed(0)
    centers = [F.normalize(torch.randn(4, 8, generator=g), dim=-1) * 3 for _ in range(2)]
    halves = [clusters(c, 50, 0.1, seed) for seed, c in enumerate(centers)]
    new = place_subkeys(layer, halves, 4)
    assert new.shape == (4, 2, 8)
    for side in range(2):
        cos = F.normalize(centers[side], dim=-1) @ F.normalize(new[:, side], dim=-1).T  # (clusters, new keys)
        assert cos.amax(dim=1).min() > 0.98  # every cluster has a new sub-key pointing at it
        # scaled to the old sub-keys' typical length, not the queries'
        torch.testing.assert_close(new[:, side].norm(dim=-1), layer.subkeys[:, side].norm(dim=-1).median().expand(4))
    few = place_subkeys(layer, [halves[0][:2], halves[1]], 4)  # side 0 has only 2 halves: kept, rest drawn
    torch.testing.assert_close(F.normalize(few[:2, 0], dim=-1), F.normalize(halves[0][:2], dim=-1))


def test_decide_growth_grows_only_for_poorly_served_new_data():
    layer = small_layer(n=8, dim=16, dim_key=16, query_norm="none")
    g = torch.Generator().manual_seed(0)
    old = torch.randn(400, 16, generator=g)
    assert decide_growth(layer, torch.randn(400, 16, generator=g), old) == 0  # same distribution
    assert decide_growth(layer, old, None) == 0  # nothing to compare with
    # new data whose queries point away from every sub-key: all halves poorly served → cap n·max_factor
    with torch.no_grad():
        w = layer.query.weight.view(2, 16, 16)  # (heads, dk, dim)
        away = -torch.cat([layer.subkeys[:, 0].mean(0), layer.subkeys[:, 1].mean(0)])  # (dk,)
        new = torch.linalg.lstsq(w[0], away[:, None] * 10).solution.T.repeat(50, 1)
    mask, thresholds = poorly_served(layer, new, old, 0.1)
    cov = coverage(layer, old).flatten(0, 1)
    torch.testing.assert_close(thresholds, cov.quantile(0.1, dim=0))
    f = float(mask.float().flatten(0, 1).mean(0).max())
    e = (f - 0.1) / 0.9
    expected = 8 if e >= 1 else min(8, max(1, round(8 * e / (1 - e))))
    assert decide_growth(layer, new, old) == expected > 0
    assert decide_growth(layer, new, old, GrowthRule(max_factor=0.25)) <= 2


def test_changed_fraction_by_hand():
    before = torch.tensor([[[1, 2], [3, 4]], [[5, 6], [7, 8]], [[1, 2], [3, 4]]])
    after = torch.tensor([[[2, 1], [3, 4]], [[5, 6], [7, 9]], [[1, 2], [4, 3]]])  # only token 1 changed
    assert changed_fraction(before, after) == pytest.approx(1 / 3)
    assert changed_fraction(before, after, per="head") == pytest.approx(1 / 6)


def test_grow_model_reports_the_change_of_old_retrievals_against_brute_force():
    torch.manual_seed(0)
    cfg = ModelConfig(
        dim=16, layers=2, heads=2, context=16, peer=PEERConfig(num_subkeys=12, heads=2, topk=2, dim_key=8)
    )
    model = LanguageModel(cfg).eval()
    old_x, new_x = torch.randn(64, 16), torch.randn(64, 16) + 2
    layer = model.peer_layers()[0]
    with torch.no_grad():
        before = layer.retrieve(old_x)[1]
        y_before = layer(old_x)
    (report,) = grow_model(model, 1, {0: new_x}, {0: old_x})
    with torch.no_grad():
        after = layer.retrieve(old_x)[1]
        new_ids = layer.retrieve(new_x)[1]
        y_after = layer(old_x)
    assert report["k"] == 1 and report["experts_before"] == 144 and report["experts_after"] == 169
    assert model.config.peer_subkeys == [13]
    assert report["placement"] == "kmeans"
    changed = torch.tensor(
        [
            any(set(bh.tolist()) != set(ah.tolist()) for bh, ah in zip(b, a, strict=True))
            for b, a in zip(before, after, strict=True)
        ]
    )
    assert 0 < changed.sum() < len(changed)
    assert report["changed_old"] == pytest.approx(float(changed.float().mean()))
    # tokens whose retrieval did not change get exactly the same output (new experts start at v = 0)
    torch.testing.assert_close(y_after[~changed], y_before[~changed])
    assert report["new_hit"] == pytest.approx(float((new_ids >= 144).flatten(1).any(1).float().mean()))


def test_grow_model_auto_without_shift_does_not_grow():
    torch.manual_seed(0)
    cfg = ModelConfig(dim=16, layers=2, heads=2, context=16, peer=PEERConfig(num_subkeys=6, heads=2, topk=3, dim_key=8))
    model = LanguageModel(cfg)
    x = torch.randn(300, 16)
    (report,) = grow_model(model, "auto", {0: x[:150]}, {0: x[150:]})
    assert report["k"] == 0 and report["experts_after"] == 36
    with pytest.raises(UserError, match="auto"):
        grow_model(model, "auto")


# --- collecting usage from a model -----------------------------------------------------------------


def test_collect_usage_records_what_the_peer_layers_retrieve():
    torch.manual_seed(0)
    cfg = ModelConfig(
        dim=16,
        layers=3,
        heads=2,
        context=16,
        peer_blocks="0,2",
        peer=PEERConfig(num_subkeys=5, heads=2, topk=2, dim_key=8),
    )
    model = LanguageModel(cfg).train()
    windows = torch.randint(0, 256, (5, 12))
    reference = UsageLedger()
    inputs = {}

    def capture(pos):
        def fn(module, args):
            inputs[pos] = args[0]

        return fn

    model.eval()
    handles = [p.register_forward_pre_hook(capture(i)) for i, p in enumerate(model.peer_layers())]
    with torch.no_grad():
        model(windows)
        for pos, layer in enumerate(model.peer_layers()):
            _, r = layer(inputs[pos], return_retrieval=True)
            reference.record("s", pos, r.ids, r.gates)
    for h in handles:
        h.remove()
    model.train()
    ledger = UsageLedger()
    out = collect_usage(model, windows, ledger, "s", batch_size=2, sample_inputs=20)
    assert model.training  # mode restored
    assert out["tokens"] == 60
    for pos in range(2):
        x, y = ledger.get("s", pos), reference.get("s", pos)
        assert torch.equal(x.ids, y.ids) and torch.equal(x.counts, y.counts) and x.tokens == 60
        torch.testing.assert_close(x.mass, y.mass)
        assert out["inputs"][pos].shape == (20, 16)
        # sampled rows are real layer inputs
        rows = inputs[pos].reshape(-1, 16)
        assert all(torch.isclose(rows, r, atol=1e-6).all(-1).any() for r in out["inputs"][pos])


# --- FAISS over expert vectors ----------------------------------------------------------------------


def brute_nearest(vectors: torch.Tensor, queries: torch.Tensor, k: int, exclude: torch.Tensor | None = None):
    s = queries @ vectors.T
    if exclude is not None:
        s[torch.arange(len(exclude)), exclude] = -math.inf
    return s.topk(k, dim=-1)


@pytest.mark.parametrize("kind", ["keys", "u", "v"])
@pytest.mark.parametrize("metric", ["cosine", "ip"])
def test_flat_expert_index_matches_brute_force(kind, metric):
    layer = small_layer(n=9)
    with torch.no_grad():
        layer.V.normal_()
    idx = ExpertIndex(layer, kind=kind, metric=metric, use_gpu=False)
    vec = expert_vectors(layer, kind)
    if metric == "cosine":
        vec = F.normalize(vec, dim=-1)
    q_ids = torch.tensor([0, 5, 40, 80])
    scores, ids = idx.nearest(q_ids, k=4)
    ref_s, ref_i = brute_nearest(vec, vec[q_ids], 4, exclude=q_ids)
    torch.testing.assert_close(scores, ref_s, rtol=1e-5, atol=1e-5)
    assert torch.equal(ids, ref_i)
    queries = torch.randn(3, vec.shape[1])
    scores, ids = idx.nearest(queries, k=5)
    qn = F.normalize(queries, dim=-1) if metric == "cosine" else queries
    ref_s, ref_i = brute_nearest(vec, qn, 5)
    torch.testing.assert_close(scores, ref_s, rtol=1e-5, atol=1e-5)
    assert torch.equal(ids, ref_i)


def test_ivf_expert_index_with_all_lists_probed_is_exact():
    layer = small_layer(n=20, dim=16)  # 400 experts
    idx = ExpertIndex(layer, kind="u", exact_below=100, nlist=8, nprobe=8, use_gpu=False)
    assert "IVF" in type(idx.cpu_index).__name__
    vec = F.normalize(expert_vectors(layer, "u"), dim=-1)
    q_ids = torch.arange(0, 400, 37)
    scores, ids = idx.nearest(q_ids, k=6)
    ref_s, ref_i = brute_nearest(vec, vec[q_ids], 6, exclude=q_ids)
    torch.testing.assert_close(scores, ref_s, rtol=1e-5, atol=1e-5)
    assert torch.equal(ids, ref_i)


def test_index_over_a_subset_reports_expert_ids():
    layer = small_layer(n=9)
    subset = torch.tensor([70, 3, 11, 50, 42])
    idx = ExpertIndex(layer, kind="keys", ids=subset, use_gpu=False)
    vec = F.normalize(expert_vectors(layer, "keys"), dim=-1)
    _, ids = idx.nearest(torch.tensor([11]), k=4)
    others = torch.tensor([3, 42, 50, 70])
    ref = others[(vec[others] @ vec[11]).argsort(descending=True)]
    assert ids[0].tolist() == ref.tolist()
    with pytest.raises(UserError):
        idx.nearest(torch.tensor([12]), k=2)


def test_duplicates_match_brute_force_pairs():
    layer = small_layer(n=10)
    with torch.no_grad():
        layer.U[7] = layer.U[3] * 2  # same direction: cosine 1
        layer.U[50] = layer.U[20] + 1e-4
    idx = ExpertIndex(layer, kind="u", use_gpu=False)
    pairs, scores = idx.duplicates(0.8)
    vec = F.normalize(expert_vectors(layer, "u"), dim=-1)
    sim = vec @ vec.T
    a, b = torch.triu_indices(100, 100, offset=1)
    ref = {(int(i), int(j)) for i, j in zip(a, b, strict=True) if sim[i, j] > 0.8}
    assert {tuple(p) for p in pairs.tolist()} == ref
    assert {(3, 7), (20, 50)} <= ref
    assert scores.tolist() == sorted(scores.tolist(), reverse=True)
    # product keys share halves: experts (i, j) and (i', j) with equal c_i, c_i' are exact duplicates
    with torch.no_grad():
        layer.subkeys[4, 0] = layer.subkeys[2, 0]
    kp, _ = ExpertIndex(layer, kind="keys", use_gpu=False).duplicates(0.9999)
    want = {
        tuple(sorted((int(id_of(torch.tensor(2), torch.tensor(j))), int(id_of(torch.tensor(4), torch.tensor(j))))))
        for j in range(10)
    }
    assert want <= {tuple(p) for p in kp.tolist()}


def test_gpu_request_without_gpu_is_a_user_error():
    from lifelong_peer.index import faiss_gpus

    if faiss_gpus():
        pytest.skip("FAISS sees a GPU here")
    with pytest.raises(UserError, match="GPU"):
        ExpertIndex(small_layer(), use_gpu=True)


def test_placed_growth_is_deterministic_given_the_seed():
    layer_a = small_layer(n=6, dim_key=16)
    layer_b = copy.deepcopy(layer_a)
    halves = [torch.randn(100, 8), torch.randn(100, 8)]
    torch.testing.assert_close(place_subkeys(layer_a, halves, 3, seed=4), place_subkeys(layer_b, halves, 3, seed=4))


# --- inspection -------------------------------------------------------------------------------------


def test_inspect_reports_the_documented_json_shape():
    import json

    torch.manual_seed(0)
    cfg = ModelConfig(dim=16, layers=2, heads=2, context=16, peer=PEERConfig(num_subkeys=5, heads=2, topk=2, dim_key=8))
    model = LanguageModel(cfg)
    ledger = UsageLedger()
    collect_usage(model, torch.randint(0, 256, (3, 10)), ledger, "a")
    collect_usage(model, torch.randint(0, 256, (3, 10)), ledger, "b")
    model.peer_layers()[0].freeze([0, 1])
    report = json.loads(json.dumps(inspect_model(model, ledger)))
    (lay,) = report["layers"]
    assert lay["num_experts"] == 25 and lay["frozen"] == 2
    for key in ("usage_pct", "kl_unevenness", "dead", "top"):
        assert key in lay
    assert set(lay["slices"]) == {"a", "b"} and lay["slices"]["a"]["tokens"] == 30
    assert lay["overlap"]["a"]["b"] == pytest.approx(overlap(ledger, 0, "a", "b"))
    top = lay["top"][0]["id"]
    e = inspect_expert(model, ledger, 0, top, k=3)
    assert e["pair"] == [int(v) for v in pair_of(torch.tensor(top))]
    assert e["slices"] and len(e["nearest"]) == 3 and top not in [n["id"] for n in e["nearest"]]
    with pytest.raises(UserError, match="does not exist"):
        inspect_expert(model, ledger, 0, 25)
    tokens = torch.tensor([72, 105, 33])
    t = inspect_text(model, tokens)["layers"][0]
    with torch.no_grad():
        x = {}
        h = model.peer_layers()[0].register_forward_pre_hook(lambda m, a: x.setdefault("in", a[0]))
        model.eval()(tokens[None])
        h.remove()
        _, ids = model.peer_layers()[0].retrieve(x["in"][0])
    assert t["ids"] == ids.tolist()


# --- growth on demand within a budget (issue 24) ------------------------------------------------------


def test_claim_report_counts_what_the_new_slice_retrieves_and_may_train_by_brute_force():
    model = LanguageModel(ModelConfig(dim=16, layers=2, heads=2, context=16, peer=PEERConfig(num_subkeys=4, topk=2)))
    layer = model.peer_layers()[0]
    ledger = UsageLedger()
    ledger.add("old", 0, usage({1: (5, 3.0), 2: (1, 0.1), 7: (1, 0.1)}))
    ledger.add("new", 0, usage({1: (2, 1.0), 3: (1, 0.5), 7: (1, 0.2), 9: (1, 0.2)}))
    (report,) = freeze_model(model, "usage:90", ledger, "new", ["old"])[:1]
    frozen = set(layer.frozen.nonzero().flatten().tolist())
    new_ids, old_ids = {1, 3, 7, 9}, {1, 2, 7}
    assert frozen == {1}  # expert 1 alone carries 90% of the old mass
    assert report["retrieved"] == len(new_ids)
    assert report["claimed"] == len(new_ids - frozen)
    assert report["unused"] == layer.num_experts - len(new_ids | old_ids)


def test_budget_subkeys_is_the_largest_growth_that_fits_by_brute_force():
    from lifelong_peer.index import budget_subkeys

    for n in (1, 5, 8):
        for k in (0, 1, 3, 20):
            for budget in (0, n * n, n * n + 1, (n + 2) ** 2, (n + 2) ** 2 + 3, 10_000):
                fits = [j for j in range(k + 1) if not budget or (n + j) ** 2 <= budget]
                assert budget_subkeys(n, k, budget) == max(fits, default=0), (n, k, budget)


def test_subkeys_for_need_gives_the_new_keys_the_needed_share():
    from lifelong_peer.index import subkeys_for_need

    rule = GrowthRule(min_excess=0.05, max_factor=1.0)
    assert subkeys_for_need(32, 0.049, rule) == 0
    for need in (0.05, 0.2, 0.4):
        k = subkeys_for_need(32, need, rule)
        assert abs(k / (32 + k) - need) <= 1 / 32  # the share of the new sub-keys is the need, to one sub-key
    assert subkeys_for_need(32, 0.9, rule) == 32 == subkeys_for_need(32, 1.0, rule)  # at most n·max_factor


def test_loss_need_is_zero_for_old_data_and_the_relative_excess_otherwise():
    from lifelong_peer.index import loss_need

    torch.manual_seed(0)
    model = LanguageModel(ModelConfig(dim=16, layers=2, heads=2, context=16, peer=PEERConfig(num_subkeys=4, topk=2)))
    old = torch.randint(0, 50, (4, 17))
    new = torch.randint(0, 256, (4, 17))
    same = loss_need(model, old, {"old": old}, {})
    assert same["need"] == 0.0 and same["new_bpb"] == pytest.approx(same["old_bpb"])
    got = loss_need(model, new, {"old": old}, {"new": 2.0})
    bpb = lambda w, per: model.nll(w)[0] / (w[:, 1:].numel() * per * math.log(2))  # noqa: E731
    assert got["new_bpb"] == pytest.approx(bpb(new, 2.0)) and got["old_bpb"] == pytest.approx(bpb(old, 1.0))
    assert got["need"] == pytest.approx(max(0.0, 1 - bpb(old, 1.0) / bpb(new, 2.0)))
    assert loss_need(model, new, {}, {})["need"] is None


def test_grow_model_never_passes_the_budget_and_says_why():
    torch.manual_seed(0)
    cfg = ModelConfig(dim=16, layers=2, heads=2, context=16, peer=PEERConfig(num_subkeys=6, heads=2, topk=3, dim_key=8))
    model = LanguageModel(cfg)
    x = torch.randn(64, 16)
    (cut,) = grow_model(model, 4, {0: x}, {0: x}, max_experts=8 * 8 + 5)
    assert cut["k"] == 2 and cut["experts_after"] == 64 and "allows 2" in cut["reason"]
    (full,) = grow_model(model, 4, {0: x}, {0: x}, max_experts=70)
    assert full["k"] == 0 and full["experts_after"] == 64
    (auto,) = grow_model(model, "auto", {0: x}, {0: x}, need=0.5, max_experts=10**6)
    assert auto["k"] == 8 and auto["need"] == 0.5 and "need 0.500 ≥ 0.02 → 8 sub-keys per half" in auto["reason"]
