"""benchmarks/dating.py (issue 26): the accuracy, baselines and ranks it reports, and the texts it dates."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from conftest import MemorySlice

from lifelong_peer.streams.tokenize import ByteTokenizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # dating.py imports its sibling equal_memory.py
_spec = importlib.util.spec_from_file_location("dating", ROOT / "benchmarks" / "dating.py")
dating = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(dating)


def test_summary_against_a_loop():
    rng = np.random.default_rng(0)
    bpb = rng.random((40, 4))
    truth = rng.integers(0, 3, 40).tolist()  # slice 3 has no documents
    got = dating.summary(bpb, truth, 4)
    correct = sum(int(np.argmin(row)) == t for row, t in zip(bpb, truth, strict=True))
    ranks = [1 + sum(row[j] < row[t] for j in range(4)) for row, t in zip(bpb, truth, strict=True)]
    assert got["correct"] == correct and got["accuracy"] == correct / 40 and got["chance"] == 0.25
    assert got["mean_rank"] == np.mean(ranks) and got["majority"] == max(truth.count(j) for j in range(3)) / 40
    assert got["per_slice"][3] is None and got["per_slice"][0] == np.mean(
        [int(np.argmin(row)) == 0 for row, t in zip(bpb, truth, strict=True) if t == 0]
    )


def test_documents_and_passages_of_the_test_splits():
    docs = {"a": [b"first doc", b"second"], "b": [b"x" * 10]}
    packed = {name: b"".join(b"\x00" + d for d in ds) for name, ds in docs.items()}
    slices = {name: MemorySlice(name, {"test": packed[name]}) for name in docs}
    run = SimpleNamespace(
        stream=SimpleNamespace(tokenizer=ByteTokenizer()),
        config=SimpleNamespace(slices=["a", "b"]),
        slice_data=slices.__getitem__,
    )
    whole, truth, doc_of = dating.texts(run, 0)
    assert [bytes(t[1:].tolist()) for t, _ in whole] == [b"first doc", b"second", b"x" * 10]
    assert all(t[0] == 0 and n == len(t) - 1 for t, n in whole) and truth == [0, 0, 1] and doc_of == [0, 1, 2]
    parts, truth, doc_of = dating.texts(run, 4)
    assert [bytes(t[1:].tolist()) for t, _ in parts] == [
        b"firs",
        b"t do",
        b"c",
        b"seco",
        b"nd",
        b"xxxx",
        b"xxxx",
        b"xx",
    ]
    assert truth == [0, 0, 0, 0, 0, 1, 1, 1] and doc_of == [0, 0, 0, 1, 1, 2, 2, 2]
