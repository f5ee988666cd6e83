"""Run-level operations beside the phase loop: ``lpeer inspect``, ``lpeer grow``, ``lpeer freeze`` and
``lpeer train``'s new slice (issue 5).

Each takes an opened run (``lifelong_peer.run.open_run``), loads the model and ledger of its last
finished phase (``Run.load_latest``), checks every argument before doing any work, and returns a
JSON-able dict. ``grow_run`` and ``freeze_run`` call the very planners the loop's growth and freezing
hooks call (``hooks.grow_run_model``, ``hooks.freeze_run_model``) and publish the edited model with
``Run.save_edit``. The index manager (``lifelong_peer.index``) knows models, ledgers and FAISS; this
module knows runs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .errors import UserError
from .evaluate import append_eval
from .files import atomic_write_json
from .hooks import freeze_run_model, grow_run_model
from .index import frozen_report, inspect_expert, inspect_model, inspect_text, parse_policy, set_frozen
from .metrics import load_results, save_results
from .peer import PEER
from .run import Run


def _run_layers(run: Run) -> list[PEER]:
    layers = run.model.peer_layers()
    if not layers:
        raise UserError(f"run {run.config.run!r} has no PEER layers (a dense model); nothing to inspect or edit")
    return layers


def _positions(layers: Sequence[PEER], layer: int | None) -> list[int]:
    """The PEER-layer positions a command acts on: all, or ``layer`` after a range check."""
    if layer is None:
        return list(range(len(layers)))
    if not 0 <= layer < len(layers):
        raise UserError(f"PEER layer {layer} does not exist; this model has {len(layers)} (0..{len(layers) - 1})")
    return [layer]


def _check_ids(layers: Sequence[PEER], positions: Sequence[int], ids: Tensor) -> None:
    for pos in positions:
        n = layers[pos].num_experts
        bad = ids[(ids < 0) | (ids >= n)]
        if len(bad):
            raise UserError(f"expert {int(bad[0])} does not exist; PEER layer {pos} has ids 0..{n - 1}")


def _trained_slices(run: Run, exclude: str | None = None) -> list[str]:
    """The slices the run's model has finished training on (in time order), less ``exclude``."""
    done = run.config.slices[: run.state()["completed_phases"]]
    return [s for s in done if s != exclude]


def _check_slice(run: Run, slice_name: str | None) -> None:
    if slice_name is not None:
        run.stream.slice(slice_name)  # UserError naming the stream's slices


def inspect_run(
    run: Run, layer: int | None = None, expert: int | None = None, text: str | None = None, nearest: int = 5
) -> dict:
    """``lpeer inspect``: per-layer usage (``inspect_model``), one expert (``inspect_expert``, in every
    layer or just ``layer``), or what each head retrieves for ``text`` (``inspect_text``).

    Returns ``{"run", "phase", "mode": "layers"|"expert"|"text", ...}``: mode layers adds
    ``layers`` (per layer: num_experts, frozen, usage_pct, kl_unevenness, dead, top, slices,
    overlap, ...); expert adds ``experts`` (one per layer); text adds ``tokens``, ``pieces`` (each
    token decoded), ``truncated`` (the text was cut to the model's context) and ``layers`` (ids,
    gates: (T, heads, topk) nested lists).
    """
    if expert is not None and text is not None:
        raise UserError("give either --expert ID or --text TEXT, not both")
    loaded = run.load_latest()
    layers = _run_layers(run)
    positions = _positions(layers, layer)
    head = {"run": run.config.run, "phase": loaded["phase"]}
    if expert is not None:
        _check_ids(layers, positions, torch.tensor([expert]))
        experts = [inspect_expert(run.model, run.ledger, pos, expert, k=nearest) for pos in positions]
        return head | {"mode": "expert", "experts": experts}
    if text is not None:
        tokenizer = run.stream.tokenizer
        tokens = list(tokenizer.encode(text))
        if not tokens:
            raise UserError("--text is empty; give some text to look up")
        context = run.model.config.context
        truncated = len(tokens) > context
        tokens = tokens[:context]
        out = inspect_text(run.model, torch.tensor(tokens), layer)
        pieces = [tokenizer.decode([t]) for t in tokens]
        return head | {"mode": "text", "tokens": tokens, "pieces": pieces, "truncated": truncated} | out
    return head | {"mode": "layers"} | inspect_model(run.model, run.ledger, layer)


