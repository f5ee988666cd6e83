"""Data-parallel training (issue 9): two gloo ranks on CPU train what one process trains on the
global batch — growth, freezing and checkpoints included —, a dead rank fails the run instead of
hanging it, and the run resumes from its last checkpoint.

Ranks are separate processes started with the environment ``torchrun`` gives them (RANK,
WORLD_SIZE, MASTER_ADDR/PORT), so they join through ``distributed.init_from_env`` like a real run.
"""

from __future__ import annotations

import copy
import json
import multiprocessing as mp
import os
import socket
import time
from pathlib import Path

import pytest
import torch
from conftest import MemoryStream
from torch.nn.parallel import DistributedDataParallel

from lifelong_peer import PEERConfig, distributed
from lifelong_peer.checkpoint import load_tensors, save_tensors
from lifelong_peer.config import RunConfig, resolve_config
from lifelong_peer.model import ModelConfig
from lifelong_peer.peer import PEER
from lifelong_peer.run import create_run, open_run
from lifelong_peer.train import run_phases
from lifelong_peer.workspace import Workspace

TINY = ModelConfig(dim=32, layers=2, heads=2, context=32, peer=PEERConfig(num_subkeys=8, heads=2, topk=4, dim_key=16))
#: lifelong, with its growth pinned to 8 sub-keys (8 → 16 → 24) whatever the preset's: grows and freezes all old
#: experts before each phase, replays
OPTIONS = {"steps": 4, "batch_size": 4, "eval_tokens": 256, "usage_tokens": 256, "warmup": 1, "grow": "8"}
# seed 1: with seed 0 and exact growth (issue 16) one retrieval in phase 1 sits on a top-k near-tie that the
# 1- and 2-rank float roundings break differently (2 expert rows off by 2e-4, every other weight ≤ 3e-6)
OPTIONS |= {"base_steps": 2, "checkpoint_every": 2, "seed": 1}
SLICES = ("a", "b")
DEADLINE_S = 120  # a hung collective would otherwise hang the test suite


# --- launching ranks ---------------------------------------------------------------------------------


