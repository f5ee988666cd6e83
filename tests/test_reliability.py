"""Reliability and security (issue 10): integrity listing and fallback, hostile files, full disks,
busy workspaces, and (slow) the SIGKILL torture of a real ``lpeer run``."""

from __future__ import annotations

import errno
import fcntl
import importlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from conftest import MemoryStream

from lifelong_peer import PEERConfig
from lifelong_peer.checkpoint import (
    MODEL_FORMAT,
    load_model,
    load_tensors,
    read_meta,
    save_model,
    save_tensors,
)
from lifelong_peer.config import RunConfig, resolve_config
from lifelong_peer.errors import CheckpointError, UserError
from lifelong_peer.files import IntegrityWarning, file_record
from lifelong_peer.model import LanguageModel, ModelConfig
from lifelong_peer.run import create_run, open_run
from lifelong_peer.train import run_phases
from lifelong_peer.workspace import Workspace

ROOT = Path(__file__).resolve().parents[1]
TINY = ModelConfig(dim=16, layers=2, heads=2, context=16, peer=PEERConfig(num_subkeys=4, heads=2, topk=2, dim_key=8))
OPTIONS = {"steps": 4, "batch_size": 2, "eval_tokens": 64, "usage_tokens": 64, "warmup": 1, "checkpoint_every": 2}
STEP_CKPT = "checkpoints/phase-001-step-000002.safetensors"


