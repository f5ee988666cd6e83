"""Issue 24: strategies at equal memory, and the cost of a long stream.

Every strategy is compared at the same memory budget — experts per PEER layer at the end of the stream:
16,384 (n = 128 sub-keys per half), what the earlier ``lifelong`` preset grew to on the six SOTU eras.
naive, replay, replay at lifelong's share (``replay-50``, "start big") and joint continue ONE base of that size
(``scripts/train_base.py --num-subkeys 128``: the shipped base's recipe, 800 steps on the first era);
``lifelong`` continues the same base. The ``lifelong`` preset trains its experts at 3e-3, 3× the rest; the
``-x3`` rows give every other strategy the same rate, so that the comparison measures the recipe, not the
rate (the rows without it are the earlier comparison, all at one rate). The small-pool rows (the shipped
1,024-expert base) stay for reference: replay at 40% and the earlier preset that grows 16 sub-keys per half at every slice
(``lifelong-grow``).

Two protocols:

* ``eras``: the six SOTU eras, 80 steps × 16 × 256 bytes per era, 3 seeds (as ``continual.py``);
* ``long``: SOTU cut into 59 four-year slices (1790–1793, …, 2022–2026: each has ≥ 3 addresses, so held-out
  text; ``quantiles:48`` leaves some slices without any), a fixed budget of 10 steps per slice (TiC-LM's
  protocol), 2 seeds: per phase ms per step, experts, parameters, active parameters per token and the run
  directory's bytes (``sweep.phase_cost``).

    python benchmarks/equal_memory.py                       # the eras protocol (2 workers)
    python benchmarks/equal_memory.py --protocol long
    python benchmarks/equal_memory.py --protocol long --table   # only rebuild the tables from the JSON
    python benchmarks/equal_memory.py --stream debian --source debian.jsonl \
        --slice eras:1990,2019,2021,2022,2023,2024 --big-base debian-base-128.safetensors   # another corpus

Another corpus (``--stream``, eras protocol) needs its own budget-sized base
(``scripts/train_base.py --source FILE --slice SPEC --num-subkeys 128``); its small-pool rows need
``--small-base`` or ``--import`` from ``continual.py``'s runs on the same stream.

The bases are built once into ``--bases`` (or given with ``--small-base`` / ``--big-base``) and each
record names the base file and its sha256. Results: ``benchmarks/results/equal-memory-<protocol>-results.json``
(``equal-memory-<stream>-results.json`` for another corpus).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sweep import read_json

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks/results"
BUDGET_SUBKEYS = 128
PROTOCOLS = {
    "eras": {"slice": None, "seeds": 3, "steps": 80, "overrides": {}},
    "long": {
        "slice": "eras:" + ",".join(str(year) for year in range(1790, 2023, 4)),  # 59 four-year slices
        "seeds": 2,
        "steps": 10,
        # 59 slices scored after each of 59 phases: 512 held-out tokens per slice and split keep that affordable
        "overrides": {"eval_tokens": 512, "usage_tokens": 1024},
    },
}
X3 = {"expert_lr": 3e-3}
#: label → (preset, overrides, base): the rows, in order. "big": the budget-sized base; "small": the shipped one
ROWS = {
    # every strategy with its experts and sub-keys at 3x the rate of the rest (expert_lr 3e-3): it helped every
    # strategy on the SOTU validation splits (sweep24d), so the comparison gives it to all of them
    "joint-x3": ("joint", X3, "big"),
    "naive-x3": ("naive", X3, "big"),
    "replay-x3": ("replay", X3, "big"),
    "replay-50-x3": ("replay", {"replay": 0.5, **X3}, "big"),  # start big, replay at lifelong's share
    "lifelong": ("lifelong", {}, "big"),
    # the fourth session's preset: a constant 50% replay share (replay_growth 0)
    "lifelong-g0": ("replay", {"replay": 0.5, "distill": 0.5, "distill_on": "replay", **X3}, "big"),
    # the same rows at the one learning rate (the earlier comparison)
    "joint": ("joint", {}, "big"),
    "naive": ("naive", {}, "big"),
    "replay": ("replay", {}, "big"),
    "replay-50": ("replay", {"replay": 0.5}, "big"),
    "lifelong-x1": ("replay", {"replay": 0.5, "distill": 0.5, "distill_on": "replay"}, "big"),
    # the preset of the first equal-memory runs: distillation at weight 1
    "lifelong-d1": ("replay", {"replay": 0.5, "distill": 1.0, "distill_on": "replay"}, "big"),
    "small-replay-40": ("replay", {"replay": 0.4}, "small"),
    # the earlier preset: a new generation of 16 sub-keys per half at every slice from the small base, capped
    # by the budget, so that on a long stream it stops growing where the fixed pool's size is
    "small-grow16": ("lifelong-grow", {}, "small"),
}


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def big_base(args) -> Path:
    """The budget-sized base: given, or built once with the shipped base's recipe at n = 128."""
    if args.big_base:
        return Path(args.big_base)
    path = Path(args.bases).expanduser() / f"sotu-base-{BUDGET_SUBKEYS}.safetensors"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        script = ROOT / "scripts/train_base.py"
        subprocess.run(
            [sys.executable, str(script), "--num-subkeys", str(BUDGET_SUBKEYS), "--out", str(path)], check=True
        )
    return path


