"""Issue 26: dating a text by a run's phase models (``lpeer score RUN FILE --date``) — accuracy against chance.

For each corpus one short run per strategy keeps every phase's model (``keep_checkpoints = "all"``); then every
document of every slice's held-out test split is scored under the model of the phase that trained each slice
(``lifelong_peer.use.phase_scores``, what ``--date`` ranks by), and the guess is the slice whose model fits it best
(lowest bits per byte). Accuracy: the share of documents whose true slice is ranked first. Beside it: chance
(1 / slices), the majority guess (always the slice with the most test documents) and the true slice's mean rank.
Each document is scored on at most ``--doc-tokens`` tokens in the run's evaluation windows (evenly spaced, what
``lpeer score --max-tokens N --date`` does). Because SOTU's test split holds only 7 addresses, the same documents are
also cut into passages of ``--passage`` bytes, each scored whole (more samples, but the passages of one address
are not independent).

The protocol of ``benchmarks/continual.py``, nothing tuned for dating: 80 steps × 16 × 256 bytes per slice; SOTU
from the shipped base (``lifelong_peer/assets/sotu-base.safetensors``), another corpus from a base trained in the
run as ``scripts/train_base.py`` trains one (800 steps on its first slice).

    python benchmarks/dating.py                                   # SOTU: naive and lifelong
    python benchmarks/dating.py --corpus debian --source debian.jsonl --slice eras:1990,2019,2021,2022,2023,2024 \
        --strategies naive --passage 0                            # short documents: no passages
    python benchmarks/dating.py --table                           # only print the table from the JSON

Results: ``benchmarks/results/dating.json`` (one record per corpus and strategy, each document's bits per byte
under every phase's model kept, so the table is rebuilt from the file alone).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from equal_memory import machine  # the CPU, threads and kernel build every result is recorded with

from lifelong_peer.demo import BASE_CHECKPOINT
from lifelong_peer.run import new_run
from lifelong_peer.streams import ingest, ingest_default
from lifelong_peer.train import run_phases
from lifelong_peer.use import phase_scores, split_documents
from lifelong_peer.workspace import Workspace

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks/results/dating.json"
#: the default model and base recipe of scripts/train_base.py, for a corpus without a shipped base
BASE = {"base_steps": 800, "base_data": "first", "base_lr": 3e-3}
MODEL = {"peer_blocks": "all", "peer": {"num_subkeys": 32, "heads": 4, "topk": 8, "dim_key": 64}}


def texts(run, passage: int) -> tuple[list[tuple[np.ndarray, int]], list[int], list[int]]:
    """(packed texts, true slice of each, index of its document): every test document of every trained slice,
    whole (``passage`` 0) or cut into passages of ``passage`` tokens, each with the separator first."""
    if run.stream.tokenizer.name != "bytes":
        raise SystemExit("benchmarks/dating.py reads byte-tokenized streams (a token is a byte)")
    sep = run.stream.tokenizer.separator_id
    out, truth, doc_of = [], [], []
    documents = 0
    for j, name in enumerate(run.config.slices):
        for doc in split_documents(run.slice_data(name).tokens("test"), sep):
            body = doc[1:]
            cuts = range(0, len(body), passage) if passage else [0]
            for start in cuts:
                piece = body[start : start + passage] if passage else body
                out.append((np.concatenate([[sep], piece]).astype(np.int64), len(piece)))  # byte tokens: 1 byte each
                truth.append(j)
                doc_of.append(documents)
            documents += 1
    return out, truth, doc_of


def summary(bpb: np.ndarray, truth: list[int], slices: int) -> dict:
    """Accuracy of the lowest-bpb guess, chance, the majority guess and the true slice's mean rank."""
    truth = np.asarray(truth)
    ranks = (bpb < bpb[np.arange(len(truth)), truth][:, None]).sum(1) + 1
    counts = np.bincount(truth, minlength=slices)
    return {
        "n": len(truth),
        "correct": int((bpb.argmin(1) == truth).sum()),
        "accuracy": float((bpb.argmin(1) == truth).mean()),
        "chance": 1 / slices,
        "majority": float(counts.max() / len(truth)),
        "mean_rank": float(ranks.mean()),
        "per_slice": [float((bpb.argmin(1)[truth == j] == j).mean()) if counts[j] else None for j in range(slices)],
    }


