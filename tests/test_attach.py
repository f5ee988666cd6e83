"""Attaching PEER layers to Hugging Face causal LMs (issue 11): tiny random-weight models, offline."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lifelong_peer import CheckpointError, LanguageModel, ModelConfig, PEERConfig, UserError  # noqa: E402
from lifelong_peer import attach as attach_fn  # noqa: E402
from lifelong_peer.attach import (  # noqa: E402
    AttachedLM,
    PEERBranch,
    decoder_blocks,
    load_attached,
    load_base,
    peer_layers,
    save_attached,
)
from lifelong_peer.checkpoint import load_tensors, save_model  # noqa: E402
from lifelong_peer.index import collect_usage  # noqa: E402
from lifelong_peer.optim import build_optimizer  # noqa: E402
from lifelong_peer.streams.hf_tokenizer import HFTokenizer  # noqa: E402

PEER_CFG = PEERConfig(dim=32, num_subkeys=8, heads=2, topk=4, dim_key=16)
ARCHS = ["gpt2", "llama"]


def make_base(arch: str, seed: int = 0):
    """A 2-block random-weight causal LM (vocab 100, width 32), in eval mode."""
    torch.manual_seed(seed)
    if arch == "gpt2":
        cfg = transformers.GPT2Config(
            n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=64, bos_token_id=0, eos_token_id=0
        )
        model = transformers.GPT2LMHeadModel(cfg)
    else:
        cfg = transformers.LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            vocab_size=100,
            max_position_embeddings=64,
            bos_token_id=0,
            eos_token_id=0,
        )
        model = transformers.LlamaForCausalLM(cfg)
    return model.eval()


def tokens(seed: int = 1, shape=(2, 12)) -> torch.Tensor:
    return torch.randint(0, 100, shape, generator=torch.Generator().manual_seed(seed))


def base_logits(model, idx):
    with torch.no_grad():
        return model(input_ids=idx).logits


def train_steps(model: AttachedLM, steps: int = 3, seed: int = 5) -> None:
    opt = build_optimizer(model, lr=1e-2)
    model.train()
    for s in range(steps):
        batch = tokens(seed + s, (4, 13))
        _, loss = model(batch[:, :-1], batch[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()


@pytest.mark.parametrize("arch", ARCHS)
def test_add_mode_keeps_logits_and_the_branch_is_live(arch):
    base = make_base(arch)
    idx = tokens()
    before = base_logits(base, idx)
    model = attach_fn(base, layers=[0, 1], mode="add", peer=PEER_CFG)
    assert isinstance(model, AttachedLM) and len(model.peer_layers()) == 2
    assert model.config.context == 64 and model.config.vocab_size == 100
    with torch.no_grad():
        logits, loss = model(idx)
    assert loss is None
    torch.testing.assert_close(logits, before, rtol=0, atol=1e-6)
    # the branch really is in the forward pass: non-zero v changes the logits
    with torch.no_grad():
        model.peer_layers()[0].V.normal_()
        changed, _ = model(idx)
    assert (changed - before).abs().max() > 1e-3


def test_a_bfloat16_base_keeps_its_logits_and_trains_a_float32_peer():
    base = make_base("llama").to(torch.bfloat16)
    idx = tokens()
    before = base_logits(base, idx)
    model = attach_fn(base, layers=[1], peer=PEER_CFG)
    assert model.config.dtype == "bfloat16" and model.peer_layers()[0].U.dtype == torch.float32
    with torch.no_grad():
        assert torch.equal(model(idx)[0], before)
    train_steps(model, steps=1)
    assert model.peer_layers()[0].V.any()


@pytest.mark.parametrize("arch", ARCHS)
def test_replace_mode_equals_the_base_without_that_mlp(arch):
    base = make_base(arch)
    reference = make_base(arch)  # same weights; its block-1 MLP zeroed = "no FFN in block 1"
    with torch.no_grad():
        for p in decoder_blocks(reference)[1].mlp.parameters():
            p.zero_()
    idx = tokens()
    model = attach_fn(base, layers=[1], mode="replace", peer=PEER_CFG)
    branch = decoder_blocks(model.hf)[1].mlp
    assert isinstance(branch, PEERBranch) and branch.mlp is None
    with torch.no_grad():
        logits, _ = model(idx)
    torch.testing.assert_close(logits, base_logits(reference, idx), rtol=0, atol=1e-6)


def test_layer_choice_and_refusals():
    model = attach_fn(make_base("llama"), peer=PEER_CFG)  # default: the middle block
    assert model.config.layers == [1]
    assert isinstance(model.hf.model.layers[1].mlp, PEERBranch)
    assert not isinstance(model.hf.model.layers[0].mlp, PEERBranch)
    assert peer_layers(model.hf) == model.peer_layers() == peer_layers(model)
    assert model.peer_layers()[0].config.dim == 32  # forced to the hidden size
    assert attach_fn(make_base("gpt2"), layers=[-1], peer=PEER_CFG).config.layers == [1]
    with pytest.raises(UserError, match="already has PEER"):
        attach_fn(model.hf, layers=[0], peer=PEER_CFG)
    with pytest.raises(UserError, match="2 blocks"):
        attach_fn(make_base("gpt2"), layers=[2], peer=PEER_CFG)
    with pytest.raises(UserError, match=r"'nope\.\*' matches no parameter"):
        attach_fn(make_base("gpt2"), peer=PEER_CFG, trainable=["nope.*"])
    with pytest.raises(UserError, match="exceeds the base's max_position_embeddings"):
        attach_fn(make_base("gpt2"), peer=PEER_CFG, context=65)
    with pytest.raises(UserError, match="no decoder blocks"):
        attach_fn(torch.nn.Sequential(torch.nn.Linear(4, 4)), peer=PEER_CFG)


@pytest.mark.parametrize("arch", ARCHS)
def test_training_moves_only_peer_and_chosen_weights(arch):
    base = make_base(arch)
    chosen = "transformer.ln_f.*" if arch == "gpt2" else "model.norm.*"
    model = attach_fn(base, layers=[0], peer=PEER_CFG, trainable=[chosen])
    hf_before = {k: v.clone() for k, v in model.hf.state_dict().items()}
    names = [n for n, _ in model.hf.named_parameters()]
    trainable = {n for n, p in model.hf.named_parameters() if p.requires_grad}
    assert trainable == {n for n in names if ".peer." in n or n.startswith(chosen[:-1])}
    train_steps(model)
    after = model.hf.state_dict()
    for name, t in hf_before.items():
        if ".peer." in name or name.startswith(chosen[:-1]):
            continue
        assert torch.equal(after[name], t), f"base weight {name} changed"
    assert not torch.equal(after[chosen.replace("*", "weight")], hf_before[chosen.replace("*", "weight")])
    peer = model.peer_layers()[0]
    assert peer.V.abs().sum() > 0  # v started at zero and was trained


def test_growth_and_freezing_on_an_attached_layer():
    model = attach_fn(make_base("gpt2"), layers=[1], peer=PEER_CFG)
    train_steps(model, steps=2)
    layer = model.peer_layers()[0]
    U_old, V_old = layer.U.detach().clone(), layer.V.detach().clone()
    new = model.grow(2, generator=torch.Generator().manual_seed(0))
    layer = model.peer_layers()[0]
    assert layer.num_experts == 100 and model.config.peer_subkeys == [10]
    assert torch.equal(new[0], torch.arange(64, 100))
    assert torch.equal(layer.U[:64], U_old) and torch.equal(layer.V[:64], V_old)
    assert not layer.V[64:].any()  # grown experts start with v = 0
    layer.freeze(torch.arange(0, 64))
    train_steps(model, steps=3, seed=11)
    assert torch.equal(layer.U[:64], U_old) and torch.equal(layer.V[:64], V_old)
    assert layer.V[64:].abs().sum() > 0, "no new expert was trained"


def test_save_load_round_trip_holds_only_the_delta(tmp_path):
    model = attach_fn(make_base("llama"), layers=[0, 1], peer=PEER_CFG, trainable=["model.norm.*"])
    train_steps(model, steps=2)
    model.grow(1, layer=0)
    model.peer_layers()[0].freeze([0, 5, 7])
    train_steps(model, steps=1, seed=20)
    path = tmp_path / "attached.safetensors"
    save_attached(model, path)
    tensors, _ = load_tensors(path)
    assert all(".peer." in k for k in tensors if k != "model.norm.weight") and "model.norm.weight" in tensors
    assert not any("self_attn" in k or "embed_tokens" in k for k in tensors)
    loaded = load_attached(path, base_model=make_base("llama"))
    assert loaded.config.peer_subkeys == [9, 8] and loaded.config.trainable == ["model.norm.*"]
    assert torch.equal(loaded.peer_layers()[0].frozen, model.peer_layers()[0].frozen)
    idx = tokens(3)
    with torch.no_grad():
        a, _ = model(idx)
        b, _ = loaded(idx)
    assert torch.equal(a, b)
    assert not loaded.hf.model.layers[0].self_attn.q_proj.weight.requires_grad
    assert loaded.hf.model.norm.weight.requires_grad


def test_wrong_base_is_refused(tmp_path):
    model = attach_fn(make_base("gpt2"), layers=[0], peer=PEER_CFG)
    path = tmp_path / "attached.safetensors"
    save_attached(model, path)
    with pytest.raises(UserError, match="does not match the one this checkpoint was trained on"):
        load_attached(path, base_model=make_base("gpt2", seed=1))
    with pytest.raises(UserError, match="does not match"):
        load_attached(path, base_model=make_base("llama"))
    with pytest.raises(UserError, match="built in memory; pass it"):
        load_attached(path)
    save_model(LanguageModel(ModelConfig(dim=32, heads=2, layers=1)), tmp_path / "byte.safetensors")
    with pytest.raises(CheckpointError, match="not an attached-model checkpoint"):
        load_attached(tmp_path / "byte.safetensors", base_model=make_base("gpt2"))


def test_local_base_loads_offline_and_missing_files_are_named(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # an empty cache: nothing can come from it
    base = make_base("gpt2")
    base.save_pretrained(tmp_path / "tiny")
    loaded = load_base(str(tmp_path / "tiny"))
    idx = tokens()
    torch.testing.assert_close(base_logits(loaded, idx), base_logits(base, idx), rtol=0, atol=0)
    # the recorded path lets load_attached find the base by itself
    model = attach_fn(loaded, layers=[1], peer=PEER_CFG)
    assert model.config.base == str(tmp_path / "tiny")
    save_attached(model, tmp_path / "a.safetensors")
    assert torch.equal(load_attached(tmp_path / "a.safetensors")(idx)[0], model(idx)[0])

    with pytest.raises(UserError, match="no such directory"):
        load_base(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"config\.json is missing"):
        load_base(str(tmp_path / "empty"))
    (tmp_path / "tiny" / "model.safetensors").unlink()
    with pytest.raises(UserError, match=r"no \*\.safetensors weights"):
        load_base(str(tmp_path / "tiny"))
    with pytest.raises(
        UserError, match=r"'someone/not-cached': its config\.json is not in the Hugging Face cache and HF_HUB_OFFLINE"
    ):
        load_base("someone/not-cached")


def test_an_unreachable_hub_reads_the_cache_at_once_and_names_what_is_missing(tmp_path):
    """Without HF_HUB_OFFLINE and without a network, the hub client retried ~50 s before failing or falling
    back to its cache. One probe of the hub now sends base models and tokenizers to the cache at once: a cached
    model loads, a missing one is one sentence that says the hub is out of reach (nothing listens on port 9)."""
    import os
    import subprocess
    import sys

    base = make_base("gpt2")
    repo = tmp_path / "hf" / "hub" / "models--someone--tiny"
    base.save_pretrained(repo / "snapshots" / "0123abcd")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    script = """
