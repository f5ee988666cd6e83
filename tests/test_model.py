"""The language model and its checkpoint round trip (issue 2)."""

import pytest
import torch

from lifelong_peer import CheckpointError, LanguageModel, ModelConfig, PEERConfig
from lifelong_peer.checkpoint import load_model, save_model
from lifelong_peer.optim import build_optimizer


def config(**kw) -> ModelConfig:
    peer = PEERConfig(num_subkeys=6, heads=2, topk=3, dim_key=8)
    return ModelConfig(dim=32, layers=3, heads=2, context=32, peer=peer, **kw)


def test_eval_mode_is_causal():
    torch.manual_seed(0)
    model = LanguageModel(config(peer_blocks="all")).eval()
    x = torch.randint(0, 256, (2, 20))
    logits, _ = model(x)
    x2 = x.clone()
    x2[:, 12:] = torch.randint(0, 256, (2, 8))
    logits2, _ = model(x2)
    torch.testing.assert_close(logits[:, :12], logits2[:, :12])
    assert not torch.allclose(logits[:, 12:], logits2[:, 12:])


def test_nll_scores_in_eval_mode_by_chunks_and_restores_the_mode():
    """The one scorer: summed cross-entropy of every next token, with BatchNorm on its running
    statistics (not the scored batch's), the same whatever the chunking, and training mode kept."""
    torch.manual_seed(0)
    model = LanguageModel(config(peer_blocks="all"))
    model.train()
    for p in model.peer_layers():  # running statistics far from any batch's, so the mode shows
        p.norm.running_mean.fill_(3.0)
    windows = torch.randint(0, 256, (5, 17))
    total, count = model.nll(windows, batch_size=2)
    assert model.training and count == 5 * 16
    with torch.no_grad():
        logits, _ = model.eval()(windows[:, :-1])
        ref = torch.nn.functional.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten(), reduction="sum")
        train_logits, _ = model.train()(windows[:, :-1])
    assert total == pytest.approx(float(ref), rel=1e-5)
    assert not torch.allclose(logits, train_logits)  # the mode matters, so the check above means something


@pytest.mark.parametrize("spec,expected", [("middle", [1]), ("all", [0, 1, 2]), ("none", []), ("0,2", [0, 2])])
def test_peer_block_choice(spec, expected):
    model = LanguageModel(config(peer_blocks=spec))
    assert model.config.peer_block_indices() == expected
    assert len(model.peer_layers()) == len(expected)


def test_bad_model_configs_are_refused():
    with pytest.raises(ValueError, match="peer_blocks"):
        config(peer_blocks="7")
    with pytest.raises(ValueError, match="divide"):
        ModelConfig(dim=30, heads=4)


def test_checkpoint_round_trip_of_grown_partly_frozen_model(tmp_path):
    torch.manual_seed(0)
    model = LanguageModel(config(peer_blocks="0,2"))
    opt = build_optimizer(model, lr=1e-2)
    x = torch.randint(0, 256, (4, 17))
    for _ in range(2):  # move BatchNorm statistics and weights away from init
        opt.zero_grad()
        model(x[:, :-1], x[:, 1:])[1].backward()
        opt.step()
    model.grow(3, layer=1)
    model.peer_layers()[1].freeze([0, 5, 70], subkeys=True)
    path = tmp_path / "model.safetensors"
    save_model(model, path)
    loaded = load_model(path)
    assert loaded.config.peer_subkeys == [6, 9]
    assert loaded.peer_layers()[1].num_experts == 81
    assert torch.equal(loaded.peer_layers()[1].frozen, model.peer_layers()[1].frozen)
    assert torch.equal(loaded.peer_layers()[1].frozen_subkeys, model.peer_layers()[1].frozen_subkeys)
    model.eval()
    loaded.eval()
    assert torch.equal(model(x)[0], loaded(x)[0])


def test_loader_refuses_pickle_and_mismatched_tensors(tmp_path):
    bad = tmp_path / "model.pt"
    torch.save({"a": torch.zeros(1)}, bad)
    with pytest.raises(CheckpointError, match="pickle"):
        load_model(bad)
    model = LanguageModel(config())
    path = tmp_path / "m.safetensors"
    save_model(model, path)
    from lifelong_peer.checkpoint import load_tensors, save_tensors

    tensors, meta = load_tensors(path)
    meta["model_config"]["peer"]["num_subkeys"] = 7  # config now implies other shapes
    save_tensors(path, tensors, meta)
    with pytest.raises(CheckpointError, match="shape"):
        load_model(path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError):
        load_model(path)


def test_active_params_are_fewer_than_total_with_peer():
    model = LanguageModel(config())
    assert model.active_params_per_token() < model.num_params()
