"""Published results (issues 6 and 16): every strategy on the SOTU headroom protocol, 3 seeds → RESULTS.md.

The protocol (issue 16): every strategy continues ONE shared base — ``lifelong_peer/assets/sotu-base.safetensors``,
trained 800 steps on the first era's training split only (``scripts/train_base.py``), so the later
eras are new to it — for the same 80 steps (× 16 × 256 bytes) per era. Seeds vary the data order and
the initialisation of grown experts; the base is the same for every seed. Choices were made on the
validation splits (``benchmarks/sweep.py``); this reports the test splits: final average, gain over the
base, share of joint's gain, forgetting, newest era, mean ± std over seeds, and the issue's targets.

    python benchmarks/continual.py                       # every strategy × 3 seeds (2 worker processes)
    python benchmarks/continual.py --table               # only rebuild the table from the JSON
    python benchmarks/continual.py --stream debian --source debian.jsonl --slice eras:1990,2019,... \
        --base debian-base.safetensors                   # the same protocol on another dated corpus

Each finished run is appended to ``benchmarks/results/continual16-<stream>-results.json`` (resumable,
``benchmarks/sweep.py`` does the work); the table is built from that file alone.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from lifelong_peer import system
from lifelong_peer.metrics import RunResults
from lifelong_peer.report import compare_runs, markdown

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sweep import COMMON, train_fields  # the protocol's per-run settings, in one place

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks/results"
#: label → (strategy preset, overrides): the rows of the table, in order
STRATEGIES = {
    "joint": ("joint", {}),
    "naive": ("naive", {}),
    "replay": ("replay", {}),
    "replay-40": ("replay", {"replay": 0.4}),  # replay at lifelong's share: what the experts add to it
    "ewc": ("ewc", {}),
    "smf": ("smf", {}),
    # the lifelong rows of this protocol are the earlier preset (issue 16), now lifelong-grow; without the
    # 16,384-expert budget it has now, which six eras never reach past (RESULTS.md, "Equal memory")
    "lifelong": ("lifelong-grow", {"max_experts": 0}),
    "lifelong-noreplay": ("lifelong-grow", {"max_experts": 0, "replay": 0.0}),  # growth + freezing without replay
    "dense": ("dense", {}),
}
DEFAULT = "joint,naive,replay,replay-40,ewc,smf,lifelong,lifelong-noreplay"


def plan(labels: list[str], seeds: int, args) -> list[dict]:
    entries = []
    for label in labels:
        strategy, overrides = STRATEGIES[label]
        entry = {"name": label, "strategy": strategy, "overrides": overrides, "seeds": list(range(seeds))}
        if args.stream != "sotu":
            entry |= {"stream": args.stream, "source": str(Path(args.source).resolve()), "slice": args.slice}
        if label == "dense":
            entry["base"] = args.dense_base
        entries.append(entry)
    return entries


def targets(comparison: dict, records: list[dict]) -> list[str]:
    """Issue 16's targets for lifelong, checked on the test table (means over seeds)."""
    mean = {
        s["strategy"]: {k: v["mean"] for k, v in s.items() if isinstance(v, dict)} for s in comparison["strategies"]
    }
    if not {"lifelong", "naive", "replay"} <= set(mean):
        return []
    lf, nv = mean["lifelong"], mean["naive"]
    own = [min(r["test"]["own_gain"]) for r in records if r["name"] == "lifelong"]
    rivals = [name for name in ("naive", "replay", "replay-40") if name in mean]
    best = min(mean[name]["final_avg_bpb"] for name in rivals)
    lines = [
        f"final average below {', '.join(rivals)}: {lf['final_avg_bpb']:.4f} vs "
        + " / ".join(f"{mean[name]['final_avg_bpb']:.4f}" for name in rivals)
        + f" — {'holds' if lf['final_avg_bpb'] < best else 'missed'}",
    ]
    if lf.get("share_of_joint") is not None:
        share = lf["share_of_joint"]
        lines.append(f"≥ 85% of joint's gain over the base: {share:.0%} — {'holds' if share >= 0.85 else 'missed'}")
    ratio = lf["avg_forgetting_bpb"] / nv["avg_forgetting_bpb"]
    lines.append(
        f"forgetting ≤ 25% of naive's: {lf['avg_forgetting_bpb']:+.4f} vs {nv['avg_forgetting_bpb']:+.4f} = {ratio:.0%}"
        f" — {'holds' if ratio <= 0.25 else 'missed'}"
    )
    lines.append(
        f"every phase lowers its own era's loss (smallest drop over eras and seeds): {min(own):+.4f} bpb"
        f" — {'holds' if min(own) > 0 else 'missed'}"
    )
    newest = lf["newest_bpb"] / nv["newest_bpb"] - 1
    lines.append(
        f"newest era within 3% of naive's: {lf['newest_bpb']:.4f} vs {nv['newest_bpb']:.4f} = {newest:+.1%}"
        f" — {'holds' if newest <= 0.03 else 'missed'}"
    )
    return lines


