"""Use what a run trained (issue 26): score any text under its latest or any phase's model, every phase's model
side by side, the novelty of a new slice, a time-period guess for a text, and samples from any phase's model.

Text is packed as ingest packs documents (``streams.packing``: the separator before each document), so a file of a
slice's held-out documents scores as the run's own evaluation does; bits per byte divide by the text's UTF-8 bytes
whatever the tokenizer. Models come from the run's checkpoints: the latest (edits by hand included, as ``lpeer
eval --reevaluate`` scores) or ``phase-NNN.safetensors`` — which ``keep_checkpoints = "latest"`` prunes for every
phase but the newest, so what needs old phases' models says which were pruned and how to keep them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from . import advice
from .data import eval_windows
from .errors import UserError
from .evaluate import scored_bytes
from .generate import SampleConfig, generate
from .hooks.growth import need_inputs, slice_need
from .index import GrowthRule, budget_subkeys, growth_need, subkeys_for_need
from .streams.sources import TABULAR, ReadOptions, open_source
from .streams.tokenize import encode_array, tokenizer_fingerprint

#: what a FILE|TEXT argument that names a file looks like, so that a mistyped path is not scored as text
_FILE_SUFFIXES = (*TABULAR, ".txt")


# --- text ------------------------------------------------------------------------------------------------


def read_documents(source: str, text_field: str = "text", encoding: str = "utf-8") -> dict:
    """FILE|TEXT → ``{"documents": [str], "source": "file" | "text"}``: a path that exists is read as ``lpeer
    ingest`` reads it (JSONL / CSV / Parquet, a folder of them, a ``datasets`` save directory: ``text_field`` of
    each record; a ``.txt`` file or a folder of them: each file one document), anything else is the text."""
    path = Path(source)
    if not path.exists():
        if "\n" not in source and source.lower().endswith(_FILE_SUFFIXES) and " " not in source.strip():
            raise UserError(f"{source}: no such file (to score this string as text, add a space or a line break)")
        return {"documents": [source], "source": "text"}
    saved = path.is_dir() and any((path / f).exists() for f in ("dataset_info.json", "dataset_dict.json", "state.json"))
    files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
    txt = not saved and not any(p.suffix.lower() in TABULAR for p in files)  # .txt: one document per file, undated
    src = open_source(source, ReadOptions(encoding=encoding, time_from_name="" if txt else None))
    documents = []
    for where, fields, problem in src.records([text_field]):
        if problem is not None:
            raise UserError(f"{where}: {problem}")
        field = "text" if txt else text_field
        text = fields.get(field)
        if not isinstance(text, str):
            got = "no such field" if field not in fields else f"not a string ({type(text).__name__})"
            raise UserError(f"{where}: field {field!r}: {got} (choose the text's field with --text-field)")
        documents.append(text)
    return {"documents": documents, "source": "file"}


def pack(tokenizer, documents: list[str]) -> tuple[np.ndarray, int]:
    """(tokens (N,) ``SEP doc SEP doc …`` as ingest packs them, UTF-8 bytes of the documents)."""
    if not any(documents):
        raise UserError("there is no text to score")
    sep = np.array([tokenizer.separator_id])
    parts = []
    for i, text in enumerate(documents):
        if "\x00" in text and tokenizer.name == "bytes":
            raise UserError(f"document {i + 1} contains a NUL character (reserved as the document separator)")
        parts += [sep, encode_array(tokenizer, text).astype(np.int64)]
    return np.concatenate(parts), sum(len(t.encode("utf-8")) for t in documents)


def split_documents(tokens: np.ndarray, separator: int) -> list[np.ndarray]:
    """Packed tokens (N,) → each document's tokens, its separator first (what ``pack`` makes of one document)."""
    starts = np.flatnonzero(np.asarray(tokens) == separator)
    ends = [*starts[1:], len(tokens)]
    return [np.asarray(tokens[a:b]) for a, b in zip(starts, ends, strict=True) if b - a > 1]


