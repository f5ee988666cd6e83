"""Parse document timestamps into one comparable form: integer seconds since 1970-01-01 UTC.

Accepted (issue 3): ISO dates (``2020-03-15``) and datetimes with or without a zone (naive means
UTC), ``YYYY-MM``, bare numbers, and already-typed values from Parquet / Arrow / Hugging Face
(``datetime``, ``date``, ``numpy.datetime64``). Anything else raises ``ValueError`` with a message;
callers add the file and line.

A bare number (``12``, ``1790``, ``1584230400``, ``2001.0``) is ambiguous, so its unit is a choice
(issue 17, ``--time-unit``): ``year``, ``s`` (epoch seconds) or ``ms`` (epoch milliseconds). The
default ``auto`` reads it only where the reading is plausible: a whole number in ``PLAUSIBLE_YEARS``
is a year, a number in ``PLAUSIBLE_SECONDS`` is epoch seconds, and anything else (``"time": 12``,
which once became the year 12) is refused with a message naming the value and the option.

Dates follow the same rule (issue 25: ``3000-01-01`` and ``0015-03-01`` became slices "3000" and
"0015" with only a small-slice warning): under ``auto`` a date, datetime or ``YYYY-MM`` whose year lies
outside ``PLAUSIBLE_YEARS`` is refused, and an explicit unit — the same override — accepts years 1..9999.
"""

from __future__ import annotations

import calendar
import math
import re
from datetime import UTC, date, datetime, timedelta

import numpy as np

_YEAR_MONTH = re.compile(r"(\d{4})-(\d{2})")
_EPOCH = re.compile(r"[+-]?\d+(\.\d+)?")
_EPOCH0 = datetime(1970, 1, 1, tzinfo=UTC)

TIME_UNITS = ("auto", "year", "s", "ms")
#: bare numbers ``auto`` reads as years / as epoch seconds (1973-03-03 .. 2100-01-01); the ranges
#: do not overlap, and both exclude the small numbers a month, day or index column holds
PLAUSIBLE_YEARS = (1000, 2100)
PLAUSIBLE_SECONDS = (100_000_000, 4_102_444_800)


def parse_time(value: object, unit: str = "auto") -> int:
    """``value`` → seconds since the epoch (UTC); ``ValueError`` if it is not a time we accept.

    ``unit`` says how a bare number is read: auto | year | s | ms (module docstring).
    """
    if value is None or (isinstance(value, float) and value != value):
        raise ValueError("missing time")
    if isinstance(value, (int, np.integer, float, np.floating)) and not isinstance(value, bool):
        return _from_number(value, unit)
    if isinstance(value, str) and _EPOCH.fullmatch(text := value.strip()):
        return _from_number(int(text) if text.lstrip("+-").isdigit() else float(text), unit)
    seconds = _from_date(value)
    year = to_datetime(seconds).year
    if unit == "auto" and not PLAUSIBLE_YEARS[0] <= year <= PLAUSIBLE_YEARS[1]:
        shown = repr(value) if isinstance(value, str) else str(value)
        raise ValueError(
            f"{shown} lies in the year {year}, outside the plausible years {PLAUSIBLE_YEARS[0]}–{PLAUSIBLE_YEARS[1]} "
            "(--time-unit year accepts any year)"
        )
    return seconds


def _from_date(value: object) -> int:
    """A date, datetime or ``YYYY-MM`` (text or typed) → epoch seconds; ``ValueError`` if it is none."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a time")
    if isinstance(value, np.datetime64):
        if np.isnat(value):
            raise ValueError("missing time")
        return _checked(int(value.astype("datetime64[s]").astype(np.int64)))
    if isinstance(value, datetime):
        return _from_datetime(value)
    if isinstance(value, date):
        return calendar.timegm((value.year, value.month, value.day, 0, 0, 0))
    if not isinstance(value, str):
        raise ValueError(f"{value!r} ({type(value).__name__}) is not a time")
    text = value.strip()
    if not text:
        raise ValueError("missing time")
    m = _YEAR_MONTH.fullmatch(text)
    if m:
        year, month = int(m.group(1)), int(m.group(2))
        if not 1 <= month <= 12:
            raise ValueError(f"{value!r} is not a valid year-month")
        return calendar.timegm((year, month, 1, 0, 0, 0))
    try:
        parsed = datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith(("Z", "z")) else text)
    except ValueError:
        raise ValueError(
            f"{value!r} is not a time (expected an ISO date/datetime, YYYY-MM, a year, or epoch seconds)"
        ) from None
    return _from_datetime(parsed)


def _from_number(number: int | float, unit: str) -> int:
    """A bare number → epoch seconds, read in ``unit`` (auto reads only plausible years and seconds)."""
    if unit not in TIME_UNITS:
        raise ValueError(f"unknown time unit {unit!r} (use {', '.join(TIME_UNITS)})")
    if isinstance(number, (float, np.floating)) and not math.isfinite(number):
        raise ValueError(f"{number} is not a time")
    whole = isinstance(number, (int, np.integer)) or float(number).is_integer()
    if unit == "auto":
        if whole and PLAUSIBLE_YEARS[0] <= number <= PLAUSIBLE_YEARS[1]:
            unit = "year"
        elif PLAUSIBLE_SECONDS[0] <= number <= PLAUSIBLE_SECONDS[1]:
            unit = "s"
        else:
            ms = 1000 * PLAUSIBLE_SECONDS[0] <= number <= 1000 * PLAUSIBLE_SECONDS[1]
            advice = "it looks like epoch milliseconds: pass --time-unit ms" if ms else "pass --time-unit year, s or ms"
            raise ValueError(
                f"bare number {_show(number)} is neither a plausible year ({PLAUSIBLE_YEARS[0]}–{PLAUSIBLE_YEARS[1]}) "
                f"nor plausible epoch seconds (1973–2100); {advice} to say how to read it"
            )
    if unit == "year":
        if not whole:
            raise ValueError(f"{_show(number)} is not a whole year (--time-unit year)")
        year = int(number)
        if not 1 <= year <= 9999:
            raise ValueError(f"year {year} is out of range 1..9999")
        return calendar.timegm((year, 1, 1, 0, 0, 0))
    if unit == "ms":
        number = number // 1000 if isinstance(number, (int, np.integer)) else number / 1000
    return _checked(int(number))


def _show(number: int | float) -> str:
    text = str(int(number)) if isinstance(number, (int, np.integer)) else repr(float(number))
    return text if len(text) <= 24 else text[:20] + "…"


#: epoch seconds of 0001-01-01 and 9999-12-31T23:59:59 (what ``datetime`` can format)
_MIN_SECONDS, _MAX_SECONDS = -62_135_596_800, 253_402_300_799


def _checked(seconds: int) -> int:
    """Epoch seconds outside years 1..9999 are refused here, not by a crash when formatting (issue 10 fuzz)."""
    if not _MIN_SECONDS <= seconds <= _MAX_SECONDS:
        raise ValueError(f"epoch seconds {seconds} lie outside the years 1..9999")
    return seconds


def _from_datetime(value: datetime) -> int:
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return _checked((value - _EPOCH0) // timedelta(seconds=1))


def to_datetime(seconds: int) -> datetime:
    return _EPOCH0 + timedelta(seconds=int(seconds))


def format_time(seconds: int) -> str:
    """ISO text: a bare date when the time is midnight UTC, else a ``...Z`` datetime."""
    t = to_datetime(seconds)
    if (t.hour, t.minute, t.second) == (0, 0, 0):
        return t.date().isoformat()
    return t.replace(tzinfo=None).isoformat() + "Z"