def _stream() -> MemoryStream:
    return MemoryStream(slices=("a", "b"), size=600)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A workspace with ``straight`` (2 phases, uninterrupted) and ``stopped`` (killed at phase 1,
    step 3: its newest checkpoint is mid-phase at step 2). Tests work on copies of it."""
    root = tmp_path_factory.mktemp("runs")
    ws, stream = Workspace.init(root / "ws"), _stream()
    model, train = resolve_config("lifelong-grow", {**OPTIONS, "grow": "2"}, TINY)
    for name in ("straight", "stopped"):
        cfg = RunConfig(run=name, stream=stream.name, slices=["a", "b"], model=model, train=train)
        run = create_run(ws, cfg, stream=stream)
        if name == "straight":
            run_phases(run)
            continue

        def crash(event):
            if event["event"] == "step" and event["phase"] == 1 and event["step"] == 3:
                raise SystemExit("killed")

        with pytest.raises(SystemExit):
            run_phases(run, progress=crash)
    return root / "ws"


def _copy(runs: Path, tmp_path: Path) -> Workspace:
    shutil.copytree(runs, tmp_path / "ws")
    return Workspace.open(tmp_path / "ws")


def _outcome(run_dir: Path) -> tuple[dict, list]:
    tensors, _ = load_tensors(run_dir / "checkpoints" / "phase-001.safetensors")
    losses = [json.loads(x)["loss"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {k: v for k, v in tensors.items() if k.startswith("model::")}, losses


def _assert_same_as_straight(ws: Workspace, run: str = "stopped") -> None:
    (a, la), (b, lb) = _outcome(ws.run_dir("straight")), _outcome(ws.run_dir(run))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert la == lb
    ra, rb = (json.loads((ws.run_dir(r) / "results.json").read_text())["eval"] for r in ("straight", run))
    assert ra == rb


def _damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    else:  # flip one byte of tensor data: same size, valid safetensors, wrong numbers
        data[-5] ^= 0x40
        path.write_bytes(bytes(data))


# --- integrity ----------------------------------------------------------------------------------


def test_state_lists_every_kept_checkpoint_with_size_and_sha256(runs):
    state = json.loads((runs / "runs" / "stopped" / "state.json").read_text())
    assert state["checkpoint"] == STEP_CKPT and state["completed_phases"] == 1
    expected = {"checkpoints/base.safetensors", "checkpoints/phase-000.safetensors", STEP_CKPT}
    assert set(state["files"]) == expected  # the superseded phase-0 step checkpoint is gone and unlisted
    for rel, record in state["files"].items():
        assert record == file_record(runs / "runs" / "stopped" / rel)
    assert sorted(p.name for p in (runs / "runs" / "stopped" / "checkpoints").iterdir()) == sorted(
        Path(x).name for x in expected
    )


@pytest.mark.parametrize("how, word", [("truncate", "truncated"), ("flip", "altered")])
def test_damaged_checkpoint_is_named_and_resume_falls_back_to_the_last_intact_one(runs, tmp_path, how, word):
    ws = _copy(runs, tmp_path)
    _damage(ws.run_dir("stopped") / STEP_CKPT, how)
    run = open_run(ws, "stopped", stream=_stream())
    with pytest.raises(CheckpointError, match=rf"phase-001-step-000002.safetensors: {word}"):
        run.load_checkpoint(run.dir / STEP_CKPT)
    with pytest.warns(IntegrityWarning, match=r"phase-001-step-000002.safetensors.*falling back"):
        run_phases(run)
    _assert_same_as_straight(ws)  # redone from phase-000: the same weights, losses and evaluations


def test_all_checkpoints_damaged_starts_over_and_still_ends_identical(runs, tmp_path):
    ws = _copy(runs, tmp_path)
    for name in ("phase-000.safetensors", "phase-001-step-000002.safetensors"):
        _damage(ws.run_dir("stopped") / "checkpoints" / name, "flip")
    with pytest.warns(IntegrityWarning) as caught:
        run_phases(open_run(ws, "stopped", stream=_stream()))
    messages = " ".join(str(w.message) for w in caught)
    assert "phase-000.safetensors" in messages and "starting over" in messages
    _assert_same_as_straight(ws)


def test_lost_results_json_is_recomputed_not_reinvented(runs, tmp_path):
    ws = _copy(runs, tmp_path)
    (ws.run_dir("stopped") / "results.json").unlink()
    with pytest.warns(IntegrityWarning, match="results.json.*recomputing"):
        run_phases(open_run(ws, "stopped", stream=_stream()))
    _assert_same_as_straight(ws)


def test_stop_between_phase_checkpoint_and_results_redoes_the_phase(runs, tmp_path, monkeypatch):
    """Before issue 10 a kill here left results.json one phase behind state.json: the run could not resume."""
    import lifelong_peer.train as train

    ws = _copy(runs, tmp_path)
    real = train.save_results

    def killed(*args):
        raise SystemExit("killed after the phase-end checkpoint")

    monkeypatch.setattr(train, "save_results", killed)
    with pytest.raises(SystemExit):
        run_phases(open_run(ws, "stopped", stream=_stream()))
    assert json.loads((ws.run_dir("stopped") / "state.json").read_text())["completed_phases"] == 2
    monkeypatch.setattr(train, "save_results", real)
    run_phases(open_run(ws, "stopped", stream=_stream()))
    _assert_same_as_straight(ws)


def test_resume_after_a_kill_between_phases_says_where_it_continues(tmp_path):
    """Issue 25: a run killed (kill -9) during phase 1, with no checkpoint inside it, resumed from phase
    0's end in silence; Ctrl-C's resume, from a checkpoint mid-phase, said so. Both say where now."""
    from lifelong_peer.cli.progress import PlainProgress

    ws, stream = Workspace.init(tmp_path / "ws"), _stream()
    model, train = resolve_config("naive", {**OPTIONS, "checkpoint_every": 0}, TINY)
    run = create_run(ws, RunConfig(run="k", stream=stream.name, slices=["a", "b"], model=model, train=train), stream)

    def kill(event):  # SystemExit is not Ctrl-C: nothing is saved, as with SIGKILL
        if event["event"] == "step" and event["phase"] == 1:
            raise SystemExit("killed")

    with pytest.raises(SystemExit):
        run_phases(run, progress=kill)
    events, lines = [], []
    show = PlainProgress(lines.append, "k")
    run_phases(open_run(ws, "k", stream=stream), progress=lambda e: (events.append(e), show(e)))
    assert {"event": "resume", "phase": 0, "step": None, "slice": "a"} in events
    assert "k | resuming after phase 0 (a)" in lines
    events.clear()
    run_phases(open_run(ws, "k", stream=stream), progress=events.append)  # finished: nothing to resume
    assert not [e for e in events if e["event"] == "resume"]


def test_content_checksum_travels_with_the_file(tmp_path):
    """A file copied without its run's listing still refuses a flipped byte."""
    path = tmp_path / "m.safetensors"
    save_model(LanguageModel(TINY), path)
    assert (
        "lifelong_peer_sha256"
        in json.loads(path.read_bytes()[8 : 8 + int.from_bytes(path.read_bytes()[:8], "little")])["__metadata__"]
    )
    load_model(path)
    _damage(path, "flip")
    with pytest.raises(CheckpointError, match=r"m.safetensors: corrupted or altered"):
        load_model(path)


