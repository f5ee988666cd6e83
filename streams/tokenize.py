"""Tokenizers. The model only needs ``vocab_size``; everything else goes through this interface."""

from __future__ import annotations

from typing import Protocol


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
