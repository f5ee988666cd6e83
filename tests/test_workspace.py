"""Workspace: manifest, discovery, the cross-process lock, atomic updates, runs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from peer_helpers import toy_workspace

from lifelong_peer import workspace
from lifelong_peer.errors import UserError
from lifelong_peer.workspace import MANIFEST, Workspace


def test_init_creates_manifest_and_refuses_twice(tmp_path):
    ws = Workspace.init(tmp_path / "w")
    data = json.loads((tmp_path / "w" / MANIFEST).read_text())
    assert data["streams"] == {} and data["runs"] == {}
    assert ws.manifest() == data
    with pytest.raises(UserError, match="already an lpeer workspace"):
        Workspace.init(tmp_path / "w")


def test_open_by_path_env_and_cwd(tmp_path, monkeypatch):
    Workspace.init(tmp_path / "w")
    assert Workspace.open(tmp_path / "w").root == (tmp_path / "w").resolve()
    monkeypatch.setenv("LPEER_WORKSPACE", str(tmp_path / "w"))
    assert Workspace.open().root == (tmp_path / "w").resolve()
    monkeypatch.delenv("LPEER_WORKSPACE")
    monkeypatch.chdir(tmp_path / "w")
    assert Workspace.open().root == (tmp_path / "w").resolve()
    with pytest.raises(UserError, match=r"is not an lpeer workspace \(run `\S*lpeer init \S+`\)"):
        Workspace.open(tmp_path)


def test_corrupted_manifest_is_a_user_error(tmp_path):
    ws = Workspace.init(tmp_path / "w")
    ws.manifest_path.write_text("{not json")
    with pytest.raises(UserError, match="corrupted"):
        Workspace.open(ws.root)
    ws.manifest_path.write_text(json.dumps({"format": "something else"}))
    with pytest.raises(UserError, match="unknown format"):
        ws.manifest()


_HOLDER = """
import sys, time
from lifelong_peer.workspace import Workspace
with Workspace.open(sys.argv[1]).lock():
    open(sys.argv[2], "w").close()
    time.sleep(60)
"""


def test_lock_excludes_a_second_process_and_dies_with_its_holder(tmp_path, monkeypatch):
    monkeypatch.setattr(workspace, "MANIFEST_WAIT_S", 0.2)  # the holder keeps it for a minute, not milliseconds
    ws = Workspace.init(tmp_path / "w")
    ready = tmp_path / "ready"
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(ws.root), str(ready)])
    try:
        deadline = time.time() + 30
        while not ready.exists():
            assert proc.poll() is None and time.time() < deadline, "lock holder did not start"
            time.sleep(0.05)
        with pytest.raises(UserError, match=rf"workspace .* is in use by PID {proc.pid} "), ws.lock():
            pass
        manifest_before = ws.manifest_path.read_bytes()
        with pytest.raises(UserError, match="in use"):
            ws.register_run("r1", {"x": 1})
        assert ws.manifest_path.read_bytes() == manifest_before
    finally:
        proc.kill()  # no clean exit: the kernel must release the flock
        proc.wait()
    with ws.lock():
        pass


def test_lock_is_reentrant_in_one_process(tmp_path):
    ws = Workspace.init(tmp_path / "w")
    other = Workspace.open(ws.root)  # a second object for the same folder shares the process's lock
    with ws.lock(), other.lock():
        other.update_manifest(lambda m: m["runs"].setdefault("a", {}))
    assert "a" in ws.manifest()["runs"]


def test_update_manifest_is_all_or_nothing(tmp_path, monkeypatch):
    ws = Workspace.init(tmp_path / "w")
    before = ws.manifest_path.read_bytes()

    def boom(m):
        m["runs"]["half"] = {}
        raise RuntimeError("crash inside the edit")

    with pytest.raises(RuntimeError):
        ws.update_manifest(boom)
    assert ws.manifest_path.read_bytes() == before

    # a crash at the rename: the old manifest stays, no temp file is left behind
    def failing_replace(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError):
        ws.register_run("r1", {"status": "running"})
    monkeypatch.undo()
    assert ws.manifest_path.read_bytes() == before
    assert sorted(p.name for p in ws.root.iterdir()) == sorted([MANIFEST, ".lock"])


def test_runs_register_resolve(tmp_path):
    ws = Workspace.init(tmp_path / "w")
    ws.register_run("r1", {"status": "running"})
    ws.register_run("r1", {"status": "done", "phases": 3})
    assert ws.manifest()["runs"]["r1"] == {"status": "done", "phases": 3}
    assert ws.run_dir("r1") == ws.root / "runs" / "r1"
    assert ws.resolve_run("r1") == ws.root / "runs" / "r1"
    other = tmp_path / "elsewhere"
    other.mkdir()
    assert ws.resolve_run(str(other)) == other.resolve()
    with pytest.raises(UserError, match=r"no run 'nope' .*known runs: r1"):
        ws.resolve_run("nope")
    with pytest.raises(UserError, match="invalid run id"):
        ws.register_run("../escape", {})


# issue 25: a running job locks what it writes — its run, and the manifest only while it changes

_RUNNING_JOB = """
import sys, time
import lifelong_peer.train as train

