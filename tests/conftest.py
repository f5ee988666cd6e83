"""Shared test fixtures: a tiny in-memory stream with the same interface as ingested ones."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import settings
from peer_helpers import toy_workspace

from lifelong_peer import kernels
from lifelong_peer.streams.tokenize import ByteTokenizer

# No per-example time limit for property tests: the test machines' cores are shared, and a timing
# assertion in a unit test only measures the neighbours (speed lives in benchmarks/)
settings.register_profile("shared-machine", deadline=None)
settings.load_profile("shared-machine")


@pytest.fixture(scope="session", autouse=True)
def native_kernels_built_first():
    """PEER layers run the native kernels by default: build them (about a minute, once per machine)
    before any test, rather than inside whichever test — perhaps one with several processes — comes first."""
    kernels.load()


TINY_MODEL = {"dim": 32, "layers": 1, "heads": 2, "context": 32, "peer": {"num_subkeys": 4, "heads": 2, "topk": 2}}
TINY_TRAIN = {"steps": 2, "batch_size": 2, "eval_tokens": 128, "usage_tokens": 128, "warmup": 1}


@pytest.fixture(scope="session")
def tiny_workspace(tmp_path_factory):
    """A workspace ``ws`` with stream ``toy`` (two yearly slices, from ``docs.jsonl`` beside it) and the
    finished run ``r`` trained on it; returns the folder holding both."""
    from lifelong_peer.run import new_run
    from lifelong_peer.train import run_phases

    root = tmp_path_factory.mktemp("tiny")
    ws = toy_workspace(root)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    run_phases(new_run(ws, "toy", "naive", TINY_TRAIN, TINY_MODEL, run_id="r"))
    torch.set_num_threads(threads)
    return root


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and the test machine's cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class MemorySlice:
    def __init__(self, name: str, splits: dict[str, bytes]):
        self.name = name
        self.start = self.end = name
        self.documents = 1
        self._splits = {k: np.frombuffer(v, dtype=np.uint8) for k, v in splits.items()}

    def tokens(self, split: str) -> np.ndarray:
        return self._splits[split]

    def num_bytes(self, split: str) -> int:
        return len(self._splits[split])


class MemoryStream:
    """Slices whose text differs in style, so training on one drifts away from the others."""

    def __init__(self, name="toy", slices=("a", "b", "c"), size=3000, seed=0):
        self.name = name
        self.tokenizer = ByteTokenizer()
        rng = np.random.default_rng(seed)
        vocab = [b"the ", b"and ", b"of ", b"peer ", b"expert ", b"stream ", b"slice ", b"time "]
        self.slices = []
        for i, s in enumerate(slices):
            words = vocab[i % len(vocab) :] + vocab[: i % len(vocab)]
            weights = np.linspace(3, 1, len(words)) ** (i + 1)
            weights /= weights.sum()

            def text(n, words=words, weights=weights):
                return b"".join(words[k] for k in rng.choice(len(words), n, p=weights))[:n]

            self.slices.append(
                MemorySlice(s, {"train": text(size), "validation": text(size // 4), "test": text(size // 4)})
            )

    def slice(self, name):
        return next(s for s in self.slices if s.name == name)


@pytest.fixture
def memory_stream():
    return MemoryStream()
