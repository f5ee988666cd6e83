"""Sampling text from a model (issue 26: see what each era's model learnt) — byte-level or attached, one loop.

A prompt is a document start: the stream's separator, then the prompt's tokens, as documents are packed
(``streams.packing``). Each step runs the model on the last ``context`` tokens (no cache: these models are small),
divides the last position's logits by the temperature, keeps the nucleus (top-p) and draws from a CPU generator
seeded by ``seed``, so the same settings draw the same text. Sampling stops at ``max_bytes`` of new text or at the
separator (the model ended the document).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import UserError


@dataclass
class SampleConfig:
    """How ``lpeer generate`` samples."""

    temperature: float = 0.8
    """Softmax temperature: lower is more conservative; 0 always takes the most likely token (greedy)."""
    top_p: float = 0.95
    """Nucleus sampling: draw from the smallest set of tokens whose probability reaches this (1: all tokens)."""
    max_bytes: int = 200
    """Stop after this many bytes of new text (UTF-8)."""
    seed: int = 0
    """Seed of the draws: the same seed, model and prompt give the same text."""

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise UserError(f"--temperature must be ≥ 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.max_bytes <= 0:
            raise UserError(f"--max-bytes must be positive, got {self.max_bytes}")


def top_p_filter(logits: Tensor, top_p: float) -> Tensor:
    """logits (V,) → the same with -inf outside the nucleus: the most likely tokens, in order, up to and including
    the first whose cumulative probability reaches ``top_p`` (at least one token)."""
    if top_p >= 1:
        return logits
    probs, order = torch.sort(torch.softmax(logits, dim=-1), descending=True)
    before = torch.cumsum(probs, dim=-1) - probs  # mass of the tokens ranked above each one
    drop = order[before >= top_p]
    return logits.index_fill(0, drop, float("-inf"))


def next_token(logits: Tensor, cfg: SampleConfig, generator: torch.Generator) -> int:
    """One token from the last position's logits (V,) (float32, CPU)."""
    if cfg.temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(top_p_filter(logits / cfg.temperature, cfg.top_p), dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def text_bytes(tokenizer, ids: list[int]) -> bytes:
    """The UTF-8 bytes of generated ``ids``: the ids themselves for the byte tokenizer (a character cut in the
    middle stays cut), else the decoded text's."""
    if tokenizer.name == "bytes":
        return bytes(ids)
    return tokenizer.decode(ids).encode("utf-8")


@torch.no_grad()
def generate(model, tokenizer, prompt: str, cfg: SampleConfig, vocab: int | None = None) -> dict:
    """Continue ``prompt`` with ``model`` (a ``PEERModel``, whose ``config.context`` bounds what it sees).

    ``vocab``: tokens that can be drawn (default: the tokenizer's; a Hugging Face model's output layer is often
    padded past it). Returns ``{"prompt", "text" (the new text), "tokens" (new ids), "bytes", "stopped":
    "max_bytes" | "end of document"}``.
    """
    sep = tokenizer.separator_id
    ids = [sep, *tokenizer.encode(prompt)]
    vocab = vocab or tokenizer.vocab_size
    context = model.config.context
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(cfg.seed)
    was_training = model.training
    model.eval()
    new: list[int] = []
    stopped = "max_bytes"
    try:
        while len(text_bytes(tokenizer, new)) < cfg.max_bytes:
            window = torch.tensor([ids[-context:]], device=device)
            logits, _ = model(window)
            token = next_token(logits[0, -1, :vocab].float().cpu(), cfg, generator)
            if token == sep:
                stopped = "end of document"
                break
            ids.append(token)
            new.append(token)
    finally:
        model.train(was_training)
    raw = text_bytes(tokenizer, new)[: cfg.max_bytes]
    return {
        "prompt": prompt,
        "text": raw.decode("utf-8", errors="replace"),
        "tokens": new,
        "bytes": len(raw),
        "stopped": stopped,
    }


__all__ = ["SampleConfig", "generate", "next_token", "text_bytes", "top_p_filter"]