import sys
from lifelong_peer import UserError
from lifelong_peer.attach import load_base
from lifelong_peer.streams.hf_tokenizer import HFTokenizer
print(sum(float(p.detach().double().sum()) for p in load_base("someone/tiny").parameters()))
for load in (load_base, HFTokenizer):
    try:
        load("someone/not-cached")
    except UserError as e:
        print(e)
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    env |= {"HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": "http://127.0.0.1:9"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    total, model_error, tokenizer_error = done.stdout.strip().splitlines()
    assert float(total) == pytest.approx(sum(float(p.detach().double().sum()) for p in base.parameters()), rel=1e-12)
    reach = "not in the Hugging Face cache and cannot reach the Hugging Face Hub at http://127.0.0.1:9"
    assert model_error.startswith("base model 'someone/not-cached': its config.json is " + reach), model_error
    assert tokenizer_error.startswith("tokenizer 'someone/not-cached': its files are " + reach), tokenizer_error


@pytest.mark.parametrize("arch", ARCHS)
def test_the_trainer_and_index_manager_accept_an_attached_model(arch):
    model = attach_fn(make_base(arch), layers=[0, 1], peer=PEER_CFG)
    windows = tokens(4, (3, 13))
    total, count = model.nll(windows)
    with torch.no_grad():
        logits, _ = model(windows[:, :-1])
    ref = torch.nn.functional.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten(), reduction="sum")
    assert count == 36 and total == pytest.approx(float(ref), rel=1e-6)
    usage = collect_usage(model, windows[:, :-1], None, sample_inputs=100)
    assert usage["tokens"] == 36 and set(usage["inputs"]) == {0, 1}
    assert usage["inputs"][0].shape[1] == 32
    # counts like LanguageModel: the base's weights (one input-embedding row; GPT-2's tied matrix is
    # used in full as the output layer) plus, per PEER layer, query net, sub-keys and h·k experts
    base_params = sum(p.numel() for p in make_base(arch).parameters())
    peer_total = sum(p.numel() for layer in model.peer_layers() for p in layer.parameters())
    assert model.num_params() == base_params + peer_total
    per_peer = 32 * 2 * 16 + 8 * 16 + 2 * 2 * 4 * 32
    skipped_rows = 0 if arch == "gpt2" else 99 * 32
    assert model.active_params_per_token() == base_params - skipped_rows + 2 * per_peer
    with pytest.raises(ValueError, match="exceeds the model's context"):
        model(tokens(1, (1, 65)))


def test_hf_tokenizer_round_trip(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(
        ["the state of the union is strong", "we the people"] * 10,
        trainers.BpeTrainer(
            vocab_size=300, special_tokens=["<eos>", "<unk>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    from tokenizers import decoders

    tok.decoder = decoders.ByteLevel()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")
    fast.save_pretrained(tmp_path / "tok")
    (tmp_path / "tok" / "config.json").write_text("{}")  # a model directory always has one
    hf = HFTokenizer(str(tmp_path / "tok"))
    assert hf.vocab_size == len(fast) and hf.separator_id == fast.eos_token_id
    text = "the union, 1790–2026 — é"
    ids = hf.encode(text)
    assert hf.decode(ids) == text and len(ids) < len(text.encode())
    assert hf.name == f"hf:{tmp_path / 'tok'}"