def machine(workers: int) -> dict:
    """The CPU, threads and kernel build every result is recorded with (``system.machine``, issue 25)."""
    from lifelong_peer.system import machine

    return machine() | {"cores": os.cpu_count(), "threads_per_run": 1, "runs_at_once": workers}


def plan(labels: list[str], protocol: dict, bases: dict[str, Path], stream: dict | None = None) -> list[dict]:
    """One sweep entry per row label; ``stream`` ({"stream", "source", "slice"}) for a corpus other than SOTU."""
    entries = []
    for label in labels:
        strategy, overrides, pool = ROWS[label]
        entry = {
            "name": label,
            "strategy": strategy,
            "overrides": {**protocol["overrides"], **overrides},
            "seeds": list(range(protocol["seeds"])),
            "base": str(bases[pool]),
        }
        if protocol["slice"]:
            entry |= {"stream": "sotu-long", "slice": protocol["slice"]}
        if stream:
            entry |= stream
        entries.append(entry)
    return entries


def cost_rows(records: list[dict]) -> list[dict]:
    """Per label (mean over seeds): experts per layer, parameters, active parameters per token and ms per step
    at the first and last phase, the run directory's bytes at the end."""
    out = []
    for label in ROWS:
        runs = [r for r in records if r["name"] == label and r.get("phase_cost")]
        if not runs:
            continue
        at = lambda i, key: float(np.mean([r["phase_cost"][i][key] for r in runs]))  # noqa: E731, B023
        out.append(
            {
                "run": label,
                "experts_per_layer": at(-1, "experts_per_layer"),
                "params": at(-1, "params"),
                "active_first": at(0, "active_params"),
                "active_last": at(-1, "active_params"),
                "ms_first": at(0, "ms_per_step"),
                "ms_last": at(-1, "ms_per_step"),
                "mb_last": at(-1, "run_bytes") / 1e6,
            }
        )
    return out


