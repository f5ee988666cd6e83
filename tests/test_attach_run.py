"""Bring your own model through the trainer and the CLI (issue 11): a tiny random GPT-2 and its own
tokenizer in a local directory, a stream ingested with ``--tokenizer hf:DIR``, lifelong phases, offline."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from typer.testing import CliRunner  # noqa: E402

from lifelong_peer.checkpoint import load_tensors  # noqa: E402
from lifelong_peer.cli.main import app, main  # noqa: E402
from lifelong_peer.errors import UserError  # noqa: E402
from lifelong_peer.run import new_run, open_run  # noqa: E402
from lifelong_peer.streams import open_stream  # noqa: E402
from lifelong_peer.train import run_phases  # noqa: E402
from lifelong_peer.workspace import Workspace  # noqa: E402

runner = CliRunner()
WORDS = {
    2000: "the state of the union is strong and the people are free",
    2001: "we the people of the nation ask for peace trade and growth",
}
PEER = {"num_subkeys": 4, "heads": 2, "topk": 2, "dim_key": 8}
ATTACH = {"layers": [1], "peer": PEER, "trainable": ["transformer.ln_f.*"], "context": 16}
TRAIN = {"steps": 4, "batch_size": 2, "eval_tokens": 64, "usage_tokens": 64, "warmup": 1, "grow": "2"}
TRAINABLE = ("transformer.ln_f.",)


def _tokenizer(directory, corpus: list[str]):
    """A small byte-level BPE tokenizer with an end-of-text token, saved like a model's (offline)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<eos>", "<unk>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus * 5, trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")
    fast.save_pretrained(directory)
    return fast


def _gpt2(directory, vocab: int, seed: int) -> None:
    """A 2-block random GPT-2 with a vocabulary padded past the tokenizer's (as real models often are)."""
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=vocab, n_positions=32, eos_token_id=0)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(directory)


