"""Cut documents into named time slices, and each slice into train / validation / test.

Slicing specs (issue 3): ``year`` | ``quarter`` | ``month`` (calendar periods in UTC);
``eras:B1,B2,...`` (left-closed ``[B_i, B_{i+1})``, the last era open-ended; a document exactly on a
boundary belongs to the later era; one before ``B1`` is a bad record); ``quantiles:K`` (K slices of
equal text bytes in time order); ``field:NAME`` (one slice per value of a categorical field, in
first-seen order). Everything here works on per-document arrays, so it sees all documents at once
without holding any text.

Splits: a document goes to a split by a hash of its id — never by position — so it never straddles
splits and a re-ingest gives the same splits. In a slice of at least 3 documents whose hash left a
split empty, the document nearest that split's hash interval moves there (deterministic), so every
slice the trainer sees has validation and test text.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from itertools import pairwise

import numpy as np

from lifelong_peer.errors import UserError

from .times import format_time, parse_time

SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class SliceSpec:
    """A parsed ``--slice`` value."""

    kind: str
    """year | quarter | month | eras | quantiles | field"""
    boundaries: tuple[str, ...] = ()
    """eras: the boundary times as written (years or ISO dates), increasing"""
    k: int = 0
    """quantiles: number of slices"""
    field: str = ""
    """field: the categorical column"""

    @classmethod
    def parse(cls, spec: str) -> SliceSpec:
        kind, _, arg = spec.strip().partition(":")
        if kind in ("year", "quarter", "month") and not arg:
            return cls(kind)
        if kind == "eras" and arg:
            bounds = tuple(b.strip() for b in arg.split(",") if b.strip())
            try:
                times = [boundary_time(b) for b in bounds]
            except ValueError as e:
                raise UserError(f"--slice {spec}: {e}") from None
            if any(a >= b for a, b in pairwise(times)):
                raise UserError(f"--slice {spec}: era boundaries must be strictly increasing")
            return cls(kind, boundaries=bounds)
        if kind == "quantiles" and arg.isdigit() and int(arg) >= 1:
            return cls(kind, k=int(arg))
        if kind == "field" and arg:
            return cls(kind, field=arg)
        raise UserError(
            f"--slice {spec!r} is not valid: use year, quarter, month, eras:1790,1840,..., quantiles:K or field:NAME"
        )

    def __str__(self) -> str:
        arg = {"eras": ",".join(self.boundaries), "quantiles": str(self.k), "field": self.field}.get(self.kind)
        return f"{self.kind}:{arg}" if arg else self.kind


def boundary_time(boundary: str) -> int:
    """An era boundary as written → epoch seconds: up to four digits is a year (``eras:800,1200``
    whatever ``--time-unit`` says of the data), anything else is read like a document's time."""
    return parse_time(boundary, "year" if _is_year(boundary) else "auto")


def _is_year(boundary: str) -> bool:
    return boundary.isdigit() and len(boundary) <= 4


@dataclass
class SliceDef:
    name: str
    members: np.ndarray
    """indices of the documents in this slice, in document (source) order"""