def training(run, phases=None, progress=None):  # as a long phase would: holds what `lpeer run` holds
    open(sys.argv[2], "w").close()
    time.sleep(120)

train.run_phases = training
from lifelong_peer.cli.main import app
app(["run", "--resume", "a", "--workspace", sys.argv[1], "--quiet"])
"""


def _start(script: str, *args: str) -> subprocess.Popen:
    ready = Path(args[-1])
    proc = subprocess.Popen([sys.executable, "-c", script, *args])
    deadline = time.time() + 60
    while not ready.exists():
        assert proc.poll() is None and time.time() < deadline, "the job did not start"
        time.sleep(0.05)
    return proc


def test_a_running_job_locks_its_run_not_the_workspace(tmp_path):
    """While `lpeer run --resume a` trains (another process), `lpeer grow b` on a finished run and a new run's
    registration go ahead; a second trainer or editor of run a is refused, naming the job's PID."""
    import torch
    from typer.testing import CliRunner

    from lifelong_peer.cli.main import app
    from lifelong_peer.run import new_run
    from lifelong_peer.streams import ingest
    from lifelong_peer.train import run_phases

    ws = toy_workspace(tmp_path, ("peer", "expert", "slice"), per_year=20, name="w")
    model = {"dim": 16, "layers": 1, "heads": 2, "context": 16, "peer": {"num_subkeys": 4, "heads": 2, "topk": 2}}
    train = {"steps": 1, "batch_size": 2, "eval_tokens": 64, "usage_tokens": 64, "warmup": 0, "base_steps": 1}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for run_id in ("a", "b"):
            run_phases(new_run(ws, "toy", "naive", train, model, run_id=run_id))
    finally:
        torch.set_num_threads(threads)
    cli = CliRunner()
    job = _start(_RUNNING_JOB, str(ws.root), str(tmp_path / "ready"))
    try:
        grown = cli.invoke(app, ["grow", "b", "--subkeys", "2", "--workspace", str(ws.root), "--format", "json"])
        assert grown.exit_code == 0, grown.output
        assert json.loads(grown.stdout)["checkpoint"] is not None
        ws.register_run("c", {"strategy": "naive"})  # the manifest is free while run a trains
        for args in (["run", "--resume", "a"], ["grow", "a", "--subkeys", "2"]):
            refused = cli.invoke(app, [*args, "--workspace", str(ws.root)])
            assert isinstance(refused.exception, UserError), refused.output
            assert re.fullmatch(
                rf"run 'a' is in use by PID {job.pid} \(.*, since .*\); wait for it to finish or stop it",
                str(refused.exception),
            )
        # the stream run a reads cannot be replaced under it; its files stay as they were
        before = sorted(p.relative_to(ws.root) for p in (ws.root / "streams").rglob("*"))
        with pytest.raises(UserError, match=rf"stream 'toy' of workspace .* is in use by PID {job.pid} "):
            ingest(ws, str(tmp_path / "docs.jsonl"), "toy", split=(0.5, 0.25, 0.25), replace=True)
        assert sorted(p.relative_to(ws.root) for p in (ws.root / "streams").rglob("*")) == before
    finally:
        job.kill()  # no clean exit: the kernel releases the flock
        job.wait()
    assert cli.invoke(app, ["grow", "a", "--subkeys", "2", "--workspace", str(ws.root)]).exit_code == 0
    ingest(ws, str(tmp_path / "docs.jsonl"), "toy", split=(0.5, 0.25, 0.25), replace=True)  # the job has ended


_MANIFEST_HOLDER = """
import sys, time
from lifelong_peer.workspace import Workspace
with Workspace.open(sys.argv[1]).lock():
    open(sys.argv[2], "w").close()
    time.sleep(1.0)
"""


def test_a_manifest_change_waits_for_another_process_s_change(tmp_path):
    ws = Workspace.init(tmp_path / "w")
    holder = _start(_MANIFEST_HOLDER, str(ws.root), str(tmp_path / "ready"))
    try:
        ws.register_run("r1", {"x": 1})  # waits out the other process's change instead of failing
    finally:
        holder.wait()
    assert ws.manifest()["runs"]["r1"] == {"x": 1}