def _documents() -> list[dict]:
    docs = []
    for year, text in WORDS.items():
        words = text.split()
        for i in range(60):
            body = " ".join(words[(i + j) % len(words)] for j in range(12 + i % 5))
            docs.append({"id": f"{year}-{i}", "text": f"{body} — é {i}", "time": f"{year}-03-01"})
    return docs


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Workspace with stream ``news`` (ingested by the CLI with the base's tokenizer) and ``bytes`` (bytes)."""
    root = tmp_path_factory.mktemp("byom")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")  # everything must come from local directories
        mp.setenv("HF_HOME", str(root / "hf-home"))
        base = root / "tiny-gpt2"
        fast = _tokenizer(base, list(WORDS.values()))
        _gpt2(base, len(fast) + 12, seed=0)
        data = root / "news.jsonl"
        docs = _documents()
        data.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
        ws = Workspace.init(root / "ws")
        split = ["--split", "0.8,0.1,0.1", "-w", str(ws.root), "--format", "json"]
        result = runner.invoke(app, ["ingest", str(data), "--name", "news", "--tokenizer", f"hf:{base}", *split])
        assert result.exit_code == 0, result.output
        assert runner.invoke(app, ["ingest", str(data), "--name", "bytes", *split]).exit_code == 0
        yield {"root": root, "base": base, "ws": ws, "docs": docs, "tokenizer": fast}


def test_ingest_with_the_models_tokenizer(env):
    stream = open_stream(env["ws"], "news")
    fast = env["tokenizer"]
    assert stream.tokenizer.name == f"hf:{env['base']}" and stream.separator == fast.eos_token_id
    # bits per byte stay honest: the bytes are the documents' UTF-8 bytes, whatever the tokens
    total = sum(s.num_bytes(split) for s in stream.slices for split in ("train", "validation", "test"))
    assert total == sum(len(d["text"].encode()) for d in env["docs"])
    tokens = stream.slices[0].tokens("train")
    assert tokens[0] == fast.eos_token_id and tokens.max() < len(fast)
    cut = [i for i, t in enumerate(tokens) if t == fast.eos_token_id] + [len(tokens)]
    first = fast.decode(tokens[cut[0] + 1 : cut[1]].tolist())
    assert first in {d["text"] for d in env["docs"]}
    assert 0 < len(tokens) < stream.slices[0].num_bytes("train")  # BPE packs several bytes per token


def _run(env, run_id, **train):
    return new_run(env["ws"], "news", "lifelong-grow", {**TRAIN, **train}, None, None, run_id, None, None, dict(ATTACH, base_model=str(env["base"])))  # fmt: skip


def _base_state(env) -> dict[str, torch.Tensor]:
    return transformers.GPT2LMHeadModel.from_pretrained(env["base"]).state_dict()


def test_lifelong_phases_keep_the_base_and_checkpoint_only_the_delta(env):
    run = _run(env, "lib")
    results = run_phases(run)
    assert len(results.phases) == 2 and all(b > 0 for b in results.eval["validation"].after[-1].bpb)
    assert results.phases[1].num_experts > results.phases[0].num_experts  # grown before phase 1
    config = json.loads((run.dir / "config.json").read_text())
    assert config["model"] is None and config["attach"]["base_model"] == str(env["base"])
    path = run.checkpoints / "phase-001.safetensors"
    tensors, meta = load_tensors(path)
    assert "attach_config" in meta and "model_config" not in meta
    for key in tensors:
        kind, name = key.split("::", 1)
        if kind in ("model", "opt", "fisher"):
            assert ".peer." in name or name.removeprefix("hf.").startswith(TRAINABLE), key
    assert any(k.startswith("model::transformer.ln_f.") for k in tensors)
    base_tensors, base_meta = load_tensors(run.checkpoints / "base.safetensors")
    assert base_meta["format"] == "lifelong-peer/attached/1" and all(".peer." in k or k.startswith(TRAINABLE) for k in base_tensors)  # fmt: skip

    # the rebuilt model: every base weight bit-identical to the pretrained one, except those left trainable
    model = open_run(env["ws"], "lib").read_model(path)
    rebuilt = model.hf.state_dict()
    for name, t in _base_state(env).items():
        moved = name.replace("h.1.mlp.", "h.1.mlp.mlp.")  # add mode: the MLP sits inside the PEER branch
        if name.startswith(TRAINABLE):
            assert not torch.equal(rebuilt[moved], t), f"{name} was not trained"
        else:
            assert torch.equal(rebuilt[moved], t), name
    layer = model.peer_layers()[0]
    assert layer.V.any() and layer.frozen.any() and not layer.frozen.all()  # trained; old experts frozen


def test_resume_is_bit_identical_and_a_wrong_base_is_refused(env):
    straight = _run(env, "straight", checkpoint_every=2)
    run_phases(straight)
    broken = _run(env, "broken", checkpoint_every=2)

    def crash(event):
        if event["event"] == "step" and event["phase"] == 1 and event["step"] == 3:
            raise SystemExit("killed")

    with pytest.raises(SystemExit):
        run_phases(broken, progress=crash)
    assert json.loads((broken.dir / "state.json").read_text())["step"] == 2

    # the same directory name with other weights, then another directory: both refused by fingerprint
    other = env["root"] / "other-gpt2"
    shutil.copytree(env["base"], other)
    _gpt2(other, len(env["tokenizer"]) + 12, seed=1)
    config_path = broken.dir / "config.json"
    config = json.loads(config_path.read_text())
    config["attach"]["base_model"] = str(other)
    config_path.write_text(json.dumps(config))
    with pytest.raises(UserError, match="does not match the one this checkpoint was trained on"):
        run_phases(open_run(env["ws"], "broken"))
    config["attach"]["base_model"] = str(env["base"])
    config_path.write_text(json.dumps(config))

    events = []
    run_phases(open_run(env["ws"], "broken"), progress=events.append)
    assert {"event": "resume", "phase": 1, "step": 2} in events  # from the mid-phase checkpoint
    a, _ = load_tensors(straight.checkpoints / "phase-001.safetensors")
    b, _ = load_tensors(broken.checkpoints / "phase-001.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    losses = lambda d: [json.loads(x)["loss"] for x in (d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert losses(straight.dir) == losses(broken.dir)


def test_cli_run_on_a_base_model(env):
    ws, base = str(env["ws"].root), str(env["base"])
    toml = env["root"] / "run.toml"
    toml.write_text(
        "[train]\neval_tokens = 64\nusage_tokens = 64\nwarmup = 1\n[attach.peer]\n"
        + "".join(f"{k} = {v}\n" for k, v in PEER.items())
    )
    args = ["run", "-w", ws, "--stream", "news", "--base-model", base, "--attach", "add", "--layers", "1"]
    args += [
        "--trainable",
        "transformer.ln_f.*",
        "--context",
        "16",
        "--config",
        str(toml),
        "--strategy",
        "lifelong-grow",
    ]
    args += ["--steps", "2", "--batch-size", "2", "--grow", "2", "--name", "byom-cli", "--format", "json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["run"] == "byom-cli"
    config = json.loads((env["ws"].run_dir("byom-cli") / "config.json").read_text())
    assert config["attach"] == {
        "base_model": base,
        "layers": [1],
        "mode": "add",
        "peer": {**config["attach"]["peer"], **PEER},
        "trainable": ["transformer.ln_f.*"],
        "context": 16,
    }
    assert config["attach"]["peer"]["dim"] == 256  # the template's; attach sets the base's width
    _, meta = load_tensors(env["ws"].run_dir("byom-cli") / "checkpoints" / "phase-001.safetensors")
    assert meta["attach_config"]["peer"]["dim"] == 32 and meta["attach_config"]["peer_subkeys"] == [6]
    # the run's other commands read the attached model through the same rebuild
    for command in (
        ["inspect", "byom-cli", "--text", "the union"],
        ["grow", "byom-cli", "--subkeys", "1"],
        ["eval", "byom-cli"],
    ):
        result = runner.invoke(app, [*command, "--workspace", ws, "--format", "json"])
        assert result.exit_code == 0, (command, result.output)
    assert json.loads(runner.invoke(app, ["inspect", "byom-cli", "-w", ws, "--format", "json"]).stdout)["layers"][0]["num_experts"] == 49  # fmt: skip


@pytest.mark.parametrize(
    "args, message",
    [
        (["--stream", "news", "--base-model", "{base}", "--base", "{base}/x.safetensors"], "give one"),
        (["--stream", "news", "--layers", "1"], "--layers only apply with --base-model"),
        (["--stream", "news", "--base-model", "{base}", "--layers", "six"], "must be block numbers"),
        (["--stream", "news", "--base-model", "{base}", "--layers", "5"], "do not exist; the model has 2 blocks"),
        (["--stream", "news", "--base-model", "{base}", "--strategy", "dense"], "strategy 'dense' shape"),
        (["--stream", "news", "--base-model", "{base}", "--context", "64"], "exceeds base model"),
        (["--stream", "news", "--base-model", "{root}/nowhere"], "nowhere': no such directory"),
        (["--stream", "bytes", "--base-model", "{base}"], "ingested with tokenizer 'bytes', but base model"),
        (["--stream", "other", "--base-model", "{base}"], "which is not the tokenizer of base model"),
        (["--resume", "lib", "--base-model", "{base}"], "drop the other options"),
    ],
)
def test_cli_refusals_are_one_line_errors(env, monkeypatch, capsys, args, message):
    root, base = env["root"], env["base"]
    if "other" in args and not (root / "other-tok").exists():  # the same text under another tokenizer
        _tokenizer(root / "other-tok", ["a quite different corpus of words", "nothing like the union"])
        (root / "other-tok" / "config.json").write_text("{}")
        src = root / "news.jsonl"
        ingest = ["ingest", str(src), "--name", "other", "--tokenizer", f"hf:{root / 'other-tok'}"]
        assert runner.invoke(app, [*ingest, "-w", str(env["ws"].root)]).exit_code == 0
    argv = ["lpeer", "run", "-w", str(env["ws"].root), "-q"] + [a.format(base=base, root=root) for a in args]
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit) as exit_:
        main()
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    assert message in " ".join(err.split()) and "Traceback" not in err
