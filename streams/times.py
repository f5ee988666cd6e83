"""Parse document timestamps into one comparable form: integer seconds since 1970-01-01 UTC.

Accepted (issue 3): ISO dates (``2020-03-15``) and datetimes with or without a zone (naive means
UTC), ``YYYY-MM``, bare years, unix epoch seconds, and already-typed values from Parquet / Arrow /
Hugging Face (``datetime``, ``date``, ``numpy.datetime64``). A bare integer of at most four digits
is a year (``1790``); a longer one, or any float, is epoch seconds. Anything else raises
``ValueError`` with a message; callers add the file and line.
"""

from __future__ import annotations

import calendar
import re
from datetime import UTC, date, datetime, timedelta

import numpy as np

_YEAR = re.compile(r"[+-]?\d{1,4}")
_YEAR_MONTH = re.compile(r"(\d{4})-(\d{2})")
_EPOCH = re.compile(r"[+-]?\d+(\.\d+)?")
_EPOCH0 = datetime(1970, 1, 1, tzinfo=UTC)


def parse_time(value: object) -> int:
    """``value`` → seconds since the epoch (UTC); ``ValueError`` if it is not a time we accept."""
    if value is None or (isinstance(value, float) and value != value):
        raise ValueError("missing time")
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
    if isinstance(value, (int, np.integer)):
        return _from_number(str(int(value)))
    if isinstance(value, (float, np.floating)):
        return _checked(int(value))
    if not isinstance(value, str):
        raise ValueError(f"{value!r} ({type(value).__name__}) is not a time")
    text = value.strip()
    if not text:
        raise ValueError("missing time")
    if _EPOCH.fullmatch(text):
        return _from_number(text)
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


def _from_number(text: str) -> int:
    if _YEAR.fullmatch(text):
        year = int(text)
        if not 1 <= year <= 9999:
            raise ValueError(f"year {year} is out of range 1..9999")
        return calendar.timegm((year, 1, 1, 0, 0, 0))
    return _checked(int(float(text)))


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
