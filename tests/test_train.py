"""The continual trainer (issue 4): every strategy runs, frozen rows stay put, resume is exact."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lifelong_peer import PEERConfig
from lifelong_peer.checkpoint import load_tensors
from lifelong_peer.config import RunConfig, resolve_config
from lifelong_peer.model import ModelConfig
from lifelong_peer.run import create_run, open_run
from lifelong_peer.strategies import STRATEGIES
from lifelong_peer.train import run_phases
from lifelong_peer.workspace import Workspace

TINY = ModelConfig(dim=32, layers=2, heads=2, context=32, peer=PEERConfig(num_subkeys=8, heads=2, topk=4, dim_key=16))


def make_run(tmp_path, stream, strategy="naive", run_id="r", **overrides):
    ws = Workspace.init(tmp_path / "ws") if not (tmp_path / "ws").exists() else Workspace.open(tmp_path / "ws")
    opts = {"steps": 6, "batch_size": 4, "eval_tokens": 256, "usage_tokens": 256, "warmup": 2, **overrides}
    model, train = resolve_config(strategy, opts, TINY)
    cfg = RunConfig(run=run_id, stream=stream.name, slices=[s.name for s in stream.slices], model=model, train=train)
    return ws, create_run(ws, cfg, stream=stream)


def final_weights(run_dir) -> dict[str, torch.Tensor]:
    tensors, _ = load_tensors(sorted((run_dir / "checkpoints").glob("phase-*.safetensors"))[-1])
    return {k: v for k, v in tensors.items() if k.startswith("model::")}


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_every_strategy_runs_and_writes_its_files(tmp_path, memory_stream, strategy):
    _, run = make_run(tmp_path, memory_stream, strategy, base_steps=4)
    results = run_phases(run)
    assert len(results.phases) == 3
    for name in ("config.json", "state.json", "metrics.jsonl", "results.json", "metrics.csv", "heatmap.png"):
        assert (run.dir / name).exists(), name
    lines = (run.dir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3 * 6
    row = results.eval["validation"].after[-1]
    assert all(v > 0 for v in row.bpb)
    assert all(p.extra["ms_per_step"] > 0 for p in results.phases)  # issue 24: each phase's cost per step


def test_base_data_first_never_reads_later_slices(tmp_path, memory_stream):
    """Issue 16: a base trained on the first slice is bit-identical when the later slices' training
    text is replaced by noise; a base on the mix of slices is not (so the poison would show)."""
    poisoned = type(memory_stream)()
    rng = np.random.default_rng(1)
    for s in poisoned.slices[1:]:
        s._splits["train"] = rng.integers(0, 256, len(s._splits["train"]), dtype=np.uint8)

    def base(stream, run_id, base_data):
        _, run = make_run(tmp_path, stream, "naive", run_id=run_id, base_steps=4, base_data=base_data)
        run_phases(run, phases=[])
        return load_tensors(run.checkpoints / "base.safetensors")[0]

    clean, dirty = base(memory_stream, "clean", "first"), base(poisoned, "dirty", "first")
    assert clean.keys() == dirty.keys() and all(torch.equal(clean[k], dirty[k]) for k in clean)
    mixed, mixed_dirty = base(memory_stream, "mix", "mix"), base(poisoned, "mix-dirty", "mix")
    assert not all(torch.equal(mixed[k], mixed_dirty[k]) for k in mixed)


def test_a_run_from_a_random_init_warns(tmp_path, memory_stream):
    _, run = make_run(tmp_path, memory_stream, "naive")
    with pytest.warns(UserWarning, match="random init"):
        run_phases(run, phases=[])


def test_lifelong_grows_and_keeps_old_experts_bit_identical(tmp_path, memory_stream):
    _, run = make_run(tmp_path, memory_stream, "lifelong-grow", base_steps=4)
    run_phases(run, phases=[0])
    layer = run.model.peer_layers()[0]
    n0 = layer.num_experts
    before = layer.U.detach().clone(), layer.V.detach().clone()
    run_phases(run, phases=[1])
    layer = run.model.peer_layers()[0]  # the run reloads its model from the phase-0 checkpoint
    assert layer.num_experts > n0
    assert torch.equal(layer.U[:n0], before[0]) and torch.equal(layer.V[:n0], before[1])
    assert layer.frozen[:n0].all() and not layer.frozen[n0:].any()
    assert not torch.equal(layer.V[n0:], torch.zeros_like(layer.V[n0:]))  # new experts learned


def test_kill_and_resume_is_bit_identical(tmp_path, memory_stream):
    """A run stopped mid-phase (state as after SIGKILL: a mid-phase checkpoint, later work lost)
    and resumed ends with exactly the weights of an uninterrupted run."""
    _, straight = make_run(
        tmp_path, memory_stream, "lifelong-grow", run_id="straight", base_steps=4, checkpoint_every=2
    )
    run_phases(straight)
    _, broken = make_run(tmp_path, memory_stream, "lifelong-grow", run_id="broken", base_steps=4, checkpoint_every=2)
    run_phases(broken, phases=[0])

    def crash(event):
        if event["event"] == "step" and event["phase"] == 1 and event["step"] == 3:
            raise SystemExit("killed")

    with pytest.raises(SystemExit):
        run_phases(broken, progress=crash)
    state = json.loads((broken.dir / "state.json").read_text())
    assert state["phase"] == 1 and state["step"] == 2
    ws = Workspace.open(tmp_path / "ws")
    run_phases(open_run(ws, "broken", stream=memory_stream))
    a, b = final_weights(straight.dir), final_weights(broken.dir)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    losses = lambda d: [json.loads(x)["loss"] for x in (d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert losses(straight.dir) == losses(broken.dir)


def test_l2sp_at_huge_weight_keeps_shared_weights_at_anchor(tmp_path, memory_stream):
    """With λ huge the gradient points back to the anchor; Adam's steps are ~lr, so weights stay
    within a couple of learning rates of the anchor, and far closer than without L2-SP."""
    from lifelong_peer.regularize import shared_parameters

    def drift(l2sp, run_id):
        _, run = make_run(tmp_path, memory_stream, "naive", run_id=run_id, l2sp=l2sp, base_steps=4, lr=1e-2)
        run_phases(run, phases=[0])
        anchor = {k: v.detach().clone() for k, v in shared_parameters(run.model).items()}
        run_phases(run, phases=[1])
        diffs = torch.cat([(p - anchor[k]).abs().flatten() for k, p in shared_parameters(run.model).items()])
        return diffs.max().item(), diffs.mean().item()

    pinned_max, pinned_mean = drift(1e6, "pinned")
    _, free_mean = drift(0.0, "free")
    assert pinned_max <= 2 * 1e-2
    assert pinned_mean < free_mean / 5


def test_unknown_options_and_strategies_are_user_errors():
    from lifelong_peer.errors import UserError

    with pytest.raises(UserError, match="unknown strategy"):
        resolve_config("magic")
    with pytest.raises(UserError, match="unknown training option"):
        resolve_config("naive", {"stepz": 3})
    with pytest.raises(UserError, match="replay"):
        resolve_config("naive", {"replay": 1.5})


@pytest.mark.parametrize("keep", ["all", "latest"])
def test_lost_results_are_recomputed_from_checkpoints(tmp_path, memory_stream, keep):
    from lifelong_peer.evaluate import recompute_results
    from lifelong_peer.metrics import load_results

    _, run = make_run(tmp_path, memory_stream, "lifelong-grow", base_steps=4, keep_checkpoints=keep)
    run_phases(run, phases=[0, 1])
    # issue 24: "latest" keeps the base and the newest phase's model only, on disk and in state.json
    kept = sorted(p.name for p in run.checkpoints.glob("*.safetensors"))
    expected = ["base.safetensors", "phase-000.safetensors", "phase-001.safetensors"]
    assert kept == (expected if keep == "all" else [expected[0], expected[2]])
    assert sorted(run.state()["files"]) == [f"checkpoints/{name}" for name in kept]
    original = load_results(run.dir)
    (run.dir / "results.json").unlink()
    rebuilt = recompute_results(run)  # "all": evaluated again; "latest": the copy in the newest checkpoint
    for split in ("validation", "test"):
        assert rebuilt.eval[split].before.nll == original.eval[split].before.nll
        assert [r.nll for r in rebuilt.eval[split].after] == [r.nll for r in original.eval[split].after]
    assert [p.num_experts for p in rebuilt.phases] == [p.num_experts for p in original.phases]
    assert load_results(run.dir).eval["test"].after[-1].nll == original.eval["test"].after[-1].nll


def test_pruned_run_resumes_like_one_that_keeps_every_checkpoint(tmp_path, memory_stream):
    """Pruning deletes files, never state the next phase needs: the final weights are bit-identical."""
    _, pruned = make_run(tmp_path, memory_stream, "lifelong-grow", run_id="pruned", base_steps=4)
    run_phases(pruned, phases=[0, 1])
    pruned = open_run(Workspace.open(tmp_path / "ws"), "pruned", stream=memory_stream)
    run_phases(pruned)  # a new process continues after phase 1 from the one phase checkpoint kept
    _, kept = make_run(tmp_path, memory_stream, "lifelong-grow", run_id="kept", base_steps=4, keep_checkpoints="all")
    run_phases(kept)
    a, b = final_weights(pruned.dir), final_weights(kept.dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert len(list(pruned.checkpoints.glob("phase-*.safetensors"))) == 1


def test_ctrl_c_saves_exactly_after_the_current_step_and_resume_is_exact(tmp_path, memory_stream):
    import os
    import signal

    from lifelong_peer.errors import Interrupted

    _, straight = make_run(tmp_path, memory_stream, "naive", run_id="straight2", base_steps=4)
    run_phases(straight)
    _, stopped = make_run(tmp_path, memory_stream, "naive", run_id="stopped", base_steps=4)

    def press_ctrl_c(event):
        if event["event"] == "step" and event["phase"] == 1 and event["step"] == 2:
            os.kill(os.getpid(), signal.SIGINT)  # arrives mid-run; honoured at the end of the step

    # issue 17: Interrupted (exit 130), not a UserError (exit 2); the message names the checkpoint
    with pytest.raises(
        Interrupted, match=r"interrupted at phase 1, step 3 of 6; saved checkpoints/phase-001-step-000003"
    ):
        run_phases(stopped, progress=press_ctrl_c)
    state = json.loads((stopped.dir / "state.json").read_text())
    assert (state["phase"], state["step"]) == (1, 3)
    run_phases(open_run(Workspace.open(tmp_path / "ws"), "stopped", stream=memory_stream))
    a, b = final_weights(straight.dir), final_weights(stopped.dir)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_base_steps_report_the_same_fields_as_phase_steps(tmp_path, memory_stream):
    """Issue 17 item 5: base training's progress showed 0 tok/s; one step() now serves both."""
    events = []
    _, run = make_run(tmp_path, memory_stream, "naive", base_steps=2, steps=2)
    run_phases(run, phases=[0], progress=events.append)
    base = [e for e in events if e["event"] == "step" and e["phase"] == -1]
    phase = [e for e in events if e["event"] == "step" and e["phase"] == 0]
    assert len(base) == 2 and len(phase) == 2
    assert base[0].keys() == phase[0].keys()
    assert all(e["tok_s"] > 0 for e in base)
    lines = [json.loads(x) for x in (run.dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in lines] == [0, 0]  # the run's metrics stay its phases'


def test_base_training_is_the_same_whatever_the_strategy_trains_its_phases_with(tmp_path, memory_stream):
    """One base for every strategy of a stream (issue 16: compare from one shared base): the phases'
    expert_lr and expert_weight_decay do not reach base training, which trains every weight at base_lr
    through the same optimizer builder as the phases."""
    _, plain = make_run(tmp_path, memory_stream, "naive", run_id="plain", base_steps=3)
    _, tuned = make_run(tmp_path, memory_stream, "naive", run_id="tuned", base_steps=3, expert_lr=1e-30)
    for run in (plain, tuned):
        run_phases(run, phases=[])
    a, b = (load_tensors(r.dir / "checkpoints" / "base.safetensors")[0] for r in (plain, tuned))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    from lifelong_peer.model import LanguageModel

    torch.manual_seed(plain.config.train.seed)
    init = LanguageModel(plain.config.model).state_dict()
    experts = [k for k in init if k.rsplit(".", 1)[-1] in ("U", "V")]
    assert experts and all(not torch.equal(a[k], init[k]) for k in experts)  # the experts did train


def _base_tensors(run_dir) -> dict[str, torch.Tensor]:
    tensors, _ = load_tensors(run_dir / "checkpoints" / "base.safetensors")
    return tensors


def _assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("stop", ["ctrl-c", "kill"])
def test_base_training_stopped_and_resumed_is_bit_identical(tmp_path, memory_stream, stop):
    """Issue 17 item 1: Ctrl-C in base training saved nothing (and exited 0). Now it saves after the
    current step (Interrupted, exit 130), --checkpoint-every applies to base steps, and resume continues
    base training to exactly the base of an uninterrupted run. (Separate workspaces: a run would
    otherwise reuse the other's base, item 6.)"""
    import os
    import signal

    from lifelong_peer.errors import Interrupted

    opts = {"base_steps": 6, "checkpoint_every": 2}
    _, straight = make_run(tmp_path / "a", memory_stream, "lifelong-grow", run_id="straight", **opts)
    run_phases(straight, phases=[0])
    _, stopped = make_run(tmp_path / "b", memory_stream, "lifelong-grow", run_id="stopped", **opts)

    def press_ctrl_c(event):
        if event["event"] == "step" and event["phase"] == -1 and event["step"] == 2:
            os.kill(os.getpid(), signal.SIGINT)  # honoured at the end of the step: saved at step 3

    def kill(event):
        if event["event"] == "step" and event["phase"] == -1 and event["step"] == 4:
            raise SystemExit("killed")  # the last checkpoint is checkpoint_every's, at step 4

    if stop == "ctrl-c":
        with pytest.raises(
            Interrupted, match=r"interrupted at base training, step 3 of 6; saved checkpoints/base-step"
        ):
            run_phases(stopped, progress=press_ctrl_c)
    else:
        with pytest.raises(SystemExit):
            run_phases(stopped, progress=kill)
    step = 3 if stop == "ctrl-c" else 4
    state = json.loads((stopped.dir / "state.json").read_text())
    assert (state["phase"], state["step"], state["completed_phases"]) == (-1, step, 0)
    assert state["checkpoint"] == f"checkpoints/base-step-{step:06d}.safetensors"
    assert not (stopped.dir / "checkpoints" / "base.safetensors").exists()
    events = []
    run_phases(open_run(Workspace.open(tmp_path / "b" / "ws"), "stopped", stream=memory_stream), [0], events.append)
    assert {"event": "resume", "phase": -1, "step": step} in events
    assert [e["step"] for e in events if e["event"] == "step" and e["phase"] == -1] == list(range(step, 6))
    _assert_same_tensors(_base_tensors(straight.dir), _base_tensors(stopped.dir))
    _assert_same_tensors(final_weights(straight.dir), final_weights(stopped.dir))
    assert not list((stopped.dir / "checkpoints").glob("base-step-*"))  # superseded by base.safetensors
    assert set(json.loads((stopped.dir / "state.json").read_text())["files"]) == {
        "checkpoints/base.safetensors",
        "checkpoints/phase-000.safetensors",
    }


def test_ctrl_c_outside_a_step_says_what_the_run_kept(tmp_path, memory_stream, monkeypatch):
    """Ctrl-C during an evaluation (no step to finish) stops at once: Interrupted names the last checkpoint."""
    import lifelong_peer.train as train
    from lifelong_peer.errors import Interrupted

    _, run = make_run(tmp_path, memory_stream, "naive", base_steps=2)
    run_phases(run, phases=[0])
    real = train.evaluate_all

    def interrupted_evaluation(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "evaluate_all", interrupted_evaluation)
    with pytest.raises(Interrupted, match=r"interrupted; the run is kept as of checkpoints/phase-000.safetensors"):
        run_phases(run, phases=[1])
    monkeypatch.setattr(train, "evaluate_all", real)


def test_results_record_the_machine_and_a_phase_run_on_another_one(tmp_path, memory_stream):
    """Issue 25: results.json says where its numbers come from — CPU, instruction sets, threads, torch's CPU code
    path, the PEER kernels' build — and a phase resumed elsewhere (here: with another thread count) says so."""
    from lifelong_peer import kernels

    _, run = make_run(tmp_path, memory_stream, "naive", base_steps=2)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        run_phases(run, phases=[0])
        torch.set_num_threads(2)
        results = run_phases(run, phases=[1])
    finally:
        torch.set_num_threads(threads)
    machine = results.extra["machine"]
    assert machine["threads"] == 1 and machine["cpu"]["model"] and machine["torch"] == torch.__version__
    assert machine["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert machine["native_kernels"] == kernels.build_info()
    assert (machine["native_kernels"]["isa"] is not None) == machine["native_kernels"]["native"]
    assert "machine" not in results.phases[0].extra
    assert results.phases[1].extra["machine"] == machine | {"threads": 2}