def grow_run(
    run: Run,
    subkeys: int | None = None,
    auto: bool = False,
    slice_name: str | None = None,
    layer: int | None = None,
) -> dict:
    """``lpeer grow``: add ``subkeys`` sub-keys per half (or, with ``auto``, as many as
    ``decide_growth`` finds the new slice ``slice_name`` needs) to every PEER layer or ``layer``.

    The loop's own planner (``hooks.grow_run_model``, one seed and input-sample rule): with a slice,
    layer inputs sampled from its train split place the new sub-keys (k-means on poorly served query
    halves); without one they are drawn at random. Inputs sampled from the trained slices' validation
    splits measure ``changed_old``. The model is saved (``Run.save_edit``) only if some layer grew.
    Returns ``{"run", "phase", "slice", "old_slices", "checkpoint" (None if nothing grew), "layers"}``.
    """
    if auto == (subkeys is not None):
        raise UserError("give either --subkeys K or --auto --slice S")
    if subkeys is not None and subkeys <= 0:
        raise UserError(f"--subkeys must be a positive number of sub-keys per half, got {subkeys}")
    if auto and slice_name is None:
        raise UserError("--auto needs --slice S: the new slice whose coverage decides how much to grow")
    _check_slice(run, slice_name)
    loaded = run.load_latest()
    layers = _run_layers(run)
    _positions(layers, layer)
    old = _trained_slices(run, exclude=slice_name)
    phase = run.state()["completed_phases"]  # the growth comes before this phase, as the loop's would
    reports = grow_run_model(run, phase, "auto" if auto else subkeys, slice_name, old, layer=layer)
    out = {"run": run.config.run, "phase": loaded["phase"], "slice": slice_name, "old_slices": old}
    checkpoint = None
    if any(r["k"] > 0 for r in reports):
        edit = {"command": "grow", "subkeys": "auto" if auto else subkeys, "slice": slice_name, "layers": reports}
        checkpoint = str(run.save_edit(edit))
    return out | {"checkpoint": checkpoint, "layers": reports}


def parse_expert_ids(text: str) -> Tensor | None:
    """``all`` → None; ``3,7,10-12`` → tensor([3, 7, 10, 11, 12]) (sorted, unique); else UserError."""
    spec = text.strip().lower()
    if spec == "all":
        return None
    ids: list[int] = []
    try:
        for part in spec.split(","):
            lo, dash, hi = part.strip().partition("-")
            a, b = int(lo), int(hi) if dash else int(lo)
            if a < 0 or b < a:
                raise ValueError
            ids.extend(range(a, b + 1))
    except ValueError:
        raise UserError(f"invalid expert ids {text!r}; expected all, or ids and ranges like 3,7,10-12") from None
    return torch.tensor(sorted(set(ids)), dtype=torch.long)