# --- hostile files ------------------------------------------------------------------------------


def test_pickle_files_are_refused_without_being_unpickled(tmp_path):
    class Boom:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    for name, save in (("zip.pt", lambda p: torch.save({"x": Boom()}, p)), ("raw.pkl", None)):
        path = tmp_path / name
        if save:
            save(path)
        else:
            import pickle

            path.write_bytes(pickle.dumps(Boom(), protocol=2))
        with pytest.raises(CheckpointError, match="pickle"):
            load_model(path)
    assert not (tmp_path / "pwned").exists()


def _header_file(path: Path, model_config: dict, tensors: dict | None = None) -> Path:
    tensors = tensors or {f"x{i}": torch.zeros(2) for i in range(64)}  # as many tensors as a real small model
    save_tensors(path, tensors, {"format": MODEL_FORMAT, "model_config": model_config})
    return path


@pytest.mark.parametrize(
    "config, message",
    [
        ({**TINY.to_dict(), "peer": {**TINY.peer.to_dict(), "num_subkeys": 10**6}}, "10^12|experts, more than"),
        ({**TINY.to_dict(), "dim": 10**7, "heads": 1}, "tensors do not match"),
        ({**TINY.to_dict(), "layers": 10**9}, "announces 1,000,000,000 blocks"),
        ({**TINY.to_dict(), "magic": 1}, "unknown model config keys: magic"),
        ({**TINY.to_dict(), "dim": "wide"}, "dim must be a positive integer"),
        ({k: v for k, v in TINY.to_dict().items() if k != "peer"} | {"peer": 3}, "invalid model config"),
    ],
)
def test_absurd_or_malformed_configs_fail_before_allocating(tmp_path, config, message):
    path = _header_file(tmp_path / "h.safetensors", config)
    t0 = time.perf_counter()
    with pytest.raises(CheckpointError, match=message):
        load_model(path)
    assert time.perf_counter() - t0 < 30  # not a timing target: a 10^12-parameter allocation would never return


def test_tensor_shapes_and_dtypes_are_checked_against_the_config(tmp_path):
    state = LanguageModel(TINY).state_dict()
    wrong_shape = {**state, "head.weight": torch.zeros(3, 3)}
    with pytest.raises(CheckpointError, match=r"tensor head.weight has shape \(3, 3\)"):
        load_model(_header_file(tmp_path / "a.safetensors", TINY.to_dict(), wrong_shape))
    wrong_dtype = {**state, "head.weight": state["head.weight"].double()}
    with pytest.raises(CheckpointError, match="float64"):
        load_model(_header_file(tmp_path / "b.safetensors", TINY.to_dict(), wrong_dtype))


def test_deeply_nested_or_garbage_headers_are_checkpoint_errors(tmp_path):
    for i, body in enumerate((b"[" * 100_000, b"\xff" * 64, b'{"__metadata__": 5}')):
        path = tmp_path / f"{i}.safetensors"
        path.write_bytes(len(body).to_bytes(8, "little") + body)
        with pytest.raises(CheckpointError):
            read_meta(path)
    (tmp_path / "e.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty or truncated"):
        load_tensors(tmp_path / "e.safetensors")