def _rank_main(rank: int, world: int, port: int, job: str, args: tuple, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        assert distributed.init_from_env(timeout_s=30)
        globals()[job](*args)
        distributed.shutdown()
    except BaseException as e:  # the parent reads what failed
        Path(out, f"error-{rank}.txt").write_text(f"{type(e).__name__}: {e}")
        os._exit(3)


def launch(job: str, args: tuple, out: Path, world: int = 2) -> list[int]:
    """Run ``job(*args)`` on ``world`` fresh processes joined as one gloo group; their exit codes."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, job, args, str(out))) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + DEADLINE_S
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    assert not hung, f"ranks {hung} hung"
    return [p.exitcode for p in procs]


def errors(out: Path) -> dict[int, str]:
    return {int(p.stem.split("-")[1]): p.read_text() for p in out.glob("error-*.txt")}


# --- the primitives (run on two ranks by the first training test) --------------------------------------------------------------------------------


def _rank_grad(rank: int, rows: int, size: int, shape: tuple) -> torch.Tensor:
    """An uncoalesced sparse gradient (repeated ids) that any process can rebuild for any rank."""
    gen = torch.Generator().manual_seed(100 + rank)
    ids = torch.randint(size, (rows,), generator=gen)
    return torch.sparse_coo_tensor(
        ids[None], torch.randn(rows, *shape, generator=gen), (size, *shape), check_invariants=True
    )


def _primitives() -> None:
    rank, world = distributed.rank(), distributed.world_size()
    # row-sparse mean vs the dense mean; one tensor touched by rank 0 only, one by nobody
    cases = [((7, 7), 40, (3,)), ((5, 0), 12, (2, 3)), ((0, 0), 9, (4,))]  # (rows per rank, table rows, row shape)
    local = [_rank_grad(rank, rows[rank], n, s) for rows, n, s in cases]
    averaged, sent = distributed.average_sparse(local)
    assert sent > 0
    for (rows, n, s), got in zip(cases, averaged, strict=True):
        want = sum(_rank_grad(r, rows[r], n, s).to_dense() for r in range(world)) / world
        assert got.is_coalesced() and torch.equal(got.indices()[0], got.indices()[0].sort().values)
        torch.testing.assert_close(got.to_dense(), want, rtol=0, atol=1e-6)
    # BatchNorm over the global batch: output, input gradient and running statistics
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(8, 6, generator=gen) * 3 + 1, torch.randn(8, 6, generator=gen)
    reference = torch.nn.BatchNorm1d(6)
    xr = x.clone().requires_grad_()
    ref_y = reference(xr)
    (ref_y * w).sum().backward()
    bn = torch.nn.BatchNorm1d(6)
    distributed.sync_batchnorm(bn)
    part = slice(4 * rank, 4 * rank + 4)
    xl = x[part].clone().requires_grad_()
    y = bn(xl)
    (y * w[part]).sum().backward()
    torch.testing.assert_close(y, ref_y[part].detach(), rtol=0, atol=1e-5)
    torch.testing.assert_close(xl.grad, xr.grad[part], rtol=0, atol=1e-5)
    torch.testing.assert_close(bn.running_mean, reference.running_mean, rtol=0, atol=1e-6)
    torch.testing.assert_close(bn.running_var, reference.running_var, rtol=0, atol=1e-5)
    assert set(bn.state_dict()) == set(reference.state_dict())
    # a PEER layer under data_parallel: DDP averages the dense gradients (query net, BatchNorm, sub-keys)
    # in backward, average_expert_gradients the row-sparse U and V; together the full-batch gradient
    torch.manual_seed(0)
    layer = PEER(PEERConfig(dim=8, num_subkeys=6, heads=2, topk=3, dim_key=8))
    reference = copy.deepcopy(layer)
    x = torch.randn(16, 8, generator=gen)
    reference(x).pow(2).mean().backward()
    replica = distributed.data_parallel(layer)
    assert isinstance(replica, DistributedDataParallel) and isinstance(layer.norm, distributed.SyncBatchNorm1d)
    replica(x[8 * rank : 8 * rank + 8]).pow(2).mean().backward()
    stats = distributed.average_expert_gradients(layer)
    assert layer.U.grad.is_sparse and stats.rows == layer.U.grad._nnz() + layer.V.grad._nnz() > 0
    assert stats.dense_bytes == 4 * sum(p.numel() for n, p in layer.named_parameters() if n not in ("U", "V"))
    for (name, got), want in zip(layer.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(got.grad.to_dense(), want.grad.to_dense(), rtol=0, atol=1e-6, msg=name)
    # rank 0 decides, every rank hears it; a UserError there stops every rank
    assert distributed.broadcast_str("rank-0 says é" if rank == 0 else "") == "rank-0 says é"
    assert distributed.decide_on_main(lambda: f"made by {rank}") == "made by 0"
    from lifelong_peer.errors import UserError

    def refuse():
        raise UserError("bad option")

    try:
        distributed.decide_on_main(refuse)
        raise AssertionError("no error")
    except UserError as e:
        assert str(e) == "bad option"
    assert distributed.mean(float(rank)) == (world - 1) / 2
    # a replica that drifted is noticed and repaired from rank 0 (bool buffers included)
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    model.register_buffer("mask", torch.tensor([True, False]))
    assert distributed.replicas_equal(model)
    if rank == 1:
        model.weight.data[0, 0] += 1e-6
        model.mask[1] = True
    assert not distributed.replicas_equal(model)
    distributed.broadcast_model(model)
    assert distributed.replicas_equal(model) and model.mask.tolist() == [True, False]


def test_combine_rows_sums_duplicates_across_parts():
    parts = [(torch.tensor([5, 1]), torch.tensor([[1.0], [2.0]])), (torch.tensor([1, 9]), torch.tensor([[3.0], [4.0]]))]
    rows, sums = distributed.combine_rows(parts)
    assert rows.tolist() == [1, 5, 9] and sums.flatten().tolist() == [5.0, 1.0, 4.0]


def test_single_process_is_untouched():
    """Without torchrun every helper is the identity: one code path for one and many processes."""
    assert not distributed.init_from_env() and distributed.is_main() and distributed.world_size() == 1
    batch = torch.arange(12).view(4, 3)
    assert distributed.shard(batch) is batch
    model = torch.nn.Linear(2, 2)
    assert distributed.data_parallel(model) is model
    model(torch.ones(1, 2)).sum().backward()
    grad = model.weight.grad.clone()
    assert distributed.average_expert_gradients(model).dense_bytes == 0 and torch.equal(model.weight.grad, grad)


# --- training --------------------------------------------------------------------------------------


def _make_run(root: Path, run_id: str):
    ws = Workspace.open(root) if root.exists() else Workspace.init(root)
    stream = MemoryStream(slices=SLICES)
    model, train = resolve_config("lifelong-grow", OPTIONS, TINY)
    cfg = RunConfig(run=run_id, stream=stream.name, slices=list(SLICES), model=model, train=train)
    return create_run(ws, cfg, stream=stream)


def _train(root: str, run_id: str, out: str, kill_at: tuple | None) -> None:
    """One rank of a run made by the parent; saves what this rank ended with for comparison."""
    if kill_at is None:
        _primitives()  # checked here too: one start of the processes less
    run = open_run(Workspace.open(root), run_id, stream=MemoryStream(slices=SLICES))

    def progress(event: dict) -> None:
        step = (event.get("phase"), event.get("step"))
        if kill_at and distributed.rank() == 1 and event["event"] == "step" and step == kill_at:
            os._exit(9)  # as if the node died: no cleanup, no goodbye to the other rank

    run_phases(run, progress=progress)
    tensors = {f"model::{k}": v for k, v in run.model.state_dict().items()}
    ledger, meta = run.ledger.to_tensors()
    tensors |= {f"ledger::{k}": v for k, v in ledger.items()}
    save_tensors(Path(out, f"rank-{distributed.rank()}.safetensors"), tensors, {"ledger": meta})


def _final(run_dir: Path) -> dict[str, torch.Tensor]:
    tensors, _ = load_tensors(run_dir / "checkpoints" / f"phase-{len(SLICES) - 1:03d}.safetensors")
    return {k: v for k, v in tensors.items() if k.startswith("model::")}


def _losses(run_dir: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _assert_close_weights(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for k in want:
        if want[k].is_floating_point():
            # 3e-5: the ranks' gradients are summed in another order, and Adam at the new experts' 10x rate
            # turns that rounding of near-zero gradients into ~1e-5 on a few expert rows (one V row measured
            # 1.4e-5, every other weight ≤ 3e-6); a different top-k choice would move rows by ~1e-3
            torch.testing.assert_close(got[k], want[k], rtol=0, atol=3e-5, msg=k)
        else:  # frozen masks, BatchNorm step counts: decisions, equal exactly
            assert torch.equal(got[k], want[k]), k


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The reference: one process, the same global batches and seed."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run = _make_run(tmp_path_factory.mktemp("single") / "ws", "single")
        run_phases(run)
    finally:
        torch.set_num_threads(threads)
    return run.dir


@pytest.mark.slow
def test_two_ranks_train_what_one_process_trains(tmp_path, single):
    """Also runs ``_primitives`` on both ranks: sparse mean vs dense, global BatchNorm, broadcasts."""
    run = _make_run(tmp_path / "ws", "dp")
    codes = launch("_train", (str(tmp_path / "ws"), "dp", str(tmp_path), None), tmp_path)
    assert codes == [0, 0], errors(tmp_path)
    # the replicas are identical, decisions and usage ledger included
    rank0, _ = load_tensors(tmp_path / "rank-0.safetensors")
    rank1, _ = load_tensors(tmp_path / "rank-1.safetensors")
    assert rank0.keys() == rank1.keys()
    for k in rank0:
        assert torch.equal(rank0[k], rank1[k]), k
    # rank 0's checkpoint is what every rank holds, and matches the single process to float rounding
    final = _final(run.dir)
    assert all(torch.equal(final[k], rank0[k]) for k in final)
    _assert_close_weights(final, _final(single))
    layer = "model::blocks.1.ffn.frozen"
    assert final[layer].numel() == 24**2 and int(final[layer].sum()) == 16**2  # grew before each phase, froze the old
    # files written once, by rank 0: one metrics line per step, the global-batch loss
    torch.testing.assert_close(_losses(run.dir), _losses(single), rtol=1e-5, atol=0)
    assert json.loads((run.dir / "results.json").read_text())["phases"].__len__() == len(SLICES)


@pytest.mark.slow
def test_a_dead_rank_fails_the_run_and_resume_continues(tmp_path, single):
    run = _make_run(tmp_path / "ws", "killed")
    codes = launch("_train", (str(tmp_path / "ws"), "killed", str(tmp_path), (1, 2)), tmp_path)
    assert codes[1] == 9  # killed after phase 1, step 2 (a step after the mid-phase checkpoint)
    assert codes[0] == 3, "rank 0 must fail, not finish or hang"
    assert "Error" in errors(tmp_path)[0]
    state = json.loads((run.dir / "state.json").read_text())
    assert (state["phase"], state["step"], state["completed_phases"]) == (1, 2, 1)
    # resume on a single process (world size may change: the batch is global) from the phase-1 step-2 checkpoint
    resumed = open_run(Workspace.open(tmp_path / "ws"), "killed", stream=MemoryStream(slices=SLICES))
    run_phases(resumed)
    _assert_close_weights(_final(run.dir), _final(single))
    torch.testing.assert_close(_losses(run.dir), _losses(single), rtol=1e-5, atol=0)


@pytest.mark.slow
def test_lpeer_run_under_torchrun(tmp_path):
    """The user's command: ``torchrun --nproc_per_node 2 -m lifelong_peer.cli run ...`` trains one
    run (created by rank 0, opened by rank 1), rank 0 alone writes its files and prints the summary."""
    import subprocess
    import sys

    from typer.testing import CliRunner

    from lifelong_peer.cli.main import app

    words = ["peer ", "expert ", "stream ", "slice ", "time ", "the ", "and "]
    docs = [
        {"text": "".join(words[(i * 7 + j * 3) % len(words)] for j in range(60)), "time": f"20{10 + i % 2}-05-01"}
        for i in range(40)
    ]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    ws = str(tmp_path / "ws")
    runner = CliRunner()
    assert runner.invoke(app, ["init", ws]).exit_code == 0
    assert runner.invoke(app, ["ingest", str(tmp_path / "docs.jsonl"), "--name", "toy", "-w", ws]).exit_code == 0
    (tmp_path / "tiny.toml").write_text(
        "[train]\neval_tokens = 128\nusage_tokens = 128\nwarmup = 1\n"
        "[model]\ndim = 32\nlayers = 2\nheads = 2\ncontext = 32\n"
        "[model.peer]\nnum_subkeys = 8\nheads = 2\ntopk = 4\ndim_key = 16\n"
    )
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command = [*torchrun, "-m", "lifelong_peer.cli", "run", "--stream", "toy", "--strategy", "lifelong-grow"]
    command += ["--config", str(tmp_path / "tiny.toml"), "--steps", "2", "--batch-size", "4", "--name", "dp"]
    command += ["--workspace", ws, "--format", "json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LPEER_DIST_TIMEOUT_S": "60"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=DEADLINE_S, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)  # one JSON document: rank 1 printed nothing
    assert summary["run"] == "dp"
    run_dir = Path(ws) / "runs" / "dp"
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 2 * 2  # 2 slices × 2 steps, once
    assert json.loads((run_dir / "state.json").read_text())["completed_phases"] == 2


# --- issue 25: the lifelong preset (replay + distillation on the replayed rows) on two ranks ----------------

#: the lifelong preset (replay half of every batch, distil the previous phase's model on the replayed rows) for
#: 3 × 20 steps; with batch 4 rank 0 trains the 2 replayed rows of each batch and rank 1 none
LIFELONG = {"steps": 20, "batch_size": 4, "eval_tokens": 256, "usage_tokens": 256, "warmup": 2, "base_steps": 2}
LIFELONG_SLICES = ("a", "b", "c")
DTYPES = ("float32", "float64")


def _lifelong_run(root: Path, run_id: str):
    ws = Workspace.open(root) if root.exists() else Workspace.init(root)
    stream = MemoryStream(slices=LIFELONG_SLICES)
    model, train = resolve_config("lifelong", LIFELONG, TINY)
    cfg = RunConfig(run=run_id, stream=stream.name, slices=list(LIFELONG_SLICES), model=model, train=train)
    return create_run(ws, cfg, stream=stream)


def _recorded_training(run, dtype: str, out: Path) -> None:
    """Train ``run`` with its model in ``dtype`` and the trainer's ``step`` wrapped: keep the token ids of each
    step's rows on this rank (steps, B / world, T + 1) and which rows of the global batch were distilled (steps, B)."""
    from lifelong_peer import train
    from lifelong_peer.hooks import Distillation

    real, ids, distilled = train.step, [], []

    def step(model, replica, opt, batch, hooks, tc, device):
        ids.append(batch.clone())
        rows = torch.zeros(batch.shape[0] * distributed.world_size(), dtype=torch.uint8)
        for hook in (h for h in hooks if isinstance(h, Distillation)):
            rows[distributed.rank() * batch.shape[0] + hook.replayed(batch.shape[0]).nonzero().flatten()] = 1
        distilled.append(rows)
        return real(model, replica, opt, batch, hooks, tc, device)

    train.step, default = step, torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))
    try:
        run_phases(run)
    finally:
        train.step = real
        torch.set_default_dtype(default)
    tensors = {"ids": torch.stack(ids), "distilled": torch.stack(distilled)}
    save_tensors(Path(out, f"batches-{dtype}-{distributed.rank()}.safetensors"), tensors, {})