def table(out: Path, title: str) -> str:
    from lifelong_peer.metrics import RunResults
    from lifelong_peer.report import compare_runs, markdown

    records = [r for r in read_json(out, []) if r["name"] in ROWS]
    order = {label: i for i, label in enumerate(ROWS)}
    records.sort(key=lambda r: (order[r["name"]], r["seed"]))
    runs = []
    for r in records:
        results = RunResults.from_dict(r["results"], f"{out}: {r['name']} seed {r['seed']}")
        results.strategy, results.run = r["name"], f"{r['name']}-s{r['seed']}"
        runs.append(results)
    comparison = compare_runs(runs, "test")
    out.with_name(out.name.replace("-results", "-table")).write_text(json.dumps(comparison, indent=1))
    lines = [f"## {title}", "", markdown(comparison), "", "Cost (mean over seeds; experts per PEER layer):", ""]
    lines += [
        "| run | experts / layer | params | active / token, first → last | ms / step, first → last | run dir MB |",
        "|---|---|---|---|---|---|",
    ]
    for c in cost_rows(records):
        lines.append(
            f"| {c['run']} | {c['experts_per_layer']:,.0f} | {c['params']:,.0f} | {c['active_first']:,.0f} → "
            f"{c['active_last']:,.0f} (×{c['active_last'] / c['active_first']:.2f}) | {c['ms_first']:.0f} → "
            f"{c['ms_last']:.0f} (×{c['ms_last'] / c['ms_first']:.2f}) | {c['mb_last']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def import_records(spec: str, out: Path) -> None:
    """``FILE:LABEL=NAME,...``: the records named NAME in results file FILE count as this protocol's LABEL rows
    (runs made with the same settings and base elsewhere: the sweep that chose the preset, continual.py's small
    pool); each keeps ``reused_from``. Rows already present are left alone."""
    source, _, pairs = spec.rpartition(":")
    have = read_json(out, [])
    done = {(r["name"], r["seed"]) for r in have}
    for pair in pairs.split(","):
        label, _, name = pair.partition("=")
        for r in read_json(Path(source), []):
            if r["name"] == name and (label, r["seed"]) not in done:
                have.append(r | {"name": label, "reused_from": f"{Path(source).name}: {name}"})
                done.add((label, r["seed"]))
    out.write_text(json.dumps(have, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--protocol", choices=tuple(PROTOCOLS), default="eras")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"labels among {', '.join(ROWS)}")
    parser.add_argument("--seeds", type=int, default=None, help="default: the protocol's (eras 3, long 2)")
    parser.add_argument("--workers", type=int, default=2, help="runs at once (one thread each)")
    parser.add_argument("--small-base", default=None, help="the 1,024-expert base (default: the shipped SOTU one)")
    parser.add_argument("--big-base", default=None, help="the budget-sized base (default: built into --bases)")
    parser.add_argument("--bases", default="~/.cache/lifelong_peer/bases")
    parser.add_argument(
        "--import", dest="imports", action="append", default=[], help="FILE:LABEL=NAME,... (reuse runs)"
    )
    parser.add_argument("--table", action="store_true", help="only rebuild the tables from the results file")
    parser.add_argument("--results-md", action="store_true", help="also write the tables into RESULTS.md")
    parser.add_argument("--work", default="/tmp/lpeer-equal-memory")
    parser.add_argument("--stream", default="sotu", help="another corpus (eras protocol): its name")
    parser.add_argument("--source", default=None, help="with --stream: a file lpeer ingest reads")
    parser.add_argument("--slice", default=None, help="with --stream: its slicing (e.g. eras:2019,2021,2023)")
    args = parser.parse_args()
    protocol = dict(PROTOCOLS[args.protocol])
    if args.seeds:
        protocol["seeds"] = args.seeds
    stream, name, title = None, args.protocol, TITLES[args.protocol]
    if args.stream != "sotu":
        if args.protocol != "eras" or not (args.source and args.slice and (args.big_base or args.table)):
            parser.error("--stream takes the eras protocol, --source, --slice and --big-base (its own base)")
        stream = {"stream": args.stream, "source": str(Path(args.source).resolve()), "slice": args.slice}
        name, title = args.stream, f"Equal memory on {args.stream}: 16,384 experts per layer (issue 24)"
    out = RESULTS / f"equal-memory-{name}-results.json"
    for spec in args.imports:
        import_records(spec, out)
    if not args.table:
        labels = args.rows.split(",")
        if stream and not args.small_base and any(ROWS[label][2] == "small" for label in labels):
            sys.exit("the small-pool rows on another corpus need its own --small-base (or --import them)")
        small = args.small_base or ROOT / "lifelong_peer/assets/sotu-base.safetensors"
        bases = {"small": Path(small), "big": big_base(args)}
        entries = plan(labels, protocol, bases, stream)
        plan_file = out.with_name(out.name.replace("-results", "-plan"))
        plan_file.write_text(json.dumps(entries, indent=1))
        started = time.time()
        command = [sys.executable, str(ROOT / "benchmarks/sweep.py"), "--plan", str(plan_file), "--out", str(out)]
        command += ["--steps", str(protocol["steps"]), "--work", args.work]
        subprocess.run([*command, "--release"], check=True)
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        workers = [subprocess.Popen(command, env=env) for _ in range(args.workers)]
        if any(w.wait() for w in workers):
            sys.exit("a worker failed; run the same command again to resume")
        meta = {
            "command": "python benchmarks/equal_memory.py " + " ".join(sys.argv[1:]),
            "machine": machine(args.workers),
            "bases": {pool: {"path": str(p), "sha256": sha256(p)} for pool, p in bases.items()},
            "seconds": time.time() - started,
        }
        # each invocation's meta is kept beside the earlier ones': rows run at different times keep their machine
        meta_file = out.with_name(out.name.replace("-results", "-meta"))
        earlier = read_json(meta_file, [])
        earlier = earlier if isinstance(earlier, list) else [earlier]
        meta_file.write_text(json.dumps([*earlier, meta | {"rows": labels}], indent=1))
    section = table(out, title)
    print(section)
    if args.results_md:
        replace_section(section, ROOT / "RESULTS.md")


TITLES = {
    "eras": "Equal memory: the six SOTU eras at 16,384 experts per layer (issue 24)",
    "long": "Equal memory over a long stream: 59 four-year SOTU slices (issue 24)",
}


def replace_section(section: str, path: Path) -> None:
    """RESULTS.md: the generated part of this protocol's section (from its heading to the first ``### `` or
    ``## `` after it) replaced in place, or appended; hand-written readings below it are kept."""
    old = path.read_text()
    heading = section.splitlines()[0] + "\n"
    if heading not in old:
        path.write_text(old.rstrip("\n") + "\n\n" + section)
        return
    start = old.index(heading)
    ends = [i for i in (old.find("\n## ", start + 1), old.find("\n### ", start + 1)) if i != -1]
    end = min(ends) if ends else len(old)
    path.write_text(old[:start] + section + old[end:])


if __name__ == "__main__":
    main()