def test_malformed_run_checkpoint_meta_and_state_are_named(runs, tmp_path):
    ws = _copy(runs, tmp_path)
    run = open_run(ws, "stopped", stream=_stream())
    tensors, meta = load_tensors(run.dir / STEP_CKPT)
    for bad, message in (
        ({**meta, "step": "two"}, "'step' is missing or not a count"),
        ({k: v for k, v in meta.items() if k != "ledger"}, "'ledger' is missing"),
        ({**meta, "completed_phases": -1}, "'completed_phases'"),
    ):
        save_tensors(tmp_path / "x.safetensors", tensors, bad)
        with pytest.raises(CheckpointError, match=message):
            run.load_checkpoint(tmp_path / "x.safetensors")
    opt_key = next(k for k in tensors if k.startswith("opt::") and k.endswith("::exp_avg"))
    save_tensors(tmp_path / "y.safetensors", {**tensors, opt_key: torch.zeros(7, 7)}, meta)
    with pytest.raises(CheckpointError, match="optimizer state"):
        run.load_checkpoint(tmp_path / "y.safetensors")
    state_path = run.dir / "state.json"
    good = json.loads(state_path.read_text())
    for bad in ("{not json", json.dumps({**good, "checkpoint": "../../../etc/passwd"}), json.dumps([1])):
        state_path.write_text(bad)
        with pytest.raises(CheckpointError, match=r"state\.json: corrupted"):
            run_phases(run)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c["train"].update(stepz=3), "stepz"),
        (lambda c: c["model"]["peer"].update(num_subkeys=10**6), "experts"),
        (lambda c: c.pop("slices"), "slices"),
        (lambda c: c["model"].update(dim=[1]), "dim"),
    ],
)
def test_malformed_run_config_json_is_a_user_error(runs, tmp_path, edit, message):
    ws = _copy(runs, tmp_path)
    path = ws.run_dir("stopped") / "config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))
    with pytest.raises(UserError, match=message):
        open_run(ws, "stopped", stream=_stream())


def test_pickle_as_base_is_refused_by_the_cli(tmp_path, monkeypatch, capsys):
    from lifelong_peer.cli.main import main
    from lifelong_peer.streams import ingest

    ws = Workspace.init(tmp_path / "ws")
    (tmp_path / "d.jsonl").write_text(
        "".join(json.dumps({"text": "some words " * 20, "time": f"{2000 + i % 2}-01-01"}) + "\n" for i in range(20))
    )
    ingest(ws, str(tmp_path / "d.jsonl"), "d")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "model.pt")
    argv = ["lpeer", "run", "-w", str(ws.root), "--stream", "d", "--base", str(tmp_path / "model.pt"), "-q"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_:
        main()
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and "model.pt: this is a pickle/torch.save file" in err and "\n" not in err
    assert ws.manifest()["runs"] == {} and not (ws.root / "runs").exists()  # nothing half-made


# --- resources ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "target, error, words",
    [
        ("lifelong_peer.checkpoint.save_file", errno.ENOSPC, "the disk is full"),
        ("tempfile.mkstemp", errno.EACCES, "permission denied"),  # root ignores chmod: simulate it
    ],
)
def test_full_disk_or_denied_write_is_a_clear_error_and_keeps_the_previous_checkpoint(
    runs, tmp_path, monkeypatch, target, error, words
):
    ws = _copy(runs, tmp_path)
    run = open_run(ws, "stopped", stream=_stream())
    run.load_checkpoint(run.dir / STEP_CKPT)
    before = {p: p.read_bytes() for p in run.dir.rglob("*") if p.is_file()}
    module, _, name = target.rpartition(".")
    real = getattr(importlib.import_module(module), name)

    def failing(*args, **kwargs):
        if target.endswith("save_file"):
            real(*args, **kwargs)
            with open(args[1], "r+b") as f:
                f.truncate(100)  # the disk filled up half-way
        raise OSError(error, os.strerror(error))

    monkeypatch.setattr(target, failing)
    with pytest.raises(UserError, match=rf"cannot write .*phase-001-step-000004.safetensors: {words}"):
        run.save_checkpoint(1, 4, None, completed=1)
    after = {p: p.read_bytes() for p in run.dir.rglob("*") if p.is_file()}
    assert after == before  # no temp file, the state and its checkpoint untouched
    monkeypatch.undo()
    run.load_checkpoint(run.dir / STEP_CKPT)