def assign_slices(
    spec: SliceSpec,
    times: np.ndarray,
    nbytes: np.ndarray,
    categories: list[str] | None = None,
    category_of: np.ndarray | None = None,
) -> tuple[list[SliceDef], np.ndarray, list[str]]:
    """Documents → slices.

    Args: ``times`` (N,) int64 epoch seconds; ``nbytes`` (N,) text bytes; for ``field`` slicing,
    ``categories`` (C,) the values in first-seen order and ``category_of`` (N,) indices into them.
    Returns (non-empty slices in time order, ``slice_of`` (N,) int64 with -1 for a document
    outside every slice, warnings).
    """
    n = len(times)
    warnings: list[str] = []
    if spec.kind in ("year", "quarter", "month"):
        keys, label_of = _calendar_keys(spec.kind, times)
        uniq, slice_of = np.unique(keys, return_inverse=True)
        labels = [label_of(int(k)) for k in uniq]
    elif spec.kind == "eras":
        bounds = np.array([boundary_time(b) for b in spec.boundaries], dtype=np.int64)
        slice_of = np.searchsorted(bounds, times, side="right") - 1
        labels = _era_names(spec.boundaries, times, slice_of)
    elif spec.kind == "quantiles":
        order = np.argsort(times, kind="stable")
        before = np.cumsum(nbytes[order]) - nbytes[order]
        total = max(int(nbytes.sum()), 1)
        q = np.minimum(before * spec.k // total, spec.k - 1)
        slice_of = np.empty(n, dtype=np.int64)
        slice_of[order] = q
        labels = [f"q{i + 1}" for i in range(spec.k)]
    else:  # field
        slice_of = np.asarray(category_of, dtype=np.int64)
        labels = list(categories or [])
    slices, remap = [], np.full(len(labels), -1, dtype=np.int64)
    for i, label in enumerate(labels):
        members = np.flatnonzero(slice_of == i)
        if len(members) == 0:
            warnings.append(f"slice {label!r} has no documents; skipped")
            continue
        remap[i] = len(slices)  # a slice's index becomes its position among the non-empty ones
        slices.append(SliceDef(label, members))
    slice_of = np.where(slice_of >= 0, remap[np.clip(slice_of, 0, max(len(labels) - 1, 0))], -1)
    return slices, slice_of, warnings


def _calendar_keys(kind: str, times: np.ndarray):
    """(N,) epoch seconds → (N,) sortable period keys, and key → slice name."""
    t = np.asarray(times, dtype=np.int64).astype("datetime64[s]")
    months = t.astype("datetime64[M]").astype(np.int64) + 1970 * 12  # months since year 0
    if kind == "year":
        return months // 12, lambda k: f"{k:04d}"
    if kind == "quarter":
        return months // 3, lambda k: f"{k // 4:04d}-Q{k % 4 + 1}"
    return months, lambda k: f"{k // 12:04d}-{k % 12 + 1:02d}"


def _era_names(boundaries: tuple[str, ...], times: np.ndarray, slice_of: np.ndarray) -> list[str]:
    """``1790-1839`` when boundaries are years (the last era ends at its latest document's year)."""
    if all(_is_year(b) for b in boundaries):
        names = [f"{a}-{int(b) - 1}" for a, b in pairwise(boundaries)]
        last = times[slice_of == len(boundaries) - 1]
        end = format_time(int(last.max()))[:4] if len(last) else ""
        return [*names, f"{boundaries[-1]}-{end}"]
    return [f"{a}..{b}" for a, b in pairwise(boundaries)] + [f"{boundaries[-1]}.."]


def hash_unit(doc_id: str) -> float:
    """A document id → a stable number in [0, 1) (SHA-256, so no salt/PYTHONHASHSEED dependence)."""
    return int.from_bytes(hashlib.sha256(doc_id.encode("utf-8")).digest()[:8], "big") / 2.0**64


def assign_splits(u: np.ndarray, slices: list[SliceDef], fractions: tuple[float, float, float]) -> np.ndarray:
    """(N,) hash units → (N,) int8 split index (0 train, 1 validation, 2 test)."""
    f_train, f_val, _ = fractions
    split = np.where(u < f_train, 0, np.where(u < f_train + f_val, 1, 2)).astype(np.int8)
    for s in slices:
        members = s.members
        if len(members) < 3:
            continue
        for target in (1, 2, 0):
            sm = split[members]
            if (sm == target).any():
                continue
            donor = np.bincount(sm, minlength=3).argmax()
            candidates = members[sm == donor]
            # the donor document whose hash is nearest the target's interval
            pick = candidates[np.argmin(u[candidates])] if target < donor else candidates[np.argmax(u[candidates])]
            split[pick] = target
    return split
