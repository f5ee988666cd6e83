"""The paper's own claims at small scale (issue 18): Fig. 3a and Table 2 of He 2024, from scratch.

Fig. 3a: at a fixed number of active experts h·k, a larger pool (N = n²) should give a lower loss.
Table 2: query BatchNorm should use nearly every expert and lower the KL unevenness of the
score-weighted usage, at every N.

Every run trains a byte-level LM from scratch (``TrainConfig.base_steps``, the library's base
training) on the mix of the shipped State of the Union eras' train splits
(``lifelong_peer.streams.ingest_default``), is scored on the eras' validation splits (to choose the
learning rate) and test splits (reported), and has its expert usage measured on the test splits
(``index.collect_usage`` → ``index.layer_stats``: usage %, KL(usage ‖ uniform)).

Runs, in the order they are done (re-planned after every finished run):

1. the learning-rate sweep on seed 0: every model at the first lr of ``--lrs`` (PEER at each N with
   query BatchNorm, the paper's default, and a dense FFN whose hidden width is h·k: the same active
   expert weights), then at the others. ``--sweep-steps`` runs the sweep shorter than ``--steps``
   (a setup of its own); the long runs then use the lr it chose;
2. per seed: every model at its chosen lr (the lowest validation bpb of its sweep), and, for the
   first ``--bn-seeds`` seeds, PEER without query BatchNorm (``PEERConfig.query_norm = "none"``) at
   the BatchNorm model's lr (Table 2). A model's runs of this step wait until its sweep is done.

One subprocess per run, so a crash or kill loses only that run; each finished run is appended to
the JSON file (``--out``) at once and never redone (a run is identified by its settings). Several
workers (one per core) can share one plan: each claims the next unclaimed run under a lock file
(``.claims`` next to ``--out``; a killed worker's claims lapse with its process).

    python benchmarks/paper.py --plan            # what is left and its estimated cost
    nice -n 19 python benchmarks/paper.py        # run it all (resumable: run it again to continue)
    python benchmarks/paper.py --max-runs 4      # at most 4 runs, then stop
    python benchmarks/paper.py & python benchmarks/paper.py   # two workers, one plan
    python benchmarks/paper.py --report          # only the table, plot and draft from what is done

Writes ``--out`` (benchmarks/results/paper.json), the plot (benchmarks/results/paper-fig3a.png) and
the RESULTS.md section draft (benchmarks/results/paper.md, with the hand-written reading kept).
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from sweep import locked  # noqa: E402  the lock file sweep.py's workers share, serialising appends and claims

RESULTS = ROOT / "benchmarks/results"

#: Seconds per training step measured on the project's 2-core machine (30 Nov 2026, one thread,
#: the default setup below, machine otherwise quiet); only for ``--plan`` before a run of that kind
#: has finished (afterwards the finished runs' own wall times are used).
MEASURED_STEP_S = {("peer", 32): 0.31, ("peer", 64): 0.32, ("peer", 128): 0.37, ("peer", 256): 0.44}
MEASURED_STEP_S |= {("dense", None): 0.12, ("dense-total", None): 60.0}
EVAL_OVERHEAD = 1.1  # evaluation (validation + test) and the usage pass, as a fraction of training
WAIT_S = 30  # a worker with nothing to claim looks again after this many seconds

READING_MARK = "<!-- reading: written by hand, kept when the script rewrites this file -->"


def setup_of(args: argparse.Namespace) -> dict:
    """The settings every run of one experiment shares (a run is only compared with its own setup)."""
    if (args.heads * args.topk) % args.dim:
        raise SystemExit(f"h·k = {args.heads * args.topk} must be a multiple of dim {args.dim} (the dense FFN width)")
    return {
        "stream": args.stream,
        "dim": args.dim,
        "layers": args.layers,
        "attn_heads": args.attn_heads,
        "context": args.context,
        "heads": args.heads,
        "topk": args.topk,
        "dim_key": args.dim_key,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "warmup": args.warmup,
        "eval_tokens": args.eval_tokens,
        "usage_tokens": args.usage_tokens,
    }


def spec(model: str, n: int | None, lr: float, seed: int, bn: bool = True) -> dict:
    """One run: model 'peer' (N = n² experts), 'dense' (FFN width h·k) or 'dense-total' (width n²)."""
    return {"model": model, "n": n, "bn": bn, "lr": lr, "seed": seed}


def run_name(s: dict) -> str:
    size = f"-n{s['n']}" if s["n"] else ""
    return f"{s['model']}{size}{'' if s['bn'] else '-nobn'}-lr{s['lr']:g}-s{s['seed']}"


def _tag(setup: dict) -> str:
    return hashlib.sha1(json.dumps(setup, sort_keys=True).encode()).hexdigest()[:8]


def _key(s: dict) -> str:
    return json.dumps(s, sort_keys=True)


# --- results file ----------------------------------------------------------------------------------


def load_rows(path: Path) -> list[dict]:
    return json.loads(path.read_text())["runs"] if path.exists() else []


def append_row(path: Path, row: dict) -> None:
    """Add one finished run to the JSON file (temp file + rename: a kill never leaves half a file)."""
    from lifelong_peer.files import atomic_write_json
    from lifelong_peer.system import machine

    row = row | {"machine": machine()}  # issue 25: where this run's numbers come from
    with locked(path):  # parallel workers append one at a time
        atomic_write_json(path, {"runs": [*load_rows(path), row]})


def finished(rows: list[dict], setup: dict) -> dict[str, dict]:
    """{spec key: row} of the runs of ``setup`` already done."""
    return {_key(r["spec"]): r for r in rows if r["setup"] == setup}


# --- planning --------------------------------------------------------------------------------------


def models_of(sizes: list[int], dense_total: bool) -> list[tuple[str, int | None]]:
    out: list[tuple[str, int | None]] = [("peer", n) for n in sizes] + [("dense", None)]
    return out + ([("dense-total", max(sizes))] if dense_total else [])


def chosen_lr(swept: dict[str, dict], model: str, n: int | None, lrs: list[float]) -> float:
    """The lr of the lowest validation bpb on seed 0 among the finished sweep runs (the first lr if none)."""
    scored = [(swept[_key(spec(model, n, lr, 0))]["val_bpb"], lr) for lr in lrs if _key(spec(model, n, lr, 0)) in swept]
    return min(scored)[1] if scored else lrs[0]


def job(setup: dict, s: dict) -> dict:
    return {"setup": setup, "spec": s}


def job_name(j: dict) -> str:
    return f"{_tag(j['setup'])}-{run_name(j['spec'])}"


def plan(
    setup: dict,
    rows: list[dict],
    sizes: list[int],
    lrs: list[float],
    seeds: int,
    bn_seeds: int,
    dense_total: bool,
    sweep_setup: dict | None = None,
) -> list[dict]:
    """The runs (jobs: setup + spec) still to do, in the order of the module docstring.

    The sweep runs on ``sweep_setup`` (``setup`` itself unless the sweep is shorter). A run at a
    model's chosen lr is listed only once that model's sweep has finished, so parallel workers never
    start one at a guessed lr.
    """
    sweep_setup = sweep_setup or setup
    done = {_tag(st): finished(rows, st) for st in (setup, sweep_setup)}
    swept = done[_tag(sweep_setup)]
    models = models_of(sizes, dense_total)
    out: list[dict] = []

    def want(st: dict, s: dict) -> None:
        if _key(s) not in done[_tag(st)] and job(st, s) not in out:
            out.append(job(st, s))

    def lr_of(model: str, n: int | None) -> float | None:
        complete = all(_key(spec(model, n, lr, 0)) in swept for lr in lrs)
        return chosen_lr(swept, model, n, lrs) if complete else None

    for lr in lrs:  # the first lr for every model first, then the rest of the sweep
        for model, n in models:
            want(sweep_setup, spec(model, n, lr, 0))
    chosen = {(model, n): lr_of(model, n) for model, n in models}
    for seed in range(seeds):
        for model, n in models:
            if chosen[model, n] is not None:
                want(setup, spec(model, n, chosen[model, n], seed))
        if seed < bn_seeds:  # Table 2: PEER without query BatchNorm at the BatchNorm model's lr
            for n in sizes:
                if chosen["peer", n] is not None:
                    want(setup, spec("peer", n, chosen["peer", n], seed, bn=False))
    return out


def estimate_s(j: dict, rows: list[dict]) -> float | None:
    """Seconds a run should take: the fastest finished run of its kind (per step: a loaded machine only
    slows runs down), else the measured step time."""
    s, steps = j["spec"], j["setup"]["steps"]
    same = [
        r["wall_s"] / r["setup"]["steps"]
        for r in rows
        if {**r["setup"], "steps": steps} == j["setup"] and (r["spec"]["model"], r["spec"]["n"]) == (s["model"], s["n"])
    ]
    if same:
        return min(same) * steps
    step = MEASURED_STEP_S.get((s["model"], s["n"] if s["model"] == "peer" else None))
    return None if step is None else step * steps * EVAL_OVERHEAD


def print_plan(todo: list[dict], setup: dict, rows: list[dict], dense_total: bool, claims: dict[str, int]) -> None:
    total, unknown = 0.0, 0
    print(f"setup {_tag(setup)}: {json.dumps(setup)}")
    for st in {_tag(j["setup"]): j["setup"] for j in todo if j["setup"] != setup}.values():
        print(f"learning-rate sweep on setup {_tag(st)}: {st['steps']} steps, otherwise the same")
    print(f"{len(finished(rows, setup))} run(s) of it finished, {len(todo)} run(s) to do:")
    for j in todo:
        est = estimate_s(j, rows)
        total += est or 0.0
        unknown += est is None
        busy = f"  (running: pid {claims[job_name(j)]})" if job_name(j) in claims else ""
        print(f"  {job_name(j):37s} ~{'?' if est is None else f'{est / 60:.0f} min'}{busy}")
    print(
        f"estimated total: {total / 3600:.1f} h on one thread"
        + (f" (+{unknown} of unknown cost)" if unknown else "")
        + "; runs at a chosen lr are listed once that model's sweep is done"
    )
    if not dense_total:
        step = MEASURED_STEP_S[("dense-total", None)]
        print(
            f"not planned: a dense FFN as wide as the largest pool (--dense-total), "
            f"~{step * setup['steps'] / 3600:.0f} h per run at {step:.0f} s/step"
        )


# --- parallel workers ------------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def live_claims(out: Path) -> dict[str, int]:
    """{job name: pid} of the runs a live worker is doing (a killed worker's claims lapse with it)."""
    path = out.with_suffix(".claims")
    claims = json.loads(path.read_text()) if path.exists() else {}
    return {name: pid for name, pid in claims.items() if _alive(pid)}


def claim(out: Path, make_todo: Callable[[], list[dict]]) -> tuple[dict | None, int]:
    """The first run still to do that no live worker has claimed, now claimed by this process (None if
    none), and how many are still to do. The plan is made under the lock: a run another worker has just
    finished is in the results file, or still claimed, never neither."""
    from lifelong_peer.files import atomic_write_json

    with locked(out):
        claims, todo = live_claims(out), make_todo()
        for j in todo:
            if job_name(j) not in claims:
                atomic_write_json(out.with_suffix(".claims"), claims | {job_name(j): os.getpid()})
                return j, len(todo)
    return None, len(todo)


def release(out: Path, j: dict) -> None:
    """This worker is done with ``j`` (finished or failed)."""
    from lifelong_peer.files import atomic_write_json

    with locked(out):
        claims = live_claims(out)
        claims.pop(job_name(j), None)
        atomic_write_json(out.with_suffix(".claims"), claims)


# --- one run (in its own process) ------------------------------------------------------------------


def model_overrides(setup: dict, s: dict) -> dict:
    """ModelConfig fields of a run: PEER in every block, or dense FFNs of width h·k or n²."""
    d = setup["dim"]
    over = {"dim": d, "layers": setup["layers"], "heads": setup["attn_heads"], "context": setup["context"]}
    if s["model"] == "peer":
        peer = {"num_subkeys": s["n"], "heads": setup["heads"], "topk": setup["topk"], "dim_key": setup["dim_key"]}
        return over | {"peer_blocks": "all", "peer": peer | {"query_norm": "batchnorm" if s["bn"] else "none"}}
    width = setup["heads"] * setup["topk"] if s["model"] == "dense" else s["n"] ** 2
    if width % d:
        raise ValueError(f"dense FFN width {width} is not a multiple of dim {d}")
    return over | {"peer_blocks": "none", "ffn_mult": width // d}


def train_one(work: Path, setup: dict, s: dict) -> dict:
    """Train one run from scratch, evaluate it, measure its expert usage; the row for the JSON file."""
    import torch

    from lifelong_peer.index import UsageLedger, collect_usage, layer_stats
    from lifelong_peer.metrics import _mean
    from lifelong_peer.peer import pair_of
    from lifelong_peer.run import new_run
    from lifelong_peer.streams import ingest_default
    from lifelong_peer.train import run_phases
    from lifelong_peer.workspace import MANIFEST, Workspace

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    ws = Workspace.open(work) if (work / MANIFEST).is_file() else Workspace.init(work)
    if setup["stream"] not in ws.manifest()["streams"]:
        if setup["stream"] != "sotu":
            raise SystemExit(f"{work}: no stream {setup['stream']!r}; ingest it first")
        ingest_default(ws, "sotu")
    run_id = f"paper-{_tag(setup)}-{run_name(s)}"
    shutil.rmtree(ws.run_dir(run_id), ignore_errors=True)  # a run killed before it finished starts over
    train = {
        "base_steps": setup["steps"],
        "base_lr": s["lr"],
        "warmup": setup["warmup"],
        "seed": s["seed"],
        "batch_size": setup["batch_size"],
        "eval_tokens": setup["eval_tokens"],
        "usage_tokens": setup["usage_tokens"],
    }
    run = new_run(ws, setup["stream"], "naive", train, model_overrides(setup, s), run_id=run_id)
    start = time.time()
    curve = []  # (step, one batch's training loss) every 100 steps: where the loss drop came

    def progress(event: dict) -> None:
        if event.get("event") == "step" and (event["step"] + 1) % 100 == 0:
            curve.append([event["step"] + 1, event["loss"]])
            print(
                f"  step {event['step'] + 1}: loss {event['loss']:.3f} ({time.time() - start:.0f} s)", file=sys.stderr
            )

    results = run_phases(run, phases=[], progress=progress)  # base training on the mix, then its evaluation
    wall = time.time() - start
    bpb = {split: _mean(e.before.bpb, e.before.bytes) for split, e in results.eval.items()}
    ledger = UsageLedger()
    for name in run.config.slices:
        collect_usage(run.model, run.windows(name, "test", setup["usage_tokens"])[:, :-1], ledger, name)
    usage = []
    for pos, layer in enumerate(run.model.peer_layers()):
        st = layer_stats(ledger, pos, layer.num_experts, layer.frozen)
        usage.append({k: st[k] for k in ("usage_pct", "kl_unevenness", "dead", "tokens")})
        # Which sub-keys the retrieved experts use (rows i, columns j): an expert is only reachable if
        # both its sub-keys reach a head's top-k candidates, so dead sub-keys bound usage by their product.
        i, j = pair_of(ledger.total(pos).ids)
        n = layer.num_subkeys
        usage[-1]["subkey_usage_pct"] = [100.0 * i.unique().numel() / n, 100.0 * j.unique().numel() / n]
    layers = run.model.peer_layers()
    return {
        "setup": setup,
        "spec": s,
        "run": run_id,
        "val_bpb": bpb["validation"],
        "test_bpb": bpb["test"],
        "wall_s": wall,
        "train_tokens": setup["steps"] * setup["batch_size"] * setup["context"],
        "experts_per_layer": layers[0].num_experts if layers else 0,
        "params": run.model.num_params(),
        "active_params": run.model.active_params_per_token(),
        "usage": usage,
        "train_loss": curve,
        "threads": torch.get_num_threads(),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


# --- aggregation -----------------------------------------------------------------------------------


def _stat(values: list[float]) -> dict:
    """mean, sample std (None for one value) and count."""
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else None,
        "n": len(values),
    }


def _usage_value(u: dict, key: str) -> float | None:
    """One layer's usage quantity; the sub-key ones come from its two halves' % (None in older rows)."""
    halves = u.get("subkey_usage_pct")
    if key == "subkey_usage_pct":
        return None if halves is None else statistics.fmean(halves)  # mean of the halves
    if key == "grid_bound_pct":
        return None if halves is None else halves[0] * halves[1] / 100  # rows used × columns used
    return u[key]


def _layer_mean(row: dict, key: str) -> float | None:
    """Mean over layers of one usage quantity (None if no layer has it)."""
    values = [v for v in (_usage_value(u, key) for u in row["usage"]) if v is not None]
    return statistics.fmean(values) if values else None


def aggregate(
    rows: list[dict],
    setup: dict,
    sizes: list[int],
    lrs: list[float],
    dense_total: bool = False,
    sweep_setup: dict | None = None,
    other_budgets: bool = True,
) -> dict:
    """Per model: the chosen lr (seed 0, validation, on ``sweep_setup``), test bpb mean ± std over seeds at
    it; the Fig. 3a checks over the PEER sizes; Table 2 (usage %, KL unevenness with and without
    BatchNorm) per N."""
    sweep_setup = sweep_setup or setup
    done, swept = finished(rows, setup), finished(rows, sweep_setup)
    models = []
    for model, n in models_of(sizes, dense_total):
        lr = chosen_lr(swept, model, n, lrs)
        runs = sorted((r for r in done.values() if r["spec"] == spec(model, n, lr, r["spec"]["seed"])), key=_seed)
        if not runs:
            continue
        sweep = {
            lr_: swept[_key(spec(model, n, lr_, 0))]["val_bpb"] for lr_ in lrs if _key(spec(model, n, lr_, 0)) in swept
        }
        models.append(
            {
                "model": model,
                "n": n,
                "experts": n * n if model == "peer" else 0,
                "lr": lr,
                "sweep_val_bpb": sweep,
                "seeds": [r["spec"]["seed"] for r in runs],
                "test_bpb": _stat([r["test_bpb"] for r in runs]),
                "test_by_seed": {r["spec"]["seed"]: r["test_bpb"] for r in runs},
                "val_bpb": _stat([r["val_bpb"] for r in runs]),
                "params": runs[0]["params"],
                "active_params": runs[0]["active_params"],
                "wall_s": _stat([r["wall_s"] for r in runs]),
                "train_loss": [r.get("train_loss", []) for r in runs],
            }
        )
    peer = [m for m in models if m["model"] == "peer"]
    checks = [_compare(a, b) for a, b in itertools.pairwise(peer)]
    # every pool against the smallest too: a trend can be clear over a factor 16 in N and still drown
    # in seed noise step by step
    against_smallest = [_compare(peer[0], b) for b in peer[1:]]
    table2 = []
    for m in peer:
        row = {"experts": m["experts"], "lr": m["lr"]}
        for bn in (True, False):
            runs = [r for r in done.values() if r["spec"] == spec("peer", m["n"], m["lr"], r["spec"]["seed"], bn)]
            for key in ("usage_pct", "kl_unevenness", "subkey_usage_pct", "grid_bound_pct"):
                values = [v for v in (_layer_mean(r, key) for r in runs) if v is not None]
                row[f"{key}_{'bn' if bn else 'nobn'}"] = _stat(values) if values else None
            row[f"test_bpb_{'bn' if bn else 'nobn'}"] = _stat([r["test_bpb"] for r in runs]) if runs else None
        table2.append(row)
    budgets = []  # the same experiment at other numbers of steps (each its own sweep): how the picture moves
    others = {r["setup"]["steps"] for r in rows if {**r["setup"], "steps": setup["steps"]} == setup} - {setup["steps"]}
    for steps in sorted(others) if other_budgets else []:
        other = aggregate(rows, {**setup, "steps": steps}, sizes, lrs, dense_total, other_budgets=False)
        keep = ("model", "experts", "lr", "test_bpb")
        usage = ("experts", "usage_pct_bn", "usage_pct_nobn", "kl_unevenness_bn", "kl_unevenness_nobn")
        budgets.append(
            {
                "steps": steps,
                "models": [{k: m[k] for k in keep} for m in other["models"]],
                "table2": [{k: t[k] for k in usage} for t in other["table2"]],
            }
        )
    return {
        "setup": setup,
        "sweep_steps": sweep_setup["steps"],
        "other_budgets": budgets,
        "models": models,
        "fig3a": {
            "checks": checks,
            "against_smallest": against_smallest,
            "monotone": bool(checks) and all(c["lower"] for c in checks),
            "clear": bool(checks) and all(c["clear"] for c in checks),
        },
        "table2": table2,
        "kl_lower_with_bn": [
            t["experts"]
            for t in table2
            if t["kl_unevenness_bn"]
            and t["kl_unevenness_nobn"]
            and t["kl_unevenness_bn"]["mean"] < t["kl_unevenness_nobn"]["mean"]
        ],
    }


def _compare(a: dict, b: dict) -> dict:
    """Fig. 3a check of the larger pool ``b`` against ``a`` (models of ``aggregate``): the gap of the means
    and the issue's test (clear = gap > 2 × the larger seed std), and the same paired by seed."""
    gap = a["test_bpb"]["mean"] - b["test_bpb"]["mean"]  # > 0: the larger pool is better
    spread = max(a["test_bpb"]["std"] or 0.0, b["test_bpb"]["std"] or 0.0)
    # Paired by seed: a seed fixes the data order for every size, and a late loss drop hits every
    # size that sees that order, so the per-seed differences are far less noisy than either mean.
    common = sorted(set(a["test_by_seed"]) & set(b["test_by_seed"]))
    diffs = [a["test_by_seed"][s] - b["test_by_seed"][s] for s in common]
    paired = _stat(diffs) if diffs else None
    return {
        "from": a["experts"],
        "to": b["experts"],
        "gap": gap,
        "twice_spread": 2 * spread,
        "lower": gap > 0,
        "clear": gap > 2 * spread and min(a["test_bpb"]["n"], b["test_bpb"]["n"]) > 1,
        "paired_gap": paired,
        "clear_paired": bool(paired and paired["n"] > 1 and paired["mean"] > 2 * paired["std"]),
    }


def _seed(row: dict) -> int:
    return row["spec"]["seed"]


def tokens_per_expert(setup: dict, experts: int) -> float:
    """Expert retrievals per expert per layer over training: tokens · h·k / N."""
    return setup["steps"] * setup["batch_size"] * setup["context"] * setup["heads"] * setup["topk"] / experts


# --- outputs ---------------------------------------------------------------------------------------


def _pm(stat: dict | None, fmt: str = "{:.4f}") -> str:
    if not stat:
        return "—"
    return fmt.format(stat["mean"]) + ("" if stat["std"] is None else " ± " + fmt.replace("+", "").format(stat["std"]))


def plot(agg: dict, path: Path) -> Path | None:
    """Two panels. Left: test bpb vs N (log scale) with seed-std error bars, the runs without BatchNorm,
    the same experiment at other step budgets (thin), the dense FFN of the same active size as a line.
    Right: training loss (one batch every 100 steps) per N and seed: where each run's loss drop came."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from lifelong_peer.files import atomic_write

    peer = [m for m in agg["models"] if m["model"] == "peer"]
    if not peer:
        return None
    fig = Figure(figsize=(11, 3.9))
    ax, curves = fig.subplots(1, 2)
    x = [m["experts"] for m in peer]
    seeds = max(m["test_bpb"]["n"] for m in peer)
    hk = agg["setup"]["heads"] * agg["setup"]["topk"]
    steps = agg["setup"]["steps"]
    ax.errorbar(
        x,
        [m["test_bpb"]["mean"] for m in peer],
        yerr=[m["test_bpb"]["std"] or 0.0 for m in peer],
        marker="o",
        capsize=4,
        color="tab:blue",
        label=f"PEER, h·k = {hk}, {steps:,} steps",
    )
    for b in agg.get("other_budgets", []):
        other = [m for m in b["models"] if m["model"] == "peer"]
        n = max(m["test_bpb"]["n"] for m in other) if other else 0
        ax.errorbar(
            [m["experts"] for m in other],
            [m["test_bpb"]["mean"] for m in other],
            yerr=[m["test_bpb"]["std"] or 0.0 for m in other],
            marker=".",
            lw=0.8,
            alpha=0.6,
            color="grey",
            capsize=2,
            label=f"PEER, {b['steps']:,} steps ({n} seed{'s' if n > 1 else ''})",
        )
    nobn = [(t["experts"], t["test_bpb_nobn"]) for t in agg["table2"] if t["test_bpb_nobn"]]
    if nobn:
        ax.errorbar(
            [e for e, _ in nobn],
            [st["mean"] for _, st in nobn],
            yerr=[st["std"] or 0.0 for _, st in nobn],
            marker="s",
            ls=":",
            color="tab:orange",
            capsize=4,
            label=f"PEER without query BatchNorm, {steps:,} steps",
        )
    for m in agg["models"]:
        if m["model"] != "peer":
            width = hk if m["model"] == "dense" else m["n"] ** 2
            ax.axhline(
                m["test_bpb"]["mean"],
                ls="--",
                color="grey" if m["model"] == "dense" else "black",
                label=f"dense FFN, width {width:,}, {steps:,} steps",
            )
    ax.set_xscale("log", base=2)
    ax.set_xticks(x, [f"{math.isqrt(v)}²" for v in x])
    ax.set_xlabel("experts N (log scale)")
    ax.set_ylabel("test bits per byte (lower is better)")
    ax.set_title(f"Fig. 3a at small scale: up to {seeds} seed(s), mean ± std", fontsize=9)
    ax.legend(fontsize=7)
    colors = dict(zip(x, ("tab:blue", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:olive"), strict=False))
    for m in peer:
        for i, curve in enumerate(m["train_loss"]):
            if curve:
                label = f"N = {m['experts']:,}" if i == 0 else None
                curves.plot(*zip(*curve, strict=True), color=colors.get(m["experts"]), lw=1, alpha=0.8, label=label)
    curves.set_xlabel("step")
    curves.set_ylabel("training loss, one batch (nats per byte)")
    curves.set_title("when each run's loss drop came (every seed)", fontsize=9)
    if curves.lines:
        curves.legend(fontsize=7)
    FigureCanvasAgg(fig)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))
    return path


def markdown(agg: dict, plot_path: Path | None, minutes: float) -> str:
    """The RESULTS.md section draft: setup, budget, the Fig. 3a table and checks, Table 2."""
    st = agg["setup"]
    hk = st["heads"] * st["topk"]
    tokens = st["steps"] * st["batch_size"] * st["context"]
    sweep_note = "" if agg["sweep_steps"] == st["steps"] else f" (runs of {agg['sweep_steps']:,} steps)"
    lines = [
        "## The paper's claims at small scale: Fig. 3a and Table 2 (issue 18)",
        "",
        f"Generated by `python benchmarks/paper.py` ({len(agg['models'])} model(s) with results; {minutes:.0f} min "
        f"of runs in all, one thread per run). Every model is trained from scratch on the mix of the six eras' "
        f"train splits (the shipped SOTU stream) for {st['steps']:,} steps × {st['batch_size']} × {st['context']} "
        f"bytes = {tokens:,} training tokens; dim {st['dim']}, {st['layers']} blocks, PEER in every block with "
        f"h = {st['heads']}, k = {st['topk']} (h·k = {hk}), dim_key {st['dim_key']}; the dense FFN has width "
        f"h·k = {hk} (the same active expert weights). Learning rate: the lowest validation bpb on seed 0 over "
        f"the sweep{sweep_note}; numbers: test bits per byte (token-weighted over eras), mean ± std over seeds.",
        "",
        "| model | experts / layer | tokens per expert | lr (sweep: val bpb) | seeds | test bpb | params | active params | min / run |",
        "|---|---:|---:|---|---:|---|---:|---:|---:|",
    ]
    for m in agg["models"]:
        name = {"peer": "PEER", "dense": f"dense FFN, width {hk}", "dense-total": "dense FFN, width N"}[m["model"]]
        tpe = f"{tokens_per_expert(st, m['experts']):,.0f}" if m["experts"] else "—"
        sweep = ", ".join(f"{lr:g}: {v:.4f}" for lr, v in sorted(m["sweep_val_bpb"].items()))
        lines.append(
            f"| {name} | {m['experts']:,} | {tpe} | {m['lr']:g} ({sweep}) | {m['test_bpb']['n']} | "
            f"{_pm(m['test_bpb'])} | {m['params']:,} | {m['active_params']:,} | {m['wall_s']['mean'] / 60:.1f} |"
        )
    if plot_path is not None:
        lines += ["", f"![test bpb vs N]({os.path.relpath(plot_path, ROOT)})"]
    fig = agg["fig3a"]
    lines += [
        "",
        "Fig. 3a check (gap = bpb of the smaller pool − the larger; clear = gap > 2 × the larger seed std, "
        "the issue's test; paired = the same difference seed by seed (a seed is one data order for every "
        "size), mean ± std, clear when its mean > 2 × its std):",
        "",
    ]
    lines += [
        "| from → to | gap | 2 × spread | lower | clear | paired gap | clear, paired |",
        "|---|---:|---:|---|---|---|---|",
    ]
    rows = [*fig["checks"], *fig.get("against_smallest", [])[1:]]  # its first is the first step
    for i, c in enumerate(rows):
        if i == len(fig["checks"]):
            lines.append("| *each larger pool against the smallest* | | | | | | |")
        paired = c.get("paired_gap")
        lines.append(
            f"| {c['from']:,} → {c['to']:,} | {c['gap']:+.4f} | {c['twice_spread']:.4f} | "
            f"{'yes' if c['lower'] else 'no'} | {'yes' if c['clear'] else 'no'} | "
            f"{_pm(paired, '{:+.4f}')} | {'yes' if c.get('clear_paired') else 'no'} |"
        )
    lines += [
        "",
        f"Monotone: {'yes' if fig['monotone'] else 'no'}; every step clear of seed noise: "
        f"{'yes' if fig['clear'] else 'no'}.",
    ]
    # this budget beside the others, in order of steps: for test bpb here and for Table 2 below
    this = {"steps": st["steps"], "models": agg["models"], "table2": agg["table2"]}
    budgets = sorted([*agg["other_budgets"], this], key=lambda b: b["steps"])
    if agg["other_budgets"]:
        lines += [
            "",
            "The same models at other training budgets (each budget at its own chosen lr; test bpb, seeds):",
            "",
            "| model | " + " | ".join(f"{b['steps']:,} steps" for b in budgets) + " |",
            "|---|" + "---|" * len(budgets),
        ]
        for m in agg["models"]:
            cells = []
            for b in budgets:
                same = [o for o in b["models"] if (o["model"], o["experts"]) == (m["model"], m["experts"])]
                cells.append(f"{_pm(same[0]['test_bpb'])} ({same[0]['test_bpb']['n']})" if same else "—")
            name = f"PEER, {m['experts']:,} experts" if m["model"] == "peer" else f"dense FFN, width {hk}"
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Table 2 at small scale: expert usage (% of experts retrieved at least once) and KL(usage ‖ uniform)"
        " of the router-weight mass, on the test splits "
        f"({st['usage_tokens']:,} tokens per era), mean over the {st['layers']} PEER layers (± std over seeds); "
        "without BatchNorm at the BatchNorm model's learning rate. Sub-keys used: % of each half's sub-keys "
        "that some retrieved expert uses (mean of the halves); bound: rows used × columns used, the most "
        "experts those sub-keys can reach (usage far below it means unused pairs, near it dead sub-keys).",
        "",
        "| experts | lr | usage % (no BN) | usage % (BN) | KL (no BN) | KL (BN) | test bpb (no BN) | test bpb (BN) "
        "| sub-keys used %, BN | bound from sub-keys %, BN |",
        "|---:|---:|---|---|---|---|---|---|---|---|",
    ]
    for t in agg["table2"]:
        lines.append(
            f"| {t['experts']:,} | {t['lr']:g} | {_pm(t['usage_pct_nobn'], '{:.1f}')} | {_pm(t['usage_pct_bn'], '{:.1f}')} | "
            f"{_pm(t['kl_unevenness_nobn'], '{:.3f}')} | {_pm(t['kl_unevenness_bn'], '{:.3f}')} | "
            f"{_pm(t['test_bpb_nobn'])} | {_pm(t['test_bpb_bn'])} | {_pm(t['subkey_usage_pct_bn'], '{:.1f}')} | "
            f"{_pm(t['grid_bound_pct_bn'], '{:.1f}')} |"
        )
    if agg["other_budgets"]:
        # usage and KL move with training (not one way: issue 18), and the runs without BatchNorm may
        # exist at another budget only: every budget's side by side
        lines += [
            "",
            "Table 2 at every training budget (usage % and KL as above; no BN → BN, — where not run):",
            "",
            "| experts | " + " | ".join(f"{b['steps']:,} steps: usage % | KL" for b in budgets) + " |",
            "|---:|" + "---|---|" * len(budgets),
        ]
        for t in agg["table2"]:
            cells = []
            for b in budgets:
                same = [o for o in b["table2"] if o["experts"] == t["experts"]]
                for key, fmt in (("usage_pct", "{:.1f}"), ("kl_unevenness", "{:.3f}")):
                    o = same[0] if same else {}
                    cells.append(f"{_pm(o.get(key + '_nobn'), fmt)} → {_pm(o.get(key + '_bn'), fmt)}")
            lines.append(f"| {t['experts']:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_report(out: Path, agg: dict, rows: list[dict]) -> None:
    """paper-fig3a.png and paper.md next to ``out``; the hand-written reading after READING_MARK is kept."""
    png = plot(agg, out.with_name(out.stem + "-fig3a.png"))
    same = {**agg["setup"], "steps": agg["sweep_steps"]}
    minutes = sum(r["wall_s"] for r in rows if r["setup"] in (agg["setup"], same)) / 60
    md = out.with_suffix(".md")
    kept = ""
    if md.exists() and READING_MARK in md.read_text():
        kept = md.read_text().split(READING_MARK, 1)[1]
    from lifelong_peer.files import atomic_write_text

    atomic_write_text(md, markdown(agg, png, minutes) + "\n" + READING_MARK + (kept or "\n"))
    print(f"wrote {md}" + (f" and {png}" if png else ""), file=sys.stderr)


# --- command line ----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--plan", action="store_true", help="print the runs still to do and their cost; run nothing")
    p.add_argument("--report", action="store_true", help="only aggregate the finished runs (table, plot, draft)")
    p.add_argument("--max-runs", type=int, default=None, help="stop after this many runs")
    p.add_argument("--sizes", default="32,64,128,256", help="sub-keys per half n (N = n²)")
    p.add_argument("--lrs", default="3e-3,1e-3,1e-2", help="learning-rate sweep; the first is run first")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--bn-seeds", type=int, default=1, help="seeds of the runs without query BatchNorm (0: none)")
    p.add_argument("--dense-total", action="store_true", help="also a dense FFN as wide as the largest pool")
    p.add_argument("--stream", default="sotu")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--attn-heads", type=int, default=4)
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--heads", type=int, default=4, help="PEER heads h")
    p.add_argument("--topk", type=int, default=16, help="experts per head k")
    p.add_argument("--dim-key", type=int, default=32)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument(
        "--sweep-steps",
        type=int,
        default=None,
        help="steps of the learning-rate sweep runs (default: --steps); the longer runs use the lr it chose",
    )
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--eval-tokens", type=int, default=16384, help="held-out tokens per era and split")
    p.add_argument("--usage-tokens", type=int, default=16384, help="test tokens per era for Table 2")
    p.add_argument("--work", default=str(RESULTS / "paper-ws"), help="workspace of the runs (not committed)")
    p.add_argument("--out", default=str(RESULTS / "paper.json"))
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: one run, in this process
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out, work = Path(args.out), Path(args.work)
    if args.one:
        j = json.loads(args.one)
        append_row(out, train_one(work, j["setup"], j["spec"]))
        return 0
    setup = setup_of(args)
    sweep_setup = {**setup, "steps": args.sweep_steps or args.steps}
    sizes = [int(n) for n in args.sizes.split(",")]
    lrs = [float(x) for x in args.lrs.split(",")]
    todo_args = (sizes, lrs, args.seeds, args.bn_seeds, args.dense_total, sweep_setup)
    if args.plan:
        rows = load_rows(out)
        print_plan(plan(setup, rows, *todo_args), setup, rows, args.dense_total, live_claims(out))
        return 0
    failed: list[str] = []
    ran = 0
    while not args.report and (args.max_runs is None or ran < args.max_runs):
        j, left = claim(out, lambda: [j for j in plan(setup, load_rows(out), *todo_args) if job_name(j) not in failed])
        if j is None:
            if not live_claims(out):  # nothing left, or only what failed here
                break
            time.sleep(WAIT_S)  # the rest is running elsewhere, or waits for another worker's sweep run
            continue
        name = job_name(j)
        print(f"[{time.strftime('%H:%M:%S')}] {name} ({left} to do)", file=sys.stderr, flush=True)
        start = time.time()
        cmd = [sys.executable, __file__, "--one", json.dumps(j), "--work", str(work), "--out", str(out)]
        try:
            code = subprocess.run(
                cmd, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
            ).returncode
        finally:
            release(out, j)
        ran += 1
        if code:
            failed.append(name)
            print(f"{name} failed (exit {code}); skipped in this invocation", file=sys.stderr)
            continue
        row = finished(load_rows(out), j["setup"])[_key(j["spec"])]
        print(
            f"  val {row['val_bpb']:.4f} test {row['test_bpb']:.4f} in {time.time() - start:.0f} s",
            file=sys.stderr,
            flush=True,
        )
    rows = load_rows(out)
    agg = aggregate(rows, setup, sizes, lrs, args.dense_total, sweep_setup)
    if agg["models"]:
        write_report(out, agg, rows)
        print(json.dumps({k: agg[k] for k in ("fig3a", "kl_lower_with_bn")}, indent=1))
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
