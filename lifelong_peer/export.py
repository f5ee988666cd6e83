"""Export a run's model in a form other tools load (issue 26: ``lpeer export RUN --out DIR``).

A byte-level model: ``model.safetensors`` (the weights under their module names; any safetensors reader opens
it) and ``config.json`` (``model_config``: every shape, and how text becomes tokens). An attached Hugging Face
model: ``base/`` — the plain base's ``save_pretrained`` folder, with its tokenizer when the stream used it, so
``AutoModelForCausalLM.from_pretrained(DIR / "base")`` loads the base as it was — and ``peer.safetensors``, the
PEER delta (PEER layers and the trainable base weights, the ``AttachConfig`` and the base's weights fingerprint,
checked on load). ``load_exported(DIR)`` rebuilds either model, ``README.md`` in DIR says how. The directory is
built beside DIR and renamed onto it (``files.atomic_write_dir``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .attach import AttachedLM, load_attached, load_base, save_attached
from .checkpoint import load_model, save_model
from .errors import UserError
from .files import atomic_write_dir, atomic_write_json, atomic_write_text

EXPORT_FORMAT = "lifelong-peer/export/1"

_README = """# {run}: an exported lifelong-peer model

Run `{run}` (stream `{stream}`), the model {when} (checkpoint `{checkpoint}`), trained on {slices}.
Made by `lpeer export`.

```python
from lifelong_peer.export import load_exported

model = load_exported("{out}")      # a PEERModel: model(idx (B, T)) -> (logits (B, T, V), None)
```

{how}

Text becomes tokens as the run's stream made them: tokenizer `{tokenizer}`, with token {separator} before every
document (`lifelong_peer.streams.tokenize.get_tokenizer("{tokenizer}")`); at most {context} tokens at once.
"""

_HOW = {
    "byte-level": "`model.safetensors` holds the weights under their module names and `config.json` the model's "
    "shape (`model_config`, `lifelong_peer.ModelConfig`): `LanguageModel(ModelConfig.from_dict(config["
    '"model_config"])).load_state_dict(safetensors.torch.load_file("model.safetensors"))` builds the same model.',
    "attached": "`base/` is the base model's `save_pretrained` folder (`AutoModelForCausalLM.from_pretrained` "
    "loads it without PEER); `peer.safetensors` is the PEER delta: `lifelong_peer.attach.load_attached"
    '("peer.safetensors", base_model=load_base("base"))` puts it on the base, after checking the base\'s weights '
    "fingerprint.",
}


def export_model(model, out: str | os.PathLike, tokenizer, info: dict, base=None, force: bool = False) -> dict:
    """Write ``model`` (a ``LanguageModel``, or an ``AttachedLM`` with ``base``, its plain base model) to ``out``.

    ``tokenizer``: the stream's (its name and separator go in config.json; a Hugging Face one is saved in
    ``base/``). ``info``: what config.json and README.md say about the model's origin (run, stream, phase,
    checkpoint, slices). Refuses a non-empty ``out`` unless ``force``. Returns config.json's content and ``files``.
    """
    attached = isinstance(model, AttachedLM)
    if attached and base is None:
        raise ValueError("export_model: an attached model needs its plain base model")
    out = Path(out)
    kind = "attached" if attached else "byte-level"
    config = {"format": EXPORT_FORMAT, "kind": kind, "tokenizer": tokenizer.name, "separator": tokenizer.separator_id}
    config |= {"context": model.config.context, **info}
    config |= {"attach_config": model.config.to_dict()} if attached else {"model_config": model.config.to_dict()}

    def write(tmp: Path) -> None:
        if attached:
            base.save_pretrained(tmp / "base")
            if hasattr(tokenizer, "tokenizer"):  # a Hugging Face tokenizer: the base folder is complete with it
                tokenizer.tokenizer.save_pretrained(tmp / "base")
            save_attached(model, tmp / "peer.safetensors")
        else:
            save_model(model, tmp / "model.safetensors")
        atomic_write_json(tmp / "config.json", config)
        slices = ", ".join(f"`{s}`" for s in info.get("slices", [])) or "no slice yet"
        when = f"after phase {info['phase']}" if info.get("phase") is not None else "before its first phase"
        text = _README.format(out=out, how=_HOW[kind], when=when, **{**config, "slices": slices})
        atomic_write_text(tmp / "README.md", text)

    atomic_write_dir(out, write, replace=force)
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    return config | {"out": str(out), "files": files}


def load_exported(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """The model ``export_model`` wrote to ``path``: a ``LanguageModel`` or an ``AttachedLM``, in eval mode."""
    path = Path(path)
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not an exported lifelong-peer model ({e})") from None
    if not isinstance(config, dict) or config.get("format") != EXPORT_FORMAT:
        raise UserError(f"{path}/config.json: not an exported lifelong-peer model (format {EXPORT_FORMAT} expected)")
    if config.get("kind") == "attached":
        base = load_base(str(path / "base"), dtype=config["attach_config"].get("dtype"))
        model = load_attached(path / "peer.safetensors", base_model=base, device=device)
    else:
        model = load_model(path / "model.safetensors", device)
    return model.eval()


def export_run(run, out: str | os.PathLike, phase: int | None = None, force: bool = False) -> dict:
    """``lpeer export``: the run's latest model (edits by hand included) or ``phase``'s, to ``out``."""
    from .use import load_model as load_run_model

    loaded = load_run_model(run, phase)
    model = loaded["model"].cpu()
    done = 0 if loaded["phase"] is None else loaded["phase"] + 1
    info = {"run": run.config.run, "stream": run.config.stream, "phase": loaded["phase"]}
    info |= {"checkpoint": loaded["checkpoint"], "slices": run.config.slices[:done]}
    base = run.base_model() if isinstance(model, AttachedLM) else None
    return export_model(model, out, run.stream.tokenizer, info, base=base, force=force)


__all__ = ["EXPORT_FORMAT", "export_model", "export_run", "load_exported"]