def freeze_run(
    run: Run,
    policy: str | None = None,
    unfreeze: str | None = None,
    slice_name: str | None = None,
    subkeys: bool = False,
    layer: int | None = None,
    replace: bool = False,
) -> dict:
    """``lpeer freeze``: freeze what ``policy`` says in every PEER layer — adding to the frozen set, or
    with ``replace`` making the frozen set exactly that (which may unfreeze experts) —, or ``unfreeze``
    experts (``all`` or ids, in every layer or ``layer``); ``subkeys`` also (un)freezes their sub-keys.

    Issue 17: a policy silently replaced the frozen set (2,304 frozen experts became 234); replacing
    is now asked for, and each layer reports its frozen count before and after.

    Policies (``freeze_model``) count every current expert as old and the trained slices (less
    ``slice_name``) as the old slices; ``tfidf:T`` ranks experts by ``slice_name``'s usage,
    recorded here on its train split as the phase loop does. Saves with ``Run.save_edit``.
    Returns ``{"run", "phase", "action", "mode": "add"|"replace"|"unfreeze", "checkpoint", "layers":
    [frozen_report + frozen_before, newly_frozen, unfrozen, ...], "note"}``; ``note`` warns when the
    run's own policy will recompute the frozen set before its next phase.
    """
    if (policy is None) == (unfreeze is None):
        raise UserError("give either --policy POLICY or --unfreeze all|IDS")
    if replace and policy is None:
        raise UserError("--replace applies to --policy only; --unfreeze removes experts from the frozen set")
    parsed = parse_policy(policy) if policy is not None else None
    ids = parse_expert_ids(unfreeze) if unfreeze is not None else None
    if parsed is not None and layer is not None:
        raise UserError("--layer applies to --unfreeze only; a --policy is applied to every PEER layer")
    if parsed is not None and parsed.kind == "tfidf" and slice_name is None:
        raise UserError(f"{parsed} ranks experts by a new slice's usage; give --slice S")
    _check_slice(run, slice_name)
    loaded = run.load_latest()
    layers = _run_layers(run)
    positions = _positions(layers, layer)
    if ids is not None:
        _check_ids(layers, positions, ids)
    before = [(p.frozen.clone(), p.frozen_subkeys.clone()) for p in layers]
    if parsed is not None:
        action, mode = str(parsed), "replace" if replace else "add"
        old = _trained_slices(run, exclude=slice_name)
        freeze_run_model(run, parsed, slice_name, old, subkeys=subkeys)  # the policy's set, exactly
        if not replace:
            with torch.no_grad():
                for peer, (frozen, frozen_subkeys) in zip(layers, before, strict=True):
                    peer.frozen |= frozen
                    peer.frozen_subkeys |= frozen_subkeys
    else:
        action, mode = f"unfreeze {unfreeze.strip()}", "unfreeze"
        for pos in positions:
            if ids is None:
                set_frozen(layers[pos], torch.zeros(0, dtype=torch.long))
            else:
                layers[pos].unfreeze(ids, subkeys=subkeys)
    reports = []
    for pos in positions if parsed is None else range(len(layers)):
        was, now = before[pos][0], layers[pos].frozen
        change = {
            "frozen_before": int(was.sum()),
            "newly_frozen": int((now & ~was).sum()),
            "unfrozen": int((was & ~now).sum()),
        }
        reports.append(frozen_report(pos, layers[pos], action) | change)
    edit = {"command": "freeze", "action": action, "mode": mode, "slice": slice_name, "subkeys": subkeys}
    checkpoint = str(run.save_edit(edit | {"layers": reports}))
    own = run.config.train.freeze
    note = (
        f"run {run.config.run!r} applies its own policy {own} before each phase, which recomputes this frozen set"
        if own != "none"
        else None
    )
    head = {"run": run.config.run, "phase": loaded["phase"], "action": action, "mode": mode, "checkpoint": checkpoint}
    return head | {"layers": reports, "note": note}


def add_slice(run: Run, slice_name: str) -> int:
    """Append a newly ingested slice to a run (data that arrives one slice at a time); returns its phase.

    Earlier models are evaluated on it from their phase-end checkpoints, so the matrix stays complete where they
    are kept (``keep_checkpoints = "latest"`` keeps the base's and the latest: the others' scores are unknown, NaN).
    """
    if slice_name in run.config.slices:
        phase = run.config.slices.index(slice_name)
        if phase < run.state()["completed_phases"]:
            raise UserError(f"run {run.config.run!r} has already trained on slice {slice_name!r}")
        return phase
    run.stream.slice(slice_name)
    run.config.slices.append(slice_name)
    if (run.dir / "results.json").exists():
        results = load_results(run.dir)
        results.slices.append(slice_name)
        for split, evals in results.eval.items():
            models = [run.checkpoints / "base.safetensors"]
            models += [run.checkpoints / f"phase-{i:03d}.safetensors" for i in range(len(evals.after))]
            for row, path in zip([evals.before, *evals.after], models, strict=True):
                if path.exists():
                    append_eval(row, run, run.read_model(path).to(run.device), slice_name, split)
                else:  # pruned (keep_checkpoints = "latest"): the same held-out set (the base's), scores unknown
                    row.nll.append(math.nan), row.bpb.append(math.nan)
                    row.tokens.append(evals.before.tokens[-1]), row.bytes.append(evals.before.bytes[-1])
        save_results(run.dir, results)
    atomic_write_json(run.dir / "config.json", run.config.to_dict())
    return len(run.config.slices) - 1