def _train_lifelong(root: str, out: str) -> None:
    """One rank of the runs ``dp-float32`` and ``dp-float64`` made by the parent (``_lifelong_run``)."""
    for dtype in DTYPES:
        run = open_run(Workspace.open(root), f"dp-{dtype}", stream=MemoryStream(slices=LIFELONG_SLICES))
        _recorded_training(run, dtype, Path(out))


def _relative(got: list[float], want: list[float]) -> float:
    return max(abs(x - y) / abs(y) for x, y in zip(got, want, strict=True))


def _matrix(run_dir: Path) -> list[float]:
    results = json.loads((run_dir / "results.json").read_text())
    return [x for split in results["eval"].values() for row in split["after"] for x in row["bpb"]]


@pytest.mark.slow
def test_two_ranks_replay_and_distil_exactly_the_single_process_rows(tmp_path, one_thread):
    """Issue 25, the lifelong preset on two ranks against one process over 60 steps: the global batch assembled
    from the ranks' rows has the single process's token ids at every step (base training, replay, new rows),
    and the distillation hook distils the same rows of it. What remains is float32 rounding: in float64 the
    two agree to 1e-15, while in float32 the difference stays at 1e-7 until it jumps at one step (as a near tie
    in a top-k broken the other way would) and the runs drift apart — measured 7.8e-5 relative on the per-step
    loss, 6.1e-5 on the final matrix (README)."""
    single = tmp_path / "single"
    for dtype in DTYPES:
        _recorded_training(_lifelong_run(single / "ws", f"dp-{dtype}"), dtype, single)
        _lifelong_run(tmp_path / "ws", f"dp-{dtype}")
    codes = launch("_train_lifelong", (str(tmp_path / "ws"), str(tmp_path)), tmp_path)
    assert codes == [0, 0], errors(tmp_path)
    for dtype in DTYPES:
        want = load_tensors(single / f"batches-{dtype}-0.safetensors")[0]
        ranks = [load_tensors(tmp_path / f"batches-{dtype}-{r}.safetensors")[0] for r in range(2)]
        assert want["ids"].shape == (2 + 3 * 20, 4, TINY.context + 1)
        assert torch.equal(torch.cat([r["ids"] for r in ranks], dim=1), want["ids"])
        assert torch.equal(ranks[0]["distilled"] | ranks[1]["distilled"], want["distilled"])
        assert want["distilled"][2 + 20 :, :2].all() and not want["distilled"][:, 2:].any()  # the replayed rows
        assert not ranks[1]["distilled"].any()  # rank 1 holds no replayed row: no teacher forward there
    loss = {d: _relative(_losses(tmp_path / "ws" / "runs" / f"dp-{d}"), _losses(single / "ws" / "runs" / f"dp-{d}"))
            for d in DTYPES}  # fmt: skip
    matrix = {d: _relative(_matrix(tmp_path / "ws" / "runs" / f"dp-{d}"), _matrix(single / "ws" / "runs" / f"dp-{d}"))
              for d in DTYPES}  # fmt: skip
    assert loss["float64"] < 1e-12 and matrix["float64"] < 1e-12  # the same computation, to float64 rounding
    assert loss["float32"] < 1e-3 and matrix["float32"] < 1e-3  # float32 rounding, grown over 60 steps