def test_full_disk_through_the_cli_is_one_line_exit_2(runs, tmp_path, monkeypatch, capsys):
    from lifelong_peer.cli.main import main

    ws = _copy(runs, tmp_path)
    monkeypatch.setattr("lifelong_peer.run.open_run", lambda w, r, stream=None: open_run(w, r, stream=_stream()))

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("lifelong_peer.checkpoint.save_file", full)
    monkeypatch.setattr(sys, "argv", ["lpeer", "run", "-w", str(ws.root), "--resume", "stopped", "-q"])
    with pytest.raises(SystemExit) as exit_:
        main()
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and err[-1].startswith("error: cannot write") and "disk is full" in err[-1]
    assert not any("Traceback" in line for line in err)


def _lpeer(*args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "lifelong_peer.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _lock_is_held(ws: Path) -> bool:
    with open(ws / ".lock", "a+") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)
        return False


def test_second_process_on_a_busy_run_is_told_the_pid_and_a_killed_holder_leaves_no_stale_lock(tmp_path):
    """Issue 25: a training locks its run (not the workspace: the same stream is ingested meanwhile)."""
    from lifelong_peer.streams import ingest

    ws = Workspace.init(tmp_path / "ws")
    (tmp_path / "d.jsonl").write_text(
        "".join(json.dumps({"text": "word " * 200, "time": f"{2000 + i % 2}-01-01"}) + "\n" for i in range(40))
    )
    ingest(ws, str(tmp_path / "d.jsonl"), "d")
    holder = _lpeer("run", "-w", str(ws.root), "--stream", "d", "--steps", "100000", "--name", "r", "-q")
    run_dir = ws.run_dir("r")
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / ".lock").exists() or not _lock_is_held(run_dir):
            assert holder.poll() is None, holder.communicate()[1]
            assert time.monotonic() < deadline
            time.sleep(0.2)
        second = _lpeer("run", "--resume", "r", "-w", str(ws.root))
        _, err = second.communicate(timeout=120)
        assert second.returncode == 2
        assert f"run 'r' is in use by PID {holder.pid}" in err and err.strip().count("\n") == 0
        other = _lpeer("ingest", str(tmp_path / "d.jsonl"), "--name", "d", "-w", str(ws.root), "--format", "json")
        out, err = other.communicate(timeout=120)
        assert other.returncode == 0 and json.loads(out)["unchanged"] is True, err
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.communicate()
    # the kernel dropped the dead holder's flock: the next process goes ahead (its PID is still in .lock)
    assert str(holder.pid) in (run_dir / ".lock").read_text() and not _lock_is_held(run_dir)


# --- crash torture ------------------------------------------------------------------------------


@pytest.mark.slow
def test_crash_torture_sigkill_and_resume_is_bit_identical(tmp_path):
    """Real `lpeer run` processes SIGKILLed between a phase checkpoint and results.json, half-way
    through writing a checkpoint, right after growth and mid-forward, then resumed (benchmarks/torture.py)."""
    spec = importlib.util.spec_from_file_location("torture", ROOT / "benchmarks" / "torture.py")
    torture = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(torture)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = torture.torture(
            tmp_path,
            schedule=["publish:3:state.json", "write:1:phase-001.safetensors", "grow:1", "forward:12"],
            log=lambda *_: None,
        )
    assert report["kills"] == 4, report["events"]
    assert report["ok"], report["problems"]


def test_a_safetensors_header_size_of_128_mod_256_is_not_taken_for_a_pickle(tmp_path):
    """Both start with byte 0x80 (a pickle's PROTO opcode; here the header size's low byte): the JSON
    header that follows tells them apart. Found by an attached run's mid-phase checkpoint (issue 11)."""
    path = tmp_path / "a.safetensors"
    for pad in range(256):
        save_tensors(path, {"w": torch.arange(3.0)}, {"pad": "x" * pad})
        if path.read_bytes()[0] == 0x80:
            break
    assert path.read_bytes()[0] == 0x80
    tensors, meta = load_tensors(path)
    assert torch.equal(tensors["w"], torch.arange(3.0)) and meta["pad"]
    torch.save({"w": torch.arange(3.0)}, path, _use_new_zipfile_serialization=False)  # a bare pickle
    assert path.read_bytes()[0] == 0x80
    with pytest.raises(CheckpointError, match="pickle"):
        load_tensors(path)


