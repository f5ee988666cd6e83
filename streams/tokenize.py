"""Tokenizers. The model only needs ``vocab_size``; everything else goes through this interface."""

from __future__ import annotations

from typing import Protocol

import numpy as np


class Tokenizer(Protocol):
    """What the rest of the system needs from a tokenizer (a trained one can be plugged in later)."""

    name: str
    vocab_size: int
    separator_id: int
    """token placed before every document when documents are packed together"""

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


#: the byte tokenizer's document separator: byte 0 (NUL). Valid UTF-8 text never needs it, and ingest
#: refuses text containing it, so a 0 in a packed byte array always means "a new document starts here".
#: Other tokenizers bring their own (``separator_id``: end-of-text for Hugging Face ones).
SEPARATOR_ID = 0


class ByteTokenizer:
    """UTF-8 bytes as tokens: vocab 256, lossless, and bits per byte are simply bits per token."""

    name = "bytes"
    vocab_size = 256
    separator_id = SEPARATOR_ID

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


#: the tokenizers a stream can name in the manifest, besides ``hf:NAME_OR_PATH``
TOKENIZERS = {"bytes": ByteTokenizer}


def get_tokenizer(name: str) -> Tokenizer:
    """``bytes``, or ``hf:NAME_OR_PATH``: a Hugging Face model's own tokenizer (issue 11, needs transformers)."""
    if name.startswith("hf:") and name[3:]:
        from lifelong_peer.streams.hf_tokenizer import HFTokenizer

        return HFTokenizer(name[3:])
    try:
        return TOKENIZERS[name]()
    except KeyError:
        raise ValueError(f"unknown tokenizer {name!r} (known: {', '.join(TOKENIZERS)}, hf:NAME_OR_PATH)") from None


def tokenizer_fingerprint(tokenizer: Tokenizer) -> str:
    """What fixes a tokenizer's output: the name of a built-in one; for a Hugging Face one, a sha256 of
    its full definition (``HFTokenizer.fingerprint``), so changed files under the same name are noticed."""
    fingerprint = getattr(tokenizer, "fingerprint", None)
    return fingerprint() if callable(fingerprint) else tokenizer.name


def encode_array(tokenizer: Tokenizer, text: str) -> np.ndarray:
    """``text`` → (T,) token ids in the smallest unsigned dtype that holds the vocabulary."""
    if isinstance(tokenizer, ByteTokenizer):  # fast path: no Python list of ints
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    return np.asarray(tokenizer.encode(text), dtype=token_dtype(tokenizer.vocab_size))


def token_dtype(vocab_size: int) -> np.dtype:
    for dt in (np.uint8, np.uint16, np.uint32):
        if vocab_size <= np.iinfo(dt).max + 1:
            return np.dtype(dt)
    return np.dtype(np.int64)