def score_tokens(model, tokens: np.ndarray, num_bytes: int, context: int, max_tokens: int | None = None) -> dict:
    """Nats per token and bits per byte of ``model`` on packed ``tokens`` (N,) whose text has ``num_bytes`` bytes.

    ``max_tokens`` None: every token after the first — full windows of ``context`` predictions, then the rest in
    a shorter one — over the text's bytes. An int: the run's own evaluation with ``eval_tokens = max_tokens``,
    exactly (``evaluate.evaluate_all``): its windows (``data.eval_windows``) and its bytes rule (``scored_bytes``).
    Returns ``{"nll", "bpb", "tokens" (predicted), "bytes"}``.
    """
    if len(tokens) < 2:
        raise UserError("the text is too short to score: it needs at least one token")
    windows = eval_windows(tokens, context, max_tokens or 0)
    total, count = model.nll(windows)
    if max_tokens is not None:
        nbytes = scored_bytes(count, num_bytes, len(tokens))
    else:
        if count < len(tokens) - 1:  # full windows predicted tokens[1 : count + 1]; the tail follows on
            tail = torch.from_numpy(np.asarray(tokens[count:], dtype=np.int64))[None]
            more, extra = model.nll(tail)
            total, count = total + more, count + extra
        nbytes = max(1, num_bytes)
    return {"nll": total / count, "bpb": total / (nbytes * np.log(2)), "tokens": count, "bytes": nbytes}


# --- models of a run ---------------------------------------------------------------------------------------


def phase_path(run, phase: int) -> Path:
    """The checkpoint of the model after ``phase`` (-1: the base); UserError for a phase the run has not finished."""
    done = run.state()["completed_phases"]
    if not -1 <= phase < done:
        have = f"phases 0..{done - 1}" if done else "no phase yet"
        raise UserError(f"run {run.config.run!r} has no phase {phase} (it has finished {have})")
    return run.checkpoints / ("base.safetensors" if phase < 0 else f"phase-{phase:03d}.safetensors")


def pruned_note(run, phases: list[int]) -> str:
    """Which phases' models were pruned, and how a run keeps them."""
    keep = advice.command(
        advice.KEEP_ALL.replace("STREAM", "{stream}"), run.workspace and run.workspace.root, stream=run.config.stream
    )
    listed = ", ".join(map(str, phases))
    return (
        f"the models of phase(s) {listed} of run {run.config.run!r} were pruned (keep_checkpoints = "
        f"\"{run.config.train.keep_checkpoints}\" keeps the base's and the newest phase's); to keep every phase's "
        f"model, train with `{keep}`"
    )


def load_model(run, phase: int | None = None) -> dict:
    """The run's model after ``phase`` (-1: the base; None: the latest, edits by hand included), on ``run.device``,
    also left in ``run.model``. Returns ``{"model", "phase" (None: the starting model), "checkpoint"}``."""
    if phase is None:
        loaded = run.load_latest()
        return {"model": run.model, "phase": loaded["phase"], "checkpoint": loaded["checkpoint"].name}
    path = phase_path(run, phase)
    if not path.exists():
        raise UserError(pruned_note(run, [phase]))
    run.model = run.read_model(path).to(run.device)
    return {"model": run.model, "phase": phase if phase >= 0 else None, "checkpoint": path.name}


def _phases(run) -> list[dict]:
    """Base and every finished phase: ``{"phase", "slice" (trained in it; None for the base), "path" | None}``."""
    done = run.state()["completed_phases"]
    rows = []
    for phase in range(-1, done):
        path = phase_path(run, phase)
        rows.append({"phase": phase, "slice": run.config.slices[phase] if phase >= 0 else None, "path": path})
    for row in rows:
        row["path"] = row["path"] if row["path"].exists() else None
    return rows


# --- lpeer score -----------------------------------------------------------------------------------------