def table(out: Path, title: str) -> str:
    """The Markdown section of one results file: per-strategy and per-run tables and the targets."""
    records = [r for r in json.loads(out.read_text()) if r["name"] in STRATEGIES]
    order = {label: i for i, label in enumerate(STRATEGIES)}
    records.sort(key=lambda r: (order.get(r["name"], 99), r["seed"]))
    runs = []
    for r in records:
        results = RunResults.from_dict(r["results"], f"{out}: {r['name']} seed {r['seed']}")
        results.strategy, results.run = r["name"], f"{r['name']}-s{r['seed']}"  # label lifelong-noreplay apart
        runs.append(results)
    comparison = compare_runs(runs, "test")
    (out.with_name(out.name.replace("-results", "-table"))).write_text(json.dumps(comparison, indent=1))
    lines = [f"## {title}", "", markdown(comparison)]
    checks = targets(comparison, records)
    if checks:
        lines += ["Issue 16's targets for `lifelong` (test split, means over seeds):", ""]
        lines += [f"- {c}" for c in checks]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--strategies", default=DEFAULT, help=f"labels among {', '.join(STRATEGIES)}")
    parser.add_argument("--workers", type=int, default=2, help="runs at once (one thread each)")
    parser.add_argument("--stream", default="sotu")
    parser.add_argument("--source", default=None, help="with --stream: a file lpeer ingest reads")
    parser.add_argument("--slice", default=None, help="with --stream: its slicing")
    parser.add_argument("--base", default=str(ROOT / "lifelong_peer/assets/sotu-base.safetensors"))
    parser.add_argument("--dense-base", default=None, help="base of the dense strategy (same recipe, dense FFNs)")
    parser.add_argument("--reuse", default=None, help="a sweep results file whose identical runs count here")
    parser.add_argument("--table", action="store_true", help="only rebuild the table from the results file")
    parser.add_argument("--results-md", action="store_true", help="also write the table into RESULTS.md")
    parser.add_argument("--work", default="/tmp/lpeer-continual")
    args = parser.parse_args()
    out = RESULTS / f"continual16-{args.stream}-results.json"
    entries = plan(args.strategies.split(","), args.seeds, args)
    drop_stale(out, entries)
    if args.reuse:
        reuse(Path(args.reuse), out, entries, args.base)
    if not args.table:
        plan_file = out.with_name(out.name.replace("-results", "-plan"))
        plan_file.write_text(json.dumps(entries, indent=1))
        started = time.time()
        command = [sys.executable, str(ROOT / "benchmarks/sweep.py"), "--plan", str(plan_file), "--out", str(out)]
        command += ["--base", args.base, "--work", args.work]
        subprocess.run([*command, "--release"], check=True)
        workers = [subprocess.Popen(command) for _ in range(args.workers)]
        if any(w.wait() for w in workers):
            sys.exit("a worker failed; run the same command again to resume")
        machine = system.machine() | {"threads_per_run": 1, "runs_at_once": args.workers}  # issue 25
        meta = out.with_name(out.name.replace("-results", "-meta"))
        meta.write_text(
            json.dumps(
                {
                    "command": "python benchmarks/continual.py " + " ".join(sys.argv[1:]),
                    "machine": machine,
                    "seconds": time.time() - started,
                },
                indent=1,
            )
        )
    section = table(out, f"Strategies on {args.stream}")
    print(section)
    if args.results_md:
        if args.stream == "sotu":
            write_results_md(section, out)
        else:
            replace_section(section, args.stream)


