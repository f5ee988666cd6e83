"""``lpeer score / generate / export`` on an attached Hugging Face model (issue 26): a tiny random GPT-2 and its own
tokenizer in a local directory (``test_attach_run``'s), offline; the export round trip gives the same logits."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from test_attach_run import ATTACH, PEER, _documents, _gpt2, _tokenizer  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from lifelong_peer.cli.main import app  # noqa: E402
from lifelong_peer.export import load_exported  # noqa: E402
from lifelong_peer.run import new_run, open_run  # noqa: E402
from lifelong_peer.train import run_phases  # noqa: E402
from lifelong_peer.use import load_model, split_documents  # noqa: E402
from lifelong_peer.workspace import Workspace  # noqa: E402

runner = CliRunner()
TRAIN = {"steps": 3, "batch_size": 2, "eval_tokens": 64, "usage_tokens": 64, "warmup": 1, "keep_checkpoints": "all"}

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def env(tmp_path_factory, one_thread):
    """Stream ``news`` ingested with the base's tokenizer and run ``a``: PEER attached to block 1, two phases."""
    root = tmp_path_factory.mktemp("use-attached")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")  # everything must come from local directories
        mp.setenv("HF_HOME", str(root / "hf-home"))
        base = root / "tiny-gpt2"
        fast = _tokenizer(base, [d["text"] for d in _documents()][:4])
        _gpt2(base, len(fast) + 12, seed=0)
        data = root / "news.jsonl"
        data.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in _documents()), encoding="utf-8")
        ws = Workspace.init(root / "ws")
        args = ["ingest", str(data), "--name", "news", "--tokenizer", f"hf:{base}", "--split", "0.8,0.1,0.1"]
        assert runner.invoke(app, [*args, "-w", str(ws.root)]).exit_code == 0
        attach = dict(ATTACH, base_model=str(base), peer=PEER)
        run_phases(new_run(ws, "news", "lifelong-grow", TRAIN, None, None, "a", None, None, attach))
        yield {"root": root, "base": base, "ws": ws}


def _cli(env, *args) -> dict:
    result = runner.invoke(app, [*args, "-w", str(env["ws"].root), "--format", "json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_export_round_trip_of_an_attached_model(env, tmp_path):
    out = tmp_path / "exported"
    got = _cli(env, "export", "a", "--out", str(out))
    assert got["kind"] == "attached" and {"peer.safetensors", "config.json", "README.md"} <= set(got["files"])
    assert any(f.startswith("base/") and f.endswith(".safetensors") for f in got["files"])
    assert (out / "base" / "tokenizer.json").exists()  # the base folder is complete with its tokenizer
    run = open_run(env["ws"], "a")
    idx = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = load_model(run)["model"].eval()(idx)[0]
        assert torch.equal(load_exported(out)(idx)[0], want)
        plain = transformers.AutoModelForCausalLM.from_pretrained(out / "base")  # the base as it was, no PEER
        original = transformers.AutoModelForCausalLM.from_pretrained(env["base"])
        assert torch.equal(plain(idx).logits, original(idx).logits) and not torch.equal(plain(idx).logits, want)


def test_score_and_generate_on_an_attached_model(env, tmp_path):
    run = open_run(env["ws"], "a")
    results = json.loads((run.dir / "results.json").read_text())
    tokenizer = run.stream.tokenizer
    name = run.config.slices[1]
    documents = [tokenizer.decode(d[1:].tolist()) for d in split_documents(run.slice_data(name).tokens("test"), tokenizer.separator_id)]  # fmt: skip
    path = tmp_path / "test.jsonl"
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in documents), encoding="utf-8")
    got = _cli(env, "score", "a", str(path), "--phase", "1", "--max-tokens", "64")
    after = results["eval"]["test"]["after"][1]
    assert got["bytes"] == run.slice_data(name).num_bytes("test")  # bits per byte over the text's UTF-8 bytes
    assert got["score"]["bpb"] == pytest.approx(after["bpb"][1], rel=1e-6)

    args = ("generate", "a", "--prompt", "the state", "--max-bytes", "20", "--seed", "2")
    one, two = _cli(env, *args), _cli(env, *args)
    assert one == two and one["tokens"] and all(t < len(tokenizer.tokenizer) for t in one["tokens"])