def score_run(
    run,
    source: str,
    phase: int | None = None,
    mode: str = "one",
    max_tokens: int | None = None,
    text_field: str = "text",
) -> dict:
    """``lpeer score RUN FILE|TEXT``: the text's bits per byte under one model (``mode`` one: the latest or
    ``phase``), under every phase's model (``all``), or the slices ranked by it (``date``, ``date_text``).

    Returns ``{"run", "source", "documents", "bytes", "tokens", "mode", ...}``: one adds ``phase``, ``checkpoint``
    and ``score`` (``score_tokens``); all adds ``phases`` [{phase (-1: the base), slice, checkpoint, pruned, score}]
    and ``note`` (which were pruned; None when none); date adds ``date_text``'s ranking.
    """
    if mode not in ("one", "all", "date"):
        raise ValueError(f"score mode must be one, all or date, got {mode!r}")
    if mode != "one" and phase is not None:
        raise UserError("--phase chooses one model; --all-phases and --date use every phase's")
    read = read_documents(source, text_field)
    tokens, num_bytes = pack(run.stream.tokenizer, read["documents"])
    head = {"run": run.config.run, "source": read["source"], "documents": len(read["documents"])}
    head |= {"bytes": num_bytes, "tokens": len(tokens), "mode": mode, "max_tokens": max_tokens}
    context = run.config.context
    if mode == "date":
        return head | date_text(run, tokens, num_bytes, max_tokens)
    if mode == "one":
        loaded = load_model(run, phase)
        score = score_tokens(loaded["model"], tokens, num_bytes, context, max_tokens)
        return head | {"phase": loaded["phase"], "checkpoint": loaded["checkpoint"], "score": score}
    rows = []
    for row in _phases(run):
        model = run.read_model(row["path"]).to(run.device) if row["path"] else None
        score = score_tokens(model, tokens, num_bytes, context, max_tokens) if model is not None else None
        name = row["path"].name if row["path"] else None
        rows.append({"phase": row["phase"], "slice": row["slice"], "checkpoint": name, "pruned": model is None})
        rows[-1]["score"] = score
    pruned = [r["phase"] for r in rows if r["pruned"]]
    return head | {"phases": rows, "note": pruned_note(run, pruned) if pruned else None}


def phase_scores(
    run, texts: list[tuple[np.ndarray, int]], max_tokens: int | None = None, progress: Callable | None = None
) -> tuple[list[str], np.ndarray]:
    """(trained slices, bits per byte (len(texts), slices)): each packed text (tokens, bytes) under the model of
    the phase that trained each slice — what dating ranks. Refuses a run whose phase models were pruned."""
    rows = [r for r in _phases(run) if r["phase"] >= 0]
    if len(rows) < 2:
        raise UserError(f"run {run.config.run!r} has finished {len(rows)} phase(s); dating needs two trained slices")
    if missing := [r["phase"] for r in rows if r["path"] is None]:
        raise UserError("dating needs the model of every phase: " + pruned_note(run, missing))
    bpb = np.zeros((len(texts), len(rows)))
    for j, row in enumerate(rows):
        model = run.read_model(row["path"]).to(run.device)
        for i, (tokens, num_bytes) in enumerate(texts):
            bpb[i, j] = score_tokens(model, tokens, num_bytes, run.config.context, max_tokens)["bpb"]
        if progress:
            progress({"event": "dated", "phase": row["phase"], "of": len(rows)})
    return [r["slice"] for r in rows], bpb


def date_text(run, tokens: np.ndarray, num_bytes: int, max_tokens: int | None = None) -> dict:
    """Rank the run's trained slices by the text's bits per byte under the model of the phase that trained each
    (lowest first): ``{"ranking": [{rank, slice, phase, start, end, bpb}], "guess": slice, "chance": 1 / slices}``.

    A simple guess: the model just trained on a period fits that period's text best. Its accuracy, measured on
    held-out documents against chance, is in RESULTS.md (``benchmarks/dating.py``)."""
    slices, bpb = phase_scores(run, [(tokens, num_bytes)], max_tokens)
    order = np.argsort(bpb[0], kind="stable")
    ranking = []
    for rank, j in enumerate(order, 1):
        data = run.slice_data(slices[j])
        ranking.append(
            {"rank": rank, "slice": slices[j], "phase": int(j), "start": data.start, "end": data.end, "bpb": bpb[0, j]}
        )
    return {"ranking": ranking, "guess": ranking[0]["slice"], "chance": 1 / len(slices)}