def replace_section(section: str, stream: str, path: Path = ROOT / "RESULTS.md") -> None:
    """RESULTS.md: the section of another stream's table, replaced in place (or appended, after the
    sections ``write_results_md`` rewrites); everything else, the hand-written readings included, is kept."""
    old = path.read_text()
    heading = f"## Strategies on {stream}\n"
    if heading in old:
        start = old.index(heading)
        end = old.find("\n## ", start + 1)
        new = old[:start] + section + (old[end:] if end != -1 else "")
    else:
        new = old.rstrip("\n") + "\n\n" + section
    path.write_text(new)


def write_results_md(section: str, out: Path, path: Path = ROOT / "RESULTS.md") -> None:
    """RESULTS.md: the title, this protocol and its section first, rewritten; every later section (the
    hand-written readings, the paper's claims, other streams) is kept."""
    old = path.read_text() if path.exists() else ""
    heading = "## Strategies on sotu\n"
    start = old.index(heading) + 1 if heading in old else 0
    end = old.find("\n## ", start)
    kept = old[end + 1 :] if end != -1 else ""
    records = json.loads(out.read_text())
    walls = sorted({round(r["wall_s"]) for r in records})
    head = [
        "# Results: continual learning on the State of the Union eras",
        "",
        "Protocol (issue 16, `python benchmarks/continual.py`): every strategy continues ONE shared base,",
        "`lifelong_peer/assets/sotu-base.safetensors`, trained 800 steps on the first era's (1790–1839)",
        "training split only, so the five later eras are new to it; then 80 steps × 16 × 256 bytes per era,",
        "the same tokens for every strategy. Seeds vary data order and the initialisation of grown experts;",
        "the base is the same for every seed. Bits per byte on the eras' **test** splits (choices were made",
        "on the validation splits), token-weighted where averaged over eras. gain = the base's average −",
        "the final average; share = gain / joint's gain; forgetting: mean over earlier eras of",
        "(final − best), positive = forgot. The `base` row is the untouched base (no training).",
        f"Every number comes from `benchmarks/results/{out.name}` (one record per run, with its whole",
        f"results.json); runs took {walls[0]}–{walls[-1]} s each on one thread of a shared 2-core machine.",
        "",
    ]
    path.write_text("\n".join(head) + "\n" + section + "\n" + kept)


def resolved(strategy: str, overrides: dict) -> dict:
    """The TrainConfig a run of ``strategy`` with ``overrides`` trains with (the seed aside)."""
    from lifelong_peer.config import resolve_config

    _, train = resolve_config(strategy, {**COMMON, **overrides})
    return train_fields(train)


def drop_stale(out: Path, entries: list[dict]) -> None:
    """Forget the records of ``out`` that no longer train as their plan entry does (a preset changed
    since they ran), so that they run again. Records without their TrainConfig cannot be checked."""
    if not out.exists():
        return
    want = {e["name"]: resolved(e["strategy"], e["overrides"]) for e in entries}
    defaults = resolved("naive", {})  # a field a record lacks is newer than it: it ran as that field's default
    keep = []
    for r in json.loads(out.read_text()):
        had = {**defaults, **r.get("train", {})}
        if r["name"] in want and "train" in r and had != want[r["name"]]:
            changed = sorted(k for k in want[r["name"]] if had.get(k) != want[r["name"]][k])
            print(f"{out.name}: {r['name']} seed {r['seed']} is stale ({', '.join(changed)} changed); it runs again")
            continue
        keep.append(r)
    out.write_text(json.dumps(keep, indent=1))


def reuse(sweep: Path, out: Path, entries: list[dict], base: str) -> None:
    """Count the runs of a sweep that train exactly as a plan entry does (same resolved TrainConfig —
    presets as they are now — same base, same seed) as that entry's runs; each keeps its record."""
    have = json.loads(out.read_text()) if out.exists() else []
    done = {(r["name"], r["seed"]) for r in have}
    for record in json.loads(sweep.read_text()):
        for e in entries:
            same = Path(record["base"]).resolve() == Path(e.get("base", base)).resolve()
            same = same and resolved(record["strategy"], record["overrides"]) == resolved(e["strategy"], e["overrides"])
            if same and record["seed"] in e["seeds"] and (e["name"], record["seed"]) not in done:
                have.append(record | {"name": e["name"], "reused_from": f"{sweep.name}: {record['name']}"})
                done.add((e["name"], record["seed"]))
    out.write_text(json.dumps(have, indent=1))


if __name__ == "__main__":
    main()