def run_one(corpus: str, strategy: str, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        ws = Workspace.init(Path(tmp) / "ws")
        if corpus == "sotu":
            ingest_default(ws, "stream")
        else:
            ingest(ws, args.source, "stream", slice=args.slice)
        train = {"steps": args.steps, "batch_size": 16, "eval_tokens": 4096, "usage_tokens": 4096}
        train |= {"keep_checkpoints": "all", "seed": args.seed}
        if corpus == "sotu":
            run = new_run(ws, "stream", strategy, train, base=str(BASE_CHECKPOINT), run_id="r")
        else:
            run = new_run(ws, "stream", strategy, train | BASE, MODEL, run_id="r")
        start = time.time()
        run_phases(run)
        trained = time.time() - start
        record = {"corpus": corpus, "strategy": strategy, "seed": args.seed, "steps": args.steps}
        record |= {"slices": run.config.slices, "train_s": round(trained), "passage_bytes": args.passage}
        record |= {"doc_tokens": args.doc_tokens}
        units = [("documents", 0, args.doc_tokens or None)] + (
            [("passages", args.passage, None)] if args.passage else []
        )
        for unit, passage, max_tokens in units:
            items, truth, doc_of = texts(run, passage)
            start = time.time()
            slices, bpb = phase_scores(run, items, max_tokens)
            record[unit] = {"truth": truth, "document": doc_of, "bpb": bpb.round(5).tolist()}
            record[unit] |= {"score_s": round(time.time() - start)} | summary(bpb, truth, len(slices))
        return record


def table(records: list[dict]) -> str:
    head = "| corpus | strategy | unit | n | accuracy | chance | majority guess | mean rank of the true slice |"
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    for r in records:
        for unit in ("documents", "passages")[: 1 + bool(r["passage_bytes"])]:
            s = r[unit]
            label = unit if unit == "documents" else f"passages of {r['passage_bytes']:,} bytes"
            lines.append(
                f"| {r['corpus']} | {r['strategy']} | {label} | {s['n']:,} | {s['accuracy']:.1%} ({s['correct']}/{s['n']})"
                f" | {s['chance']:.1%} | {s['majority']:.1%} | {s['mean_rank']:.2f} of {len(r['slices'])} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", default="sotu", help="sotu (shipped), or a name for --source")
    parser.add_argument("--source", help="another corpus: a file lpeer ingest reads")
    parser.add_argument("--slice", help="with --source: its slicing, e.g. eras:1990,2019,2021")
    parser.add_argument("--strategies", default="naive,lifelong")
    parser.add_argument("--steps", type=int, default=80, help="steps per slice")
    parser.add_argument("--passage", type=int, default=2048, help="bytes per passage (0: documents only)")
    parser.add_argument(
        "--doc-tokens",
        type=int,
        default=4096,
        help="score each document on at most this many tokens, in the run's evaluation windows (0: every token)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--table", action="store_true", help="only print the table from the JSON")
    parser.add_argument("--out", type=Path, default=OUT, help="the results file")
    args = parser.parse_args()
    records = json.loads(args.out.read_text()) if args.out.exists() else []
    if not args.table:
        if args.corpus != "sotu" and not (args.source and args.slice):
            parser.error("a corpus other than sotu needs --source and --slice")
        torch.set_num_threads(1)
        for strategy in args.strategies.split(","):
            record = run_one(args.corpus, strategy, args)
            if args.source:
                record["source_sha256"] = hashlib.sha256(Path(args.source).read_bytes()).hexdigest()
                record["slice"] = args.slice
            record["machine"] = machine(1)
            key = (record["corpus"], record["strategy"], record["seed"])
            records = [r for r in records if (r["corpus"], r["strategy"], r["seed"]) != key] + [record]
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(records, indent=1) + "\n")
            print(table([record]), flush=True)
    print(table(records))


if __name__ == "__main__":
    main()