def novelty(run, slice_name: str, stream: str | None = None, phase: int | None = None) -> dict:
    """``lpeer score RUN --slice NAME [--stream S]``: how far a new slice is from what the model already serves.

    The measured need that growth on demand uses, by the functions the growth hook calls (``hooks.growth``):
    ``slice_need`` — the slice's bits per byte (train split) next to the old slices' (validation) under the same
    model, need = max(0, 1 − old / new), and the sub-keys per half ``--grow auto`` would add for it within the
    run's budget — and, per PEER layer, ``index.growth_need`` on the layer inputs ``need_inputs`` samples: the
    share of the slice's query halves scoring below the old slices' 10% quantile (``poorly_served_new``; the old
    slices' own share is 0.1 by construction) and its excess over that baseline. The inputs are sampled with the
    seed of the growth before the model's next phase, so for the run's next slice these are the very numbers
    ``--grow auto`` would measure. Old slices: those the model has trained on, less the new one.
    """
    new = _new_slice(run, slice_name, stream)
    loaded = load_model(run, phase)
    trained = run.config.slices[: (loaded["phase"] + 1 if loaded["phase"] is not None else 0)]
    same = stream is None or stream == run.config.stream
    old = [s for s in trained if not (same and s == slice_name)]
    need = slice_need(run, new, old)
    rule, tc = GrowthRule(), run.config.train
    _, new_x, old_x = need_inputs(run, len(trained), new, old)
    layers = []
    for pos, peer in enumerate(run.model.peer_layers()):
        cover = growth_need(peer, new_x[pos], old_x[pos] if old_x else None, rule)
        wanted = subkeys_for_need(peer.num_subkeys, need["need"], rule) if need["need"] is not None else 0
        layers.append(
            {
                "layer": pos,
                "experts": peer.num_experts,
                "poorly_served_new": cover["poorly_served_new"],
                "baseline": rule.quantile,
                "coverage_need": cover["need"],
                "grow_auto_subkeys": budget_subkeys(peer.num_subkeys, wanted, tc.max_experts or None),
            }
        )
    head = {"run": run.config.run, "phase": loaded["phase"], "checkpoint": loaded["checkpoint"]}
    head |= {"stream": stream or run.config.stream, "slice": slice_name, "split": "train"}
    return head | {
        "new_bpb": need["new_bpb"],
        "old_bpb": need["old_bpb"],
        "old_slices": need["old_per_slice"],
        "need": need["need"],
        "min_excess": rule.min_excess,
        "layers": layers,
        "note": f"slice {slice_name!r} was trained on by this model" if same and slice_name in trained else None,
    }


def _new_slice(run, slice_name: str, stream: str | None):
    """The slice object ``novelty`` measures: of the run's stream, or of ``stream`` with the same tokenizer."""
    if stream is None or stream == run.config.stream:
        data = run.slice_data(slice_name)
    else:
        from .streams.store import open_stream

        other = open_stream(run.workspace, stream)
        if tokenizer_fingerprint(other.tokenizer) != tokenizer_fingerprint(run.stream.tokenizer):
            raise UserError(
                f"stream {stream!r} was ingested with tokenizer {other.tokenizer.name!r}, run {run.config.run!r} "
                f"reads {run.stream.tokenizer.name!r}; ingest it with --tokenizer {run.stream.tokenizer.name}"
            )
        data = other.slice(slice_name)
    if len(data.tokens("train")) < 2:
        raise UserError(f"slice {slice_name!r} has no training text to measure (its train split is empty)")
    return data


# --- lpeer generate ------------------------------------------------------------------------------------


def generate_run(run, prompt: str, phase: int | None = None, cfg: SampleConfig | None = None) -> dict:
    """``lpeer generate``: sample a continuation of ``prompt`` from the run's latest or ``phase``'s model
    (``generate.generate``). Returns its dict with ``run``, ``phase``, ``checkpoint`` and the settings."""
    cfg = cfg or SampleConfig()
    loaded = load_model(run, phase)
    vocab = getattr(loaded["model"].config, "vocab_size", None)
    vocab = min(vocab, run.stream.tokenizer.vocab_size) if vocab else None
    out = generate(loaded["model"], run.stream.tokenizer, prompt, cfg, vocab)
    head = {"run": run.config.run, "phase": loaded["phase"], "checkpoint": loaded["checkpoint"]}
    settings = {"temperature": cfg.temperature, "top_p": cfg.top_p, "max_bytes": cfg.max_bytes, "seed": cfg.seed}
    return head | settings | out


__all__ = [
    "date_text",
    "generate_run",
    "load_model",
    "novelty",
    "pack",
    "phase_scores",
    "read_documents",
    "score_run",
    "score_tokens",
    "split_documents",
]
