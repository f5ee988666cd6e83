"""Tokenizers. The model only needs ``vocab_size``; everything else goes through this interface."""

from __future__ import annotations

from typing import Protocol

import numpy as np


class Tokenizer(Protocol):
    """What the rest of the system needs from a tokenizer (a trained one can be plugged in later)."""

    name: str
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens: vocab 256, lossless, and bits per byte are simply bits per token."""

    name = "bytes"
    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


#: the tokenizers a stream can name in the manifest
TOKENIZERS = {"bytes": ByteTokenizer}

#: the token placed before every document when documents are packed together. For the byte
#: tokenizer it is byte 0 (NUL): valid UTF-8 text never needs it, and ingest refuses text containing
#: it, so a 0 in a packed array always means "a new document starts here".
SEPARATOR_ID = 0


def get_tokenizer(name: str) -> Tokenizer:
    try:
        return TOKENIZERS[name]()
    except KeyError:
        raise ValueError(f"unknown tokenizer {name!r} (known: {', '.join(TOKENIZERS)})") from None


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
