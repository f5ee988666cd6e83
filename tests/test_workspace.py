"""Workspace: manifest, discovery, the cross-process lock, atomic updates, runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

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


def test_lock_excludes_a_second_process_and_dies_with_its_holder(tmp_path):
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
