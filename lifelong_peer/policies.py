"""Freezing policies as text (``none``, ``all-old``, ``usage:P``, ``tfidf:T``), parsed without torch or faiss:
a run's config checks its policy, and ``lpeer freeze --help`` shows the grammar, before either loads (issue 25).
The index manager applies them (``lifelong_peer.index``, which re-exports these names).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .errors import UserError


@dataclass(frozen=True)
class FreezePolicy:
    """A parsed freezing policy; ``str()`` gives back its text form."""

    kind: Literal["none", "all-old", "usage", "tfidf"]
    """none | all-old | usage (freeze the experts carrying the top P% of old mass) | tfidf (train the top T)."""
    value: float = 0.0
    """P (percent, 0 < P ≤ 100) for usage, T (experts, a positive integer) for tfidf."""

    def __str__(self) -> str:
        if self.kind == "usage":
            return f"usage:{self.value:g}"
        if self.kind == "tfidf":
            return f"tfidf:{int(self.value)}"
        return self.kind


POLICY_HELP = "none | all-old | usage:P (0<P≤100) | tfidf:T (T>0 experts)"


def parse_policy(text: str | FreezePolicy) -> FreezePolicy:
    """Parse ``none``, ``all-old``, ``usage:P`` or ``tfidf:T``; anything else raises ``UserError``."""
    if isinstance(text, FreezePolicy):
        return text
    spec = str(text).strip().lower()
    if spec in ("none", "all-old"):
        return FreezePolicy(spec)  # type: ignore[arg-type]
    kind, _, arg = spec.partition(":")
    try:
        if kind == "usage":
            p = float(arg)
            if 0 < p <= 100:
                return FreezePolicy("usage", p)
        elif kind == "tfidf":
            t = int(arg)
            if t > 0:
                return FreezePolicy("tfidf", t)
    except ValueError:
        pass
    raise UserError(f"invalid freezing policy {text!r}; expected {POLICY_HELP}")