# --- Ctrl-C (issue 17 item 1) -------------------------------------------------------------------


@pytest.mark.parametrize(
    "raised, line",
    [
        ("library", "interrupted at phase 0, step 2 of 5; saved checkpoints/phase-000-step-000002.safetensors"),
        ("elsewhere", "interrupted; nothing more was saved"),
    ],
)
def test_ctrl_c_exits_130_with_one_line(tmp_path, monkeypatch, capsys, raised, line):
    """Before: typer turned KeyboardInterrupt into a returned 130 that main() ignored (exit 0, silent),
    and the loop's own Ctrl-C was a UserError (exit 2)."""
    from lifelong_peer.cli.main import main
    from lifelong_peer.errors import Interrupted

    def stop(*args, **kwargs):
        raise Interrupted(line) if raised == "library" else KeyboardInterrupt

    monkeypatch.setattr("lifelong_peer.system.info", stop)
    monkeypatch.setattr(sys, "argv", ["lpeer", "info", "-w", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_:
        main()
    err = capsys.readouterr().err
    assert exit_.value.code == 130
    assert err.strip() == line


def _tiny_stream_workspace(tmp_path: Path) -> Workspace:
    from lifelong_peer.streams import ingest

    ws = Workspace.init(tmp_path / "ws")
    (tmp_path / "d.jsonl").write_text(
        "".join(json.dumps({"text": "word " * 200, "time": f"{2000 + i % 2}-01-01"}) + "\n" for i in range(40))
    )
    ingest(ws, str(tmp_path / "d.jsonl"), "d")
    (tmp_path / "tiny.toml").write_text(
        "[model]\ndim = 16\nlayers = 2\nheads = 2\ncontext = 16\n"
        "[model.peer]\nnum_subkeys = 4\nheads = 2\ntopk = 2\ndim_key = 8\n"
    )
    return ws


def _interrupt_when(proc: subprocess.Popen, marker: str) -> tuple[int, list[str]]:
    """SIGINT ``proc`` once a stderr line contains ``marker``; its exit code and stderr lines."""
    lines = []
    for line in proc.stderr:
        lines.append(line.rstrip("\n"))
        if marker in line:
            time.sleep(1.0)  # well inside the loop's steps
            proc.send_signal(signal.SIGINT)
            break
    rest = proc.communicate(timeout=300)[1]
    return proc.returncode, lines + rest.splitlines()


@pytest.mark.slow
def test_ctrl_c_of_a_real_lpeer_run_exits_130_saying_what_was_saved(tmp_path):
    """Issue 17 item 1, as reported: SIGINT in base training exited 0, silently, saving nothing; SIGINT
    mid-phase exited 2. Both exit 130 now, with one line naming the checkpoint written."""
    ws = _tiny_stream_workspace(tmp_path)
    common = ["-w", str(ws.root), "--config", str(tmp_path / "tiny.toml"), "--batch-size", "2"]
    base = _lpeer("run", "--stream", "d", "--name", "b", "--base-steps", "1000000", *common)
    code, err = _interrupt_when(base, "base |")
    assert code == 130, err
    assert err[-1].startswith("interrupted at base training, step ") and "saved checkpoints/base-step-" in err[-1]
    state = json.loads((ws.run_dir("b") / "state.json").read_text())
    assert state["phase"] == -1 and (ws.run_dir("b") / state["checkpoint"]).exists()
    assert f"of 1000000; saved {state['checkpoint']}" in err[-1]

    phase = _lpeer("run", "--stream", "d", "--name", "p", "--steps", "1000000", *common)
    code, err = _interrupt_when(phase, "phase 0")
    assert code == 130, err
    assert err[-1].startswith("interrupted at phase 0, step ") and "--resume p" in err[-1]
