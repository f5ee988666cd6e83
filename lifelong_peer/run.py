"""A run as storage: its directory, state.json, checkpoints, and the objects a phase needs (``Run``).

A run lives in its own directory (``Workspace.run_dir``):

    config.json         the resolved run configuration (stream, slices, strategy, model or attach, training)
    state.json          where the run stands: finished phases and the latest checkpoint (atomic pointer)
    checkpoints/        base.safetensors: the model phase 0 starts from; phase-NNN.safetensors after each phase;
                        phase-NNN-step-SSSSSS.safetensors mid-phase (base-step-SSSSSS in base training);
                        phase-NNN-edit-K.safetensors: the K-th edit by hand (lpeer grow/freeze) after phase NNN
                        (base-edit-K before phase 0) — an edit never rewrites the evaluated checkpoint
    base.json           the trained base's settings key and file record: what base reuse compares (issue 17)
    edits.jsonl         one line per edit by hand
    metrics.jsonl       one line per training step: phase, step, loss, lr, tok/s, experts, frozen fraction
    results.json        the evaluation matrix so far (``lifelong_peer.metrics.RunResults``)

A run checkpoint holds everything exact resume needs besides the seeds: weights, masks, optimizer
moments, the usage ledger and each phase hook's state (``NAME::`` tensors, e.g. EWC's ``fisher::``).

Bring your own model (issue 11): with ``RunConfig.attach`` the run starts from a Hugging Face causal LM
with PEER layers attached (``lifelong_peer.attach``) instead of a byte-level ``LanguageModel``; its
checkpoints hold only the delta (PEER layers + trainable base weights) and the ``AttachConfig``, and
every model is rebuilt on a copy of the base loaded once per run (``Run.read_model``), whose weights
must match the fingerprint recorded at attach time.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from . import advice, distributed
from .attach import ATTACHED_FORMAT, AttachedLM, attached_from_tensors, save_attached
from .bases import base_of_run, key_hash
from .checkpoint import (
    MODEL_FORMAT,
    load_tensors,
    model_from_tensors,
    save_model,
    save_tensors,
)
from .config import AttachOptions, RunConfig, load_config_file, resolve_config
from .data import eval_windows
from .errors import CheckpointError, UserError
from .files import atomic_write_json, checkpoint_name, checkpoint_order, file_record, verify_file
from .hooks import build_hooks
from .model import ModelConfig
from .optim import PEEROptimizer
from .peer_model import PEERModel
from .strategies import strategy_overrides

RUN_CHECKPOINT_FORMAT = "lifelong-peer/run-checkpoint/1"


class Run:
    """A run directory and the objects a phase needs. Built by ``create_run`` or ``Run.open``."""

    def __init__(self, directory: Path, config: RunConfig, stream, workspace=None):
        self.dir = directory
        self.workspace = workspace  # where base reuse looks for other runs' bases (None: only this run)
        self.config = config
        self.stream = stream
        self.device = _device(config.train.device)
        self.model: PEERModel | None = None
        self._base = None  # an attach run's plain base model, loaded once (``base_model``)
        self.hooks = build_hooks(config.train)  # their state travels in the checkpoints
        from .index import UsageLedger

        self.ledger = UsageLedger()
        self.growth_shock: dict | None = None  # this phase's (``index.growth_shock``), for its PhaseRecord
        self.phase_log: dict = {}  # what the hooks decided before this phase and why (grow, freeze), for its PhaseRecord

    # files ------------------------------------------------------------------------------------
    @property
    def checkpoints(self) -> Path:
        return self.dir / "checkpoints"

    def resume_command(self) -> str:
        """The command that continues this run, as the user can type it here (``advice.command``)."""
        workspace = self.workspace.root if self.workspace is not None else self.dir.parent.parent
        return advice.command(advice.RESUME, workspace, run=self.config.run)

    def state(self) -> dict:
        """state.json, validated: ``completed_phases``, ``checkpoint`` (the latest, relative to the run
        directory), its ``phase`` and ``step``, and ``files``: {relative path: {"size", "sha256"}} of
        every checkpoint the run has written and still keeps (issue 10). No file: a run not started."""
        path = self.dir / "state.json"
        if not path.exists():
            return {"completed_phases": 0, "checkpoint": None, "phase": None, "step": None, "files": {}}
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
            raise CheckpointError(f"{path}: corrupted, not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise CheckpointError(f"{path}: corrupted (not a JSON object)")
        data.setdefault("files", {})  # state files written before issue 10 have no listing
        ints = {k: data.get(k) for k in ("completed_phases", "phase", "step")}
        checkpoint, files = data.get("checkpoint"), data["files"]
        lowest = {"phase": -1}  # phase -1: base training
        problem = next(
            (k for k, v in ints.items() if v is not None and (type(v) is not int or v < lowest.get(k, 0))), None
        )
        if problem or not isinstance(ints["completed_phases"], int):
            problem = f"{problem or 'completed_phases'} is not a count"
        elif checkpoint is not None and not (isinstance(checkpoint, str) and checkpoint_order(checkpoint)):
            problem = f"checkpoint {checkpoint!r} is not a checkpoint of this run"
        elif not isinstance(files, dict) or not all(
            re.fullmatch(r"(checkpoints/)?[A-Za-z0-9_-][A-Za-z0-9._-]*", k)
            and isinstance(r, dict)
            and type(r.get("size")) is int
            and isinstance(r.get("sha256"), str)
            for k, r in files.items()
        ):
            problem = "files is not a listing of {path: {size, sha256}}"
        if problem:
            raise CheckpointError(f"{path}: corrupted ({problem})")
        return data

    def slice_data(self, name: str):
        return self.stream.slice(name)

    def windows(self, name: str, split: str, max_tokens: int) -> torch.Tensor:
        return eval_windows(self.slice_data(name).tokens(split), self.config.context, max_tokens)

    # checkpoints --------------------------------------------------------------------------------
    def save_checkpoint(
        self, phase: int, step: int | None, opt: PEEROptimizer | None, completed: int, edit=None, results=None
    ) -> Path:
        """Everything needed to continue; then the state pointer moves to it (both writes atomic).
        ``phase`` -1: base training; ``edit``: an edit by hand of the model after ``phase`` (``save_edit``);
        ``results``: results.json as of this checkpoint, kept in its metadata so that a lost results.json comes
        back even when older phases' models were pruned (``recompute_results``)."""
        name = checkpoint_name(phase, step, edit)
        if not distributed.is_main():  # rank 0 writes; the others wait until it has (issue 9)
            distributed.barrier()
            return self.checkpoints / name
        model_tensors, model_meta = _model_record(self.model)
        tensors = {f"model::{k}": v for k, v in model_tensors.items()}
        for hook in self.hooks:
            tensors.update({f"{hook.name}::{k}": v for k, v in hook.state_tensors().items()})
        ledger_tensors, ledger_meta = self.ledger.to_tensors()
        tensors.update({f"ledger::{k}": v for k, v in ledger_tensors.items()})
        if opt is not None:
            tensors.update({f"opt::{k}": v for k, v in opt.state_tensors(dict(self.model.named_parameters())).items()})
        meta = {
            "format": RUN_CHECKPOINT_FORMAT,
            **model_meta,
            "phase": phase,
            "step": step,
            "completed_phases": completed,
            "ledger": ledger_meta,
            "growth_shock": self.growth_shock if step is not None else None,  # a mid-phase resume keeps it
            "phase_log": self.phase_log if step is not None else {},
            "results": results,
        }
        path = self.checkpoints / name
        save_tensors(path, tensors, meta)
        self._publish(f"checkpoints/{name}", phase, step, completed)
        distributed.barrier()
        return path

    def _publish(
        self, checkpoint: str | None, phase: int | None, step: int | None, completed: int, base_changed: bool = False
    ) -> None:
        """Point state.json at ``checkpoint`` with the integrity listing (issue 10): size + sha256 of every
        checkpoint kept; mid-phase checkpoints it supersedes are then deleted. Rank 0 only."""
        stale = [p for p in self.checkpoints.glob("*-step-*.safetensors") if f"checkpoints/{p.name}" != checkpoint]
        files = {k: r for k, r in self.state()["files"].items() if self.dir / k not in stale}
        base = self.checkpoints / "base.safetensors"
        if base.exists() and (base_changed or "checkpoints/base.safetensors" not in files):
            files["checkpoints/base.safetensors"] = file_record(base)
        if checkpoint is not None:
            files[checkpoint] = file_record(self.dir / checkpoint)
        state = {"completed_phases": completed, "checkpoint": checkpoint, "phase": phase, "step": step, "files": files}
        atomic_write_json(self.dir / "state.json", state)
        for old in stale:
            old.unlink(missing_ok=True)

    def prune_checkpoints(self) -> list[str]:
        """Delete the phase-end checkpoints older than the latest (``keep_checkpoints = "latest"``, issue 24): disk
        use grows with the pool, not with slices × pool. The base and edits by hand stay. state.json stops listing
        them first (a crash in between leaves an unlisted file). Returns the deleted paths, run-relative."""
        state = self.state()
        latest = checkpoint_order(state["checkpoint"] or "")
        old = lambda o: o and latest and o < latest and o[1] == math.inf and not o[2]  # noqa: E731
        stale = [k for k in state["files"] if old(checkpoint_order(k))]
        if stale and distributed.is_main():
            atomic_write_json(
                self.dir / "state.json",
                state | {"files": {k: state["files"][k] for k in state["files"] if k not in stale}},
            )
            for rel in stale:
                (self.dir / rel).unlink(missing_ok=True)
        return stale

    def save_base(self, key: dict | None = None, source: Path | None = None) -> None:
        """Publish base.safetensors, the model phase 0 starts from: ``self.model``, or a copy of the base
        file ``source`` (reused, issue 17). ``key``: the settings a trained base was trained under
        (``train.base_key``), kept in base.json with the file's record so that a later run can reuse it.
        Mid-base checkpoints are superseded by it and deleted."""
        from .files import atomic_write  # at call time: benchmarks/torture.py wraps it to kill mid-write

        path = self.checkpoints / "base.safetensors"
        if distributed.is_main():
            self.checkpoints.mkdir(parents=True, exist_ok=True)
            (self.dir / "base.json").unlink(missing_ok=True)  # describes the file about to be replaced
            if source is not None:
                atomic_write(path, lambda tmp: shutil.copyfile(source, tmp))
            else:
                save_run_model(self.model, path)
            self._publish(None, None, None, completed=0, base_changed=True)
            if key is not None:
                atomic_write_json(self.dir / "base.json", {"key": key_hash(key), **key, "file": file_record(path)})
        distributed.barrier()

    def load_checkpoint(self, path: Path) -> dict:
        """Restore model, hook state and ledger from ``path``; returns its tensors and meta for the rest.

        The file must match its size and sha256 in state.json (when listed there) and its own content
        checksum; every tensor is checked against the saved config. Any problem is a CheckpointError
        naming the file, raised before the run's objects change."""
        from .checkpoint import check_optimizer_state, check_state
        from .errors import CheckpointError
        from .index import UsageLedger

        path = Path(path)
        try:
            rel = path.resolve().relative_to(self.dir.resolve()).as_posix()
        except ValueError:
            rel = None
        record = self.state()["files"].get(rel)
        if record is not None:
            verify_file(path, record)
        tensors, meta = load_tensors(path)
        if meta.get("format") != RUN_CHECKPOINT_FORMAT:
            raise CheckpointError(f"{path}: not a run checkpoint (format {meta.get('format')!r})")
        for key, kinds in (("phase", (int,)), ("step", (int, type(None))), ("completed_phases", (int,))):
            if type(meta.get(key)) not in kinds or (meta[key] or 0) < (-1 if key == "phase" else 0):
                raise CheckpointError(f"{path}: metadata {key!r} is missing or not a count")
        if not isinstance(meta.get("ledger"), dict):
            raise CheckpointError(f"{path}: metadata 'ledger' is missing or not an object")
        model = self.read_model(path, tensors, meta)
        params = dict(model.named_parameters())
        part = lambda prefix: {k.split("::", 1)[1]: v for k, v in tensors.items() if k.startswith(prefix)}  # noqa: E731
        states = [part(f"{hook.name}::") for hook in self.hooks]
        for state in states:
            check_state(path, {k: params[k] for k in state if k in params}, state)
        check_optimizer_state(path, params, part("opt::"))
        ledger = UsageLedger.from_tensors(part("ledger::"), meta["ledger"])
        self.model = model.to(self.device)
        for hook, state in zip(self.hooks, states, strict=True):
            hook.load_state_tensors({k: v.to(self.device) for k, v in state.items()})
        self.ledger = ledger
        self.growth_shock = meta.get("growth_shock") if isinstance(meta.get("growth_shock"), dict) else None
        self.phase_log = meta.get("phase_log") if isinstance(meta.get("phase_log"), dict) else {}
        return {"tensors": tensors, "meta": meta}

    def load_latest(self) -> dict:
        """Model, hook state and ledger of the last finished phase (or the starting model), edits by hand
        included — for inspecting or editing a run between phases. Refuses a run stopped mid-phase.
        Returns ``{"phase": the last finished phase (None: none yet), "checkpoint": its path}``."""
        state = self.state()
        if state["checkpoint"] is None:
            base = self.checkpoints / "base.safetensors"
            if not base.exists():
                raise UserError(f"run {self.config.run!r} has no model yet; start it with {self.resume_command()}")
            self.model = self.read_model(base).to(self.device)
            return {"phase": None, "checkpoint": base}
        if state.get("step") is not None:
            where = "base training" if state["phase"] < 0 else f"phase {state['phase']}"
            raise UserError(
                f"run {self.config.run!r} stopped in the middle of {where}; "
                f"finish it first with {self.resume_command()}"
            )
        self.load_checkpoint(self.dir / state["checkpoint"])
        phase = state["phase"] if state["phase"] >= 0 else None
        return {"phase": phase, "checkpoint": self.dir / state["checkpoint"]}

    def save_edit(self, what: dict) -> Path:
        """Publish the model edited after ``load_latest`` (growth or freezing by hand) as a new checkpoint,
        phase-NNN-edit-K (base-edit-K before phase 0), and log the edit in edits.jsonl (issue 17). The
        evaluated checkpoint stays as it was; the next phase, and resume, start from the edit."""
        state = self.state()
        phase = state["phase"] if state["checkpoint"] is not None else -1
        edits = [o[2] for k in state["files"] if (o := checkpoint_order(k)) and o[0] == phase and o[2]]
        path = self.save_checkpoint(
            phase, None, None, completed=state["completed_phases"], edit=max(edits, default=0) + 1
        )
        if distributed.is_main():
            with open(self.dir / "edits.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps({"time": time.time(), "checkpoint": path.name, **what}) + "\n")
        return path

    def previous_model(self, phase: int) -> PEERModel:
        """The model at the start of ``phase`` before growth: the anchor of L2-SP/EWC and the distillation teacher."""
        name = f"phase-{phase - 1:03d}.safetensors" if phase > 0 else "base.safetensors"
        return self.read_model(self.checkpoints / name).to(self.device).eval()

    def read_model(self, path: Path, tensors: dict | None = None, meta: dict | None = None):
        """The model stored in ``path`` (on the CPU): a run checkpoint's ``model::`` part or a base file,
        byte-level (``MODEL_FORMAT``) or attached (``ATTACHED_FORMAT``: its delta put on a copy of
        ``base_model``, refused when the base's fingerprint differs). Every reader of run files uses it.
        ``tensors``, ``meta``: the file's content when already read."""
        if tensors is None:
            tensors, meta = load_tensors(path)
        if meta.get("format") == RUN_CHECKPOINT_FORMAT:
            tensors = {k.split("::", 1)[1]: v for k, v in tensors.items() if k.startswith("model::")}
            kind = ATTACHED_FORMAT if "attach_config" in meta else MODEL_FORMAT
            meta = {k: v for k, v in meta.items() if k in ("model_config", "attach_config")} | {"format": kind}
        attached = meta.get("format") == ATTACHED_FORMAT
        if attached != (self.config.attach is not None):
            want = "an attached model" if self.config.attach is not None else "a byte-level model"
            raise CheckpointError(f"{path}: does not hold {want}, which is what run {self.config.run!r} trains")
        if attached:
            return attached_from_tensors(path, tensors, meta.get("attach_config"), self.base_model())
        return model_from_tensors(path, tensors, meta)

    def base_model(self):
        """A fresh copy of an attach run's plain base model (``load_base``, read once per run): what
        ``attach`` or ``attached_from_tensors`` modifies in place."""
        if self._base is None:
            from .attach import load_base

            self._base = load_base(self.config.attach.base_model)
        return copy.deepcopy(self._base)


def _model_record(model) -> tuple[dict, dict]:
    """(tensors, metadata entry) of what a checkpoint keeps of ``model``: all of a byte-level model; of an
    attached one only the delta (PEER layers + trainable base weights) and its ``AttachConfig``."""
    if isinstance(model, AttachedLM):
        return model.delta_state_dict(), {"attach_config": model.config.to_dict()}
    return model.state_dict(), {"model_config": model.config.to_dict()}


def save_run_model(model, path: Path) -> None:
    """A run's base.safetensors: ``save_model`` or, for an attached model, ``save_attached`` (the delta)."""
    (save_attached if isinstance(model, AttachedLM) else save_model)(model, path)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device cuda was asked for, but CUDA is not available on this machine")
    return torch.device(name)


def create_run(workspace, cfg: RunConfig, stream=None) -> Run:
    """Make the run directory, write config.json, register the run in the workspace.

    ``stream``: the data (default: ``cfg.stream`` opened from the workspace) — anything with
    ``tokenizer`` and ``slice(name)`` returning objects with ``tokens(split)`` / ``num_bytes(split)``.
    """
    stream_name = cfg.stream
    if stream is None:
        from .streams.store import open_stream

        stream = open_stream(workspace, stream_name)
    if cfg.attach is not None:
        _check_base_model(cfg.attach, stream_name, stream.tokenizer)
    elif cfg.model.vocab_size < stream.tokenizer.vocab_size:
        raise UserError(
            f"model vocab_size {cfg.model.vocab_size} is smaller than the stream's tokenizer ({stream.tokenizer.vocab_size})"
        )
    for name in cfg.slices:
        data = stream.slice(name)
        for split in ("train", "validation"):
            n = len(data.tokens(split))
            if n < 2 or (split == "train" and n <= cfg.context):
                raise UserError(
                    f"slice {name!r} of stream {stream_name!r} has only {n} {split} tokens; "
                    f"training needs more than the context ({cfg.context}) — use a coarser --slice"
                )
    with workspace.lock():  # two processes creating one run: the second is refused, not mixed in
        directory = workspace.run_dir(cfg.run)
        if directory.exists() and any(directory.iterdir()):
            raise UserError(f"run {cfg.run!r} already exists in {workspace.root}; resume it with --resume {cfg.run}")
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write_json(directory / "config.json", cfg.to_dict())
        workspace.register_run(cfg.run, {"stream": stream_name, "strategy": cfg.train.strategy, "dir": str(directory)})
    return Run(directory, cfg, stream, workspace)


def _check_base_model(opts: AttachOptions, stream_name: str, tokenizer) -> None:
    """An attach run's base fits its stream: the stream was tokenized by the base's own tokenizer (the
    same definition, however named), whose ids the base's vocabulary covers (Hugging Face models often
    pad it); sets ``opts.context`` when not given. Reads the base's config and tokenizer, not its weights."""
    from .attach import load_base_config
    from .streams.hf_tokenizer import HFTokenizer

    base = opts.base_model
    hf_config = load_base_config(base)
    vocab = int(hf_config.vocab_size)
    max_pos = getattr(hf_config, "max_position_embeddings", None)
    again = f"ingest it again with --tokenizer hf:{base}"
    if not tokenizer.name.startswith("hf:"):
        raise UserError(
            f"stream {stream_name!r} was ingested with tokenizer {tokenizer.name!r}, but base model {base!r} "
            f"reads its own tokens; {again}"
        )
    if tokenizer.name != f"hf:{base}":
        try:
            own = HFTokenizer(base)
        except UserError:  # a base directory without tokenizer files: the stream's is taken as its own
            own = None
        if own is not None and own.fingerprint() != tokenizer.fingerprint():
            raise UserError(
                f"stream {stream_name!r} was ingested with tokenizer {tokenizer.name!r}, which is not the "
                f"tokenizer of base model {base!r}; {again}"
            )
    if tokenizer.vocab_size > vocab:
        raise UserError(
            f"stream {stream_name!r}: tokenizer {tokenizer.name!r} has {tokenizer.vocab_size:,} tokens, more than "
            f"the {vocab:,} rows of base model {base!r}'s vocabulary"
        )
    if opts.context is None:
        opts.context = min(int(max_pos), 1024) if max_pos else 1024
    if max_pos and opts.context > max_pos:
        raise UserError(f"context {opts.context} exceeds base model {base!r}'s max_position_embeddings ({max_pos})")


@contextlib.contextmanager
def locked_run(workspace, run: str, stream=None, lock: bool = True) -> Iterator[Run]:
    """``open_run`` once the run's own lock (``runs/RUN/.lock``, issue 25) is taken: a second writer is refused with
    the holder's PID. ``lock=False``: open only (a distributed run's other ranks; rank 0 holds the lock)."""
    from .workspace import LOCK, exclusive

    with exclusive(workspace.resolve_run(run) / LOCK, f"run {run!r}") if lock else contextlib.nullcontext():
        opened = open_run(workspace, run, stream)
        # and its stream for reading: `ingest --replace` of it waits for the run to end (issue 25)
        with workspace.stream_lock(opened.config.stream, shared=True) if lock else contextlib.nullcontext():
            yield opened


def open_run(workspace, run: str, stream=None) -> Run:
    """An existing run, for resuming or inspecting."""
    directory = workspace.resolve_run(run)
    try:
        cfg = RunConfig.from_dict(json.loads((directory / "config.json").read_text()))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{directory / 'config.json'}: cannot read the run's config ({e})") from None
    if stream is None:
        from .streams.store import open_stream

        stream = open_stream(workspace, cfg.stream)
    return Run(directory, cfg, stream, workspace)


def new_run(
    workspace,
    stream_name: str,
    strategy: str = "naive",
    overrides: dict | None = None,
    model_overrides: dict | None = None,
    base: str | None = None,
    run_id: str | None = None,
    slices: list[str] | None = None,
    config_file: str | Path | None = None,
    attach: dict | None = None,
) -> Run:
    """Resolve a run's configuration (preset < config file < overrides) and create its directory.

    With a ``base`` checkpoint (a path, or the name of a run of ``workspace``: its base model) the
    model's shape comes from the checkpoint. With ``attach``
    (AttachOptions fields over the config file's ``[attach]`` table; either one names ``base_model``)
    the run starts from that Hugging Face model with PEER attached instead of a byte-level model.
    """
    from .checkpoint import read_meta
    from .streams.store import open_stream

    stream = open_stream(workspace, stream_name)
    slices = slices or [s.name for s in stream.slices]
    for name in slices:
        stream.slice(name)  # UserError listing the slices when unknown
    file_cfg = load_config_file(config_file) if config_file else {"train": {}, "model": {}, "attach": {}}
    train_over = {**file_cfg["train"], **(overrides or {})}
    model_over = {**file_cfg["model"], **(model_overrides or {})}
    run_id = run_id or _new_run_id(workspace, f"{stream_name}-{strategy}")
    if attach or file_cfg["attach"]:
        if base:
            raise UserError(
                "--base starts from a byte-level checkpoint and --base-model from a Hugging Face model; give one"
            )
        if model_over or strategy_overrides(strategy).get("model"):
            what = f"strategy {strategy!r}" if not model_over else "[model] options"
            raise UserError(f"{what} shape the byte-level model and do not apply with --base-model; use [attach]")
        options = AttachOptions.from_dict({**file_cfg["attach"], **(attach or {})})
        _, train_cfg = resolve_config(strategy, train_over)
        cfg = RunConfig(run=run_id, stream=stream_name, slices=slices, model=None, train=train_cfg, attach=options)
        return create_run(workspace, cfg, stream=stream)
    base_model = ModelConfig(vocab_size=stream.tokenizer.vocab_size)
    if base and not Path(base).exists():  # --base RUN: that run's base model (issue 17)
        runs = workspace.manifest()["runs"]
        if base not in runs:
            known = ", ".join(sorted(runs)) or "none yet"
            raise UserError(
                f"--base {base}: no such checkpoint file, nor a run of workspace {workspace.root} ({known})"
            )
        base = str(base_of_run(workspace, base))
    if base:
        meta = read_meta(base)
        try:
            base_model = ModelConfig.from_dict(meta["model_config"])
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"{base}: not a model checkpoint ({e})") from None
        if model_over:
            raise UserError("model options cannot be changed when starting from --base (its shape is fixed)")
    peer_over = model_over.pop("peer", {})
    if not isinstance(peer_over, dict):
        raise UserError(f"[model.peer] must be a table of PEER settings, got {peer_over!r}")
    model_over = {"peer": {**base_model.peer.to_dict(), **peer_over}, **model_over}
    model_cfg, train_cfg = resolve_config(strategy, {**train_over, "model": model_over}, base_model)
    cfg = RunConfig(run=run_id, stream=stream_name, slices=slices, model=model_cfg, train=train_cfg, base=base)
    return create_run(workspace, cfg, stream=stream)


def _new_run_id(workspace, prefix: str) -> str:
    n = 1
    while workspace.run_dir(f"{prefix}-{n}").exists():
        n += 1
    return f"{prefix}-{n}"
