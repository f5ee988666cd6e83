"""Faithful sparse memory finetuning (issue 16, part 4; Lin et al. 2025)."""

from __future__ import annotations

import torch
from test_train import make_run

from lifelong_peer.checkpoint import load_tensors
from lifelong_peer.index import Usage, UsageLedger, document_frequency, tfidf_scores
from lifelong_peer.train import base_slices, base_windows, run_phases


def _model_state(run_dir, name):
    tensors, _ = load_tensors(run_dir / "checkpoints" / name)
    return {k.split("::", 1)[1]: v for k, v in tensors.items() if k.startswith("model::")}


def test_a_phase_of_smf_trains_nothing_but_the_selected_expert_rows(tmp_path, memory_stream):
    _, run = make_run(tmp_path, memory_stream, "smf", base_steps=4, freeze="tfidf:5", base_data="first")
    run_phases(run, phases=[0])
    before = _model_state(run.dir, "phase-000.safetensors")
    run_phases(run, phases=[1])
    after = _model_state(run.dir, "phase-001.safetensors")
    assert before.keys() == after.keys()
    changed_rows = 0
    for name, old in before.items():
        new = after[name]
        if name.endswith((".U", ".V")):
            frozen = after[name.rsplit(".", 1)[0] + ".frozen"]
            assert int((~frozen).sum()) == 5  # tfidf:5 selects 5 experts in each layer
            assert torch.equal(new[frozen], old[frozen]), name
            changed_rows += int((new[~frozen] != old[~frozen]).any(-1).sum())
        elif not name.endswith(".frozen"):  # every other parameter and buffer (BatchNorm statistics too)
            assert torch.equal(new, old), name
    assert changed_rows > 0  # the selected experts did learn


def test_smf_background_is_the_base_data_first_slice_only_with_a_first_era_base(tmp_path, memory_stream):
    _, run = make_run(tmp_path, memory_stream, "smf", base_data="first")
    assert base_slices(run) == ["a"]
    reads = []
    real = run.windows
    run.windows = lambda name, split, n: reads.append((name, split)) or real(name, split, n)
    windows = base_windows(run)
    assert set(reads) == {("a", "train")} and windows.shape[1] == run.config.context
    _, mix = make_run(tmp_path, memory_stream, "smf", run_id="mix", base_data="mix")
    assert base_slices(mix) == ["a", "b", "c"]


def test_tfidf_with_a_background_ranks_experts_common_there_lower():
    ledger = UsageLedger()
    ledger.add("new", 0, Usage(torch.tensor([1, 2, 3]), torch.tensor([10, 10, 10]), torch.ones(3, dtype=torch.float64)))
    df = torch.tensor([0, 0, 9, 3, 0])  # expert 2 in 9 of 9 documents, 3 in 3, 1 in none
    ids, scores = tfidf_scores(ledger, 0, "new", [], background=(df, 9))
    order = ids[scores.argsort(descending=True)].tolist()
    assert order == [1, 3, 2]
    assert scores[ids == 2].item() == 0.0  # idf = log(10 / 10)


def test_document_frequency_counts_documents_not_retrievals():
    from lifelong_peer import LanguageModel, ModelConfig, PEERConfig

    torch.manual_seed(0)
    model = LanguageModel(
        ModelConfig(dim=16, layers=1, heads=2, context=8, peer=PEERConfig(num_subkeys=4, heads=2, topk=2, dim_key=8))
    )
    windows = torch.randint(0, 256, (5, 8))
    df = document_frequency(model, windows, batch_size=2)
    counts, docs = df[0]
    assert docs == 5
    layer = model.peer_layers()[0]
    model.eval()
    expected = torch.zeros(16, dtype=torch.long)
    for w in windows:
        seen = []
        hook = layer.register_forward_hook(lambda m, a, o, seen=seen: seen.append(m.retrieve(a[0].reshape(-1, 16))[1]))
        with torch.no_grad():
            model(w[None])
        hook.remove()
        expected[seen[0].unique()] += 1
    assert torch.equal(counts, expected)
