"""Streams: time parsing, sources round trips, slicing boundaries, splits, packing, fingerprints, bad input."""

from __future__ import annotations

import csv
import json
import random
from datetime import UTC, date, datetime, timedelta
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lifelong_peer.errors import UserError
from lifelong_peer.streams import ingest, list_streams, open_stream
from lifelong_peer.streams.slicing import SliceSpec, assign_slices, assign_splits, hash_unit
from lifelong_peer.streams.times import format_time, parse_time, to_datetime
from lifelong_peer.workspace import Workspace

SEP = 0


@pytest.fixture
def ws(tmp_path) -> Workspace:
    return Workspace.init(tmp_path / "ws")


def docs(n=12, year0=2001):
    """Small dated documents with ids; some non-ASCII text."""
    return [
        {"id": f"d{i}", "time": f"{year0 + i % 3}-0{1 + i % 9}-15", "text": f"document {i} — café {'x' * i}\n"}
        for i in range(n)
    ]


def write_jsonl(path: Path, records, prefix: bytes = b"") -> Path:
    path.write_bytes(prefix + "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode())
    return path


def write_csv(path: Path, records, encoding="utf-8") -> Path:
    with open(path, "w", newline="", encoding=encoding) as f:
        w = csv.DictWriter(f, fieldnames=list(records[0]))
        w.writeheader()
        w.writerows(records)
    return path


def stored_documents(ws, name) -> dict[str, dict[str, list[str]]]:
    """slice → split → texts, decoded from the packed token arrays (SEP before every document)."""
    out = {}
    for s in open_stream(ws, name).slices:
        out[s.name] = {}
        for split in ("train", "validation", "test"):
            tokens = s.tokens(split)
            assert len(tokens) == 0 or tokens[0] == SEP
            texts = bytes(tokens).split(bytes([SEP]))[1:]
            out[s.name][split] = [t.decode("utf-8") for t in texts]
    return out


def snapshot(ws: Workspace) -> dict:
    """Every file of the workspace and its bytes (lock files aside: they hold their last holder's PID)."""
    return {
        str(p.relative_to(ws.root)): p.read_bytes()
        for p in ws.root.rglob("*")
        if p.is_file() and p.name != ".lock" and p.parent.name != ".locks"
    }


# -- times -----------------------------------------------------------------------------------------
def _utc(*args):
    return int(datetime(*args, tzinfo=UTC).timestamp())


@pytest.mark.parametrize(
    "value, expected",
    [
        ("2020-03-15", _utc(2020, 3, 15)),
        ("2020-03-15T12:30:00", _utc(2020, 3, 15, 12, 30)),
        ("2020-03-15T12:30:00Z", _utc(2020, 3, 15, 12, 30)),
        ("2020-03-15T12:30:00+02:00", _utc(2020, 3, 15, 10, 30)),
        ("2020-03", _utc(2020, 3, 1)),
        ("1790", _utc(1790, 1, 1)),
        (1790, _utc(1790, 1, 1)),
        ("1584230400", _utc(2020, 3, 15)),
        (1584230400, _utc(2020, 3, 15)),
        (1584230400.5, _utc(2020, 3, 15)),
        (np.datetime64("2020-03-15T00:00:00"), _utc(2020, 3, 15)),
        (datetime(2020, 3, 15, 1, tzinfo=UTC), _utc(2020, 3, 15, 1)),
    ],
)
def test_parse_time_accepts(value, expected):
    assert parse_time(value) == expected


@pytest.mark.parametrize("value", ["yesterday", "2020-13", "2020-02-30", "", None, True, [2020], "12/03/2020"])
def test_parse_time_rejects(value):
    with pytest.raises(ValueError):
        parse_time(value)


@pytest.mark.parametrize("value", [12, "12", 0, -1, 999, 2101, 12345, "99999", 2001.5, 1584230400000, 10**30])
def test_bare_numbers_are_read_only_where_plausible(value):
    """Issue 17: `"time": 12` was the year 12; a bare number outside the plausible ranges names itself
    and the option that says how to read it."""
    with pytest.raises(ValueError, match=r"bare number .* is neither a plausible year .*--time-unit"):
        parse_time(value)
    with pytest.raises(ValueError, match=r"looks like epoch milliseconds: pass --time-unit ms"):
        parse_time(1584230400000)


@pytest.mark.parametrize(
    "value, year",
    [
        ("3000-01-01", 3000),
        ("0015-03-01", 15),
        ("0999-12", 999),
        ("2101-01-01T00:00:00Z", 2101),
        (date(15, 3, 1), 15),
        (np.datetime64("3000-01-01"), 3000),
    ],
)
def test_dates_are_read_only_where_plausible(value, year):
    """Issue 25: dates follow the bare years' rule (years 1000–2100); an explicit unit accepts any year."""
    with pytest.raises(ValueError, match=rf"lies in the year {year}, outside the plausible years 1000–2100"):
        parse_time(value)
    assert to_datetime(parse_time(value, "year")).year == to_datetime(parse_time(value, "s")).year == year


def test_dates_at_the_edges_of_the_plausible_years_are_read():
    assert parse_time("1000-01-01") == _utc(1000, 1, 1)
    assert parse_time("2100-12-31T23:59:59Z") == _utc(2101, 1, 1) - 1


def test_time_unit_says_how_to_read_a_bare_number():
    assert parse_time(12, "year") == parse_time("12", "year") == _utc(12, 1, 1)
    assert parse_time(12, "s") == 12
    assert parse_time(1584230400000, "ms") == parse_time("1584230400000", "ms") == _utc(2020, 3, 15)
    assert parse_time(2001.0) == parse_time("2001.0") == _utc(2001, 1, 1)  # a float column of years (pandas + NaN)
    assert parse_time("1790") == parse_time(1790, "year") == _utc(1790, 1, 1)
    assert parse_time("2020-03-15", "ms") == _utc(2020, 3, 15)  # the unit is for bare numbers only
    with pytest.raises(ValueError, match="not a whole year"):
        parse_time(2001.5, "year")


def test_format_time():
    assert format_time(_utc(1790, 1, 8)) == "1790-01-08"
    assert format_time(_utc(2020, 3, 15, 12, 30)) == "2020-03-15T12:30:00Z"


# -- slicing and splits (pure functions) ------------------------------------------------------------
def test_boundaries_are_left_closed():
    times = np.array([parse_time(t) for t in ["1839-12-31T23:59:59", "1840-01-01", "1870", "1969-12-31", "1970"]])
    slices, slice_of, _ = assign_slices(SliceSpec.parse("eras:1790,1840,1870,1970"), times, np.ones(5, np.int64))
    assert [s.name for s in slices] == ["1790-1839", "1840-1869", "1870-1969", "1970-1970"]
    assert slice_of.tolist() == [0, 1, 2, 2, 3]
    quarters = np.array([parse_time(t) for t in ["2020-03-31T23:59:59", "2020-04-01", "2020-04-01T01:00:00+02:00"]])
    slices, slice_of, _ = assign_slices(SliceSpec.parse("quarter"), quarters, np.ones(3, np.int64))
    assert [s.name for s in slices] == ["2020-Q1", "2020-Q2"] and slice_of.tolist() == [0, 1, 0]


def test_calendar_slices_match_brute_force():
    rng = np.random.default_rng(0)
    times = rng.integers(parse_time("1999-06"), parse_time("2003-02"), size=300)
    for kind, fmt in [("year", "%Y"), ("quarter", None), ("month", "%Y-%m")]:
        slices, slice_of, _ = assign_slices(SliceSpec(kind), times, np.ones(300, np.int64))
        for t, s in zip(times, slice_of, strict=True):
            d = datetime.fromtimestamp(int(t), UTC)
            name = f"{d.year}-Q{(d.month - 1) // 3 + 1}" if kind == "quarter" else d.strftime(fmt)
            assert slices[s].name == name
        assert [s.name for s in slices] == sorted(s.name for s in slices)


def test_quantiles_have_equal_bytes_in_time_order():
    rng = np.random.default_rng(1)
    times = rng.integers(0, 10**9, size=400)
    nbytes = rng.integers(1, 100, size=400)
    slices, _, _ = assign_slices(SliceSpec.parse("quantiles:4"), times, nbytes)
    assert len(slices) == 4
    per = [int(nbytes[s.members].sum()) for s in slices]
    assert max(per) - min(per) <= 2 * nbytes.max()
    for a, b in pairwise(slices):
        assert times[a.members].max() <= times[b.members].min()


def test_splits_follow_the_id_hash():
    ids = [f"doc-{i}" for i in range(2000)]
    u = np.array([hash_unit(i) for i in ids])
    slices, _, _ = assign_slices(SliceSpec.parse("quantiles:1"), np.zeros(2000, np.int64), np.ones(2000, np.int64))
    split = assign_splits(u, slices, (0.9, 0.05, 0.05))
    reference = [0 if x < 0.9 else 1 if x < 0.95 else 2 for x in u]
    assert split.tolist() == reference
    assert 0.85 < (split == 0).mean() < 0.95


def test_small_slices_still_get_validation_and_test():
    u = np.array([0.1, 0.2, 0.3, 0.4])  # all hash into train
    slices, _, _ = assign_slices(SliceSpec.parse("quantiles:1"), np.zeros(4, np.int64), np.ones(4, np.int64))
    split = assign_splits(u, slices, (0.9, 0.05, 0.05))
    assert sorted(split.tolist()) == [0, 0, 1, 2]
    assert split.tolist() == assign_splits(u, slices, (0.9, 0.05, 0.05)).tolist()


# -- round trips per source kind -------------------------------------------------------------------
def _expected(records, kind="year"):
    out: dict[str, list[str]] = {}
    for r in records:
        out.setdefault(r["time"][:4], []).append(r["text"])
    return out


def _check_round_trip(ws, name, records):
    got = stored_documents(ws, name)
    flat = {k: sorted(t for split in v.values() for t in split) for k, v in got.items()}
    assert flat == {k: sorted(v) for k, v in _expected(records).items()}
    stream = open_stream(ws, name)
    assert [s.name for s in stream.slices] == sorted(flat)
    for s in stream.slices:
        for split in ("train", "validation", "test"):
            texts = got[s.name][split]
            assert s.num_bytes(split) == sum(len(t.encode()) for t in texts)
            assert len(s.tokens(split)) == s.num_bytes(split) + len(texts)


def test_jsonl_round_trip_and_manifest_counts(ws, tmp_path):
    records = docs(30)
    summary = ingest(ws, str(write_jsonl(tmp_path / "a.jsonl", records)), "a", block_size=16)
    _check_round_trip(ws, "a", records)
    assert summary["documents"] == 30 and not summary["unchanged"]
    (entry,) = list_streams(ws)["streams"]
    assert entry["name"] == "a" and sum(s["documents"] for s in entry["slices"]) == 30
    s = open_stream(ws, "a").slices[0]
    assert s.start == min(r["time"] for r in records if r["time"].startswith(s.name))


def test_csv_parquet_folder_txt_and_hf_round_trips(ws, tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = docs(12)
    ingest(ws, str(write_csv(tmp_path / "a.csv", records)), "csv")
    _check_round_trip(ws, "csv", records)

    pq.write_table(pa.Table.from_pylist(records), tmp_path / "a.parquet")
    ingest(ws, str(tmp_path / "a.parquet"), "parquet")
    _check_round_trip(ws, "parquet", records)

    folder = tmp_path / "mixed"
    folder.mkdir()
    write_jsonl(folder / "1.jsonl", records[:5])
    write_csv(folder / "2.csv", records[5:9])
    pq.write_table(pa.Table.from_pylist(records[9:]), folder / "3.parquet")
    ingest(ws, str(folder), "folder")
    _check_round_trip(ws, "folder", records)

    txt = tmp_path / "txt"
    txt.mkdir()
    for r in records:
        (txt / f"{r['id']}_{r['time']}.txt").write_text(r["text"], encoding="utf-8")
    ingest(ws, str(txt), "txt", time_from_name=r"_(?P<time>\d{4}-\d\d-\d\d)\.txt$")
    _check_round_trip(ws, "txt", records)

    saved = tmp_path / "hf"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(records[:8]), "test": datasets.Dataset.from_list(records[8:])}
    ).save_to_disk(saved)
    ingest(ws, str(saved), "hf")
    _check_round_trip(ws, "hf", records)


def test_packed_files_open_with_datasets_and_block_size_is_storage_only(ws, tmp_path):
    import datasets

    src = str(write_jsonl(tmp_path / "a.jsonl", docs(20)))
    ingest(ws, src, "small", block_size=7)
    ingest(ws, src, "large", block_size=4096)
    for a, b in zip(open_stream(ws, "small").slices, open_stream(ws, "large").slices, strict=True):
        for split in ("train", "validation", "test"):
            assert np.array_equal(a.tokens(split), b.tokens(split))
    s = open_stream(ws, "small").slices[0]
    ds = datasets.Dataset.from_file(str(s.path / "train.arrow"))
    assert len(ds) == -(-len(s.tokens("train")) // 7)
    assert (
        np.concatenate([np.array(r["input_ids"]) for r in ds])[: len(s.tokens("train"))].tolist()
        == s.tokens("train").tolist()
    )
    assert not s.tokens("train").flags.writeable


def test_slice_kinds_end_to_end(ws, tmp_path):
    records = [
        {"id": "a", "time": "1839-12-31", "text": "old", "domain": "law"},
        {"id": "b", "time": "1840-01-01", "text": "on the boundary", "domain": "news"},
        {"id": "c", "time": "1990-05-01", "text": "late", "domain": "law"},
    ]
    src = str(write_jsonl(tmp_path / "a.jsonl", records))
    summary = ingest(ws, src, "eras", slice="eras:1790,1840,1870,1900")
    got = {k: [t for texts in v.values() for t in texts] for k, v in stored_documents(ws, "eras").items()}
    assert got == {"1790-1839": ["old"], "1840-1869": ["on the boundary"], "1900-1990": ["late"]}
    assert any("1870-1899" in w and "no documents" in w for w in summary["warnings"])
    ingest(ws, src, "domains", slice="field:domain")
    assert [s.name for s in open_stream(ws, "domains").slices] == ["law", "news"]
    with pytest.raises(UserError, match=r"a\.jsonl:1: time 1839-12-31 is before the first era boundary 1840"):
        ingest(ws, src, "late-eras", slice="eras:1840,1900")


# -- splits are stable, re-ingest is a no-op -------------------------------------------------------
def _split_of(ws, name) -> dict[str, str]:
    return {t: split for s in stored_documents(ws, name).values() for split, texts in s.items() for t in texts}


def test_split_is_stable_across_reingests_and_reordering(ws, tmp_path):
    records = docs(60)
    ingest(ws, str(write_jsonl(tmp_path / "a.jsonl", records)), "a")
    shuffled = records[:]
    random.Random(0).shuffle(shuffled)
    extra = [*shuffled, {"id": "new", "time": "2001-01-01", "text": "a new document\n"}]
    ingest(ws, str(write_jsonl(tmp_path / "b.jsonl", extra)), "b")
    a, b = _split_of(ws, "a"), _split_of(ws, "b")
    assert {t: b[t] for t in a} == a


def test_reingest_unchanged_is_a_noop_and_changed_needs_replace(ws, tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", docs(10))
    ingest(ws, str(path), "a")
    before = snapshot(ws)
    again = ingest(ws, str(path), "a")
    assert again["unchanged"] and snapshot(ws) == before

    write_jsonl(path, docs(11))
    with pytest.raises(UserError, match=r"already exists.*--replace"):
        ingest(ws, str(path), "a")
    assert snapshot(ws) == before
    with pytest.raises(UserError, match="already exists"):  # different options, same source
        ingest(ws, str(tmp_path / "a.jsonl"), "a", slice="month")
    old_dir = ws.root / ws.manifest()["streams"]["a"]["dir"]
    ingest(ws, str(path), "a", replace=True)
    assert sum(s.documents for s in open_stream(ws, "a").slices) == 11
    assert not old_dir.exists()


def test_open_stream_errors_name_what_exists(ws, tmp_path):
    ingest(ws, str(write_jsonl(tmp_path / "a.jsonl", docs(6))), "a")
    with pytest.raises(UserError, match=r"no stream 'b' .*streams: a"):
        open_stream(ws, "b")
    with pytest.raises(UserError, match=r"stream 'a' has no slice '1999' \(slices: 2001, 2002, 2003\)"):
        open_stream(ws, "a").slice("1999")


# -- bad input: one clear sentence, an error, an unchanged workspace --------------------------------
BAD_CASES = {
    "malformed JSON, every line listed": (
        b'{"text": "ok", "time": "2001"}\n{"text": oops}\n{"text": "ok", "time": "2002"}\n{broken\n',
        "jsonl",
        r"2 bad records in .*bad\.jsonl .*:\n  line 2: malformed JSON.*\n  line 4: malformed JSON",
    ),
    "missing text field": (
        b'{"body": "x", "time": "2001"}\n',
        "jsonl",
        r"bad\.jsonl:1: no field 'text' \(fields: body, time\)",
    ),
    "missing time field": (b'{"text": "x"}\n', "jsonl", r"bad\.jsonl:1: no field 'time'"),
    "unparseable time": (
        b'{"text": "x", "time": "last tuesday"}\n',
        "jsonl",
        r"bad\.jsonl:1: time: 'last tuesday' is not a time",
    ),
    "null time": (b'{"text": "x", "time": null}\n', "jsonl", r"bad\.jsonl:1: time: missing time"),
    "text not a string": (
        b'{"text": 42, "time": "2001"}\n',
        "jsonl",
        r"bad\.jsonl:1: field 'text' is a number \(42\), not a string",
    ),
    "record not an object": (b"[1, 2]\n", "jsonl", r"bad\.jsonl:1: an array, not a JSON object"),
    # issue 17: the column of an error at the end of the line (it was "column 1": Python's line 2)
    "JSON cut short": (
        b'{"text": "x", "time": "2001"\n',
        "jsonl",
        r"bad\.jsonl:1: malformed JSON \(Expecting ',' delimiter at column 29, the end of the line\)",
    ),
    "JSON unterminated string": (
        b'{"text": "abc\n',
        "jsonl",
        r"bad\.jsonl:1: malformed JSON \(Unterminated string starting at column 10\)",
    ),
    "JSON error mid-line": (b'{"text": "x" "time": 1}\r\n', "jsonl", r"Expecting ',' delimiter at column 14\)"),
    "bare number time": (
        b'{"text": "x", "time": 12}\n',
        "jsonl",
        r"bad\.jsonl:1: time: bare number 12 is neither a plausible year",
    ),
    "date in the year 3000": (  # issue 25: it became the slice "3000"
        b'{"text": "x", "time": "2001-05-01"}\n{"text": "y", "time": "3000-01-01"}\n',
        "jsonl",
        r"bad\.jsonl:2: time: '3000-01-01' lies in the year 3000, outside the plausible years 1000–2100 "
        r"\(--time-unit year accepts any year\)",
    ),
    "date in the year 15": (b"text,time\nx,0015-03-01\n", "csv", r"bad\.csv:2: time: '0015-03-01' lies in the year 15"),
    "not UTF-8": (
        '{"text": "caf\u00e9", "time": "2001"}\n'.encode("latin-1"),
        "jsonl",
        r"bad\.jsonl:1: not valid utf-8 .*--encoding",
    ),
    "empty file": (b"", "jsonl", r"bad\.jsonl is empty"),
    "binary file": (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "jsonl", r"bad\.jsonl looks like a binary file"),
    "CSV column missing": (b"body,date\nx,2001\n", "csv", r"bad\.csv has no column 'text' \(columns: body, date\)"),
    "CSV bad time": (b"text,time\nx,2001\ny,soon\n", "csv", r"bad\.csv:3: time: 'soon' is not a time"),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_input(ws, tmp_path, case):
    content, ext, pattern = BAD_CASES[case]
    path = tmp_path / f"bad.{ext}"
    path.write_bytes(content)
    before = snapshot(ws)
    with pytest.raises(UserError, match=pattern) as err:
        ingest(ws, str(path), "bad")
    first, *records = str(err.value).split("\n")  # one sentence, then one indented line per bad record
    assert first and all(line.startswith("  ") for line in records)
    assert snapshot(ws) == before
    assert not any((ws.root / "streams").glob("*"))  # no temporary folder left behind either


def test_other_bad_sources(ws, tmp_path):
    before = snapshot(ws)
    with pytest.raises(UserError, match="does not exist"):
        ingest(ws, str(tmp_path / "nope.jsonl"), "x")
    (tmp_path / "notes.md").write_text("hi")
    with pytest.raises(UserError, match="unknown file type"):
        ingest(ws, str(tmp_path / "notes.md"), "x")
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.txt").write_text("hello")
    with pytest.raises(UserError, match="--time-from-name"):
        ingest(ws, str(folder), "x")
    with pytest.raises(UserError, match="file name does not match"):
        ingest(ws, str(folder), "x", time_from_name=r"(\d{4})")
    with pytest.raises(UserError, match="--slice 'decade' is not valid"):
        ingest(ws, str(folder), "x", slice="decade", time_from_name=r"(\d{4})")
    with pytest.raises(UserError, match="invalid stream name"):
        ingest(ws, str(folder), "../x", time_from_name=r"(\d{4})")
    assert snapshot(ws) == before


def test_many_bad_records_are_listed_up_to_a_limit(ws, tmp_path):
    """Issue 17: the path once, one record per line up to the limit, then the count of the rest."""
    path = tmp_path / "bad.jsonl"
    path.write_text("".join("{nope\n" for _ in range(25)))
    with pytest.raises(UserError) as err:
        ingest(ws, str(path), "bad")
    lines = str(err.value).split("\n")
    assert lines[0] == f"25 bad records in {path} (fix them, or pass --on-bad-record skip to skip bad records):"
    assert lines[1:11] == [
        f"  line {i}: malformed JSON (Expecting property name enclosed in double quotes at column 2)"
        for i in range(1, 11)
    ]
    assert lines[11:] == ["  and 15 more"]
    assert str(err.value).count("bad.jsonl") == 1


def test_bad_records_of_a_folder_are_grouped_by_file(ws, tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.jsonl").write_text('{"text": "ok", "time": 2001}\n{nope\n{"text": 1, "time": 2001}\n')
    (folder / "b.csv").write_text("text,time\nx,soon\n")
    with pytest.raises(UserError) as err:
        ingest(ws, str(folder), "bad")
    assert str(err.value).split("\n") == [
        f"3 bad records in {folder} (fix them, or pass --on-bad-record skip to skip bad records):",
        "  corpus/a.jsonl:",
        "    line 2: malformed JSON (Expecting property name enclosed in double quotes at column 2)",
        "    line 3: field 'text' is a number (1), not a string",
        "  corpus/b.csv:",
        "    line 2: time: 'soon' is not a time (expected an ISO date/datetime, YYYY-MM, a year, or epoch seconds)",
    ]


def test_time_unit_option_at_ingest(ws, tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "a", "time": 12}, {"text": "b", "time": 1584230400000}])
    with pytest.raises(
        UserError, match=r"2 bad records(.|\n)*line 1: time: bare number 12 (.|\n)*line 2: .*--time-unit ms"
    ):
        ingest(ws, str(path), "t")
    ingest(ws, str(path), "ms", time_unit="ms", on_bad_record="skip")
    assert [s.name for s in open_stream(ws, "ms").slices] == ["1970", "2020"]  # 12 ms after the epoch
    ingest(ws, str(path), "years", time_unit="year", on_bad_record="skip")
    assert [s.name for s in open_stream(ws, "years").slices] == ["0012"]
    with pytest.raises(UserError, match="--time-unit 'days' must be one of auto, year, s, ms"):
        ingest(ws, str(path), "x", time_unit="days")


def test_a_source_wholly_before_the_eras_is_one_sentence(ws, tmp_path):
    """Issue 17: `--slice eras:2030` on 1997–2022 data was a 373-record error; it is one sentence."""
    records = [{"text": f"doc {i}", "time": f"{1997 + i}-06-01"} for i in range(26)]
    path = write_jsonl(tmp_path / "old.jsonl", records)
    for mode in ("error", "skip"):
        with pytest.raises(UserError) as err:
            ingest(ws, str(path), "old", slice="eras:2030", on_bad_record=mode)
        assert str(err.value) == (
            f"every document of {path} is before the first era boundary: its 26 dated document(s) run from "
            "1997-06-01 to 2022-06-01, and --slice eras:2030 starts at 2030"
        )


def test_a_slice_too_small_for_every_split_is_warned_about_at_ingest(ws, tmp_path):
    """Issue 17: a one-document slice got 0 validation and test tokens without a word."""
    records = [{"id": f"d{i}", "text": f"document {i}", "time": "2001-05-01"} for i in range(20)]
    records.append({"id": "lonely", "text": "the only one", "time": "2002-05-01"})
    summary = ingest(ws, str(write_jsonl(tmp_path / "a.jsonl", records)), "a")
    (lonely,) = [s for s in summary["slices"] if s["name"] == "2002"]
    empty = [k for k, n in lonely["tokens"].items() if n == 0]
    assert len(empty) == 2
    (warning,) = [w for w in summary["warnings"] if "2002" in w]
    assert warning.startswith(f"slice '2002' has 1 document(s), so its {' and '.join(empty)} splits are empty")
    assert not any("2001" in w for w in summary["warnings"])


def test_skip_bad_records_counts_and_reports_them(ws, tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text(
        '{"text": "good", "time": "2001"}\n{nope\n{"text": "", "time": "2001"}\n{"text": "x", "time": "?"}\n'
    )
    summary = ingest(ws, str(path), "m", on_bad_record="skip")
    assert summary["documents"] == 1
    assert summary["skipped"] == {"bad": 2, "empty": 1}
    assert [r.split(":")[1] for r in summary["bad_records"]] == ["2", "4"]
    assert any("2 bad record(s) skipped" in w for w in summary["warnings"])


def test_encoding_bom_and_size_limit(ws, tmp_path):
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes('{"text": "caf\u00e9", "time": "2001"}\n'.encode("latin-1"))
    ingest(ws, str(latin), "latin", encoding="latin-1")
    assert stored_documents(ws, "latin")["2001"]["train"] == ["café"]

    bom = write_jsonl(tmp_path / "bom.jsonl", [{"text": "x", "time": "2001"}], prefix=b"\xef\xbb\xbf")
    ingest(ws, str(bom), "bom")
    bom_csv = tmp_path / "bom.csv"
    bom_csv.write_bytes(b"\xef\xbb\xbftext,time\nx,2001\n")
    ingest(ws, str(bom_csv), "bomcsv")
    assert sum(s.documents for s in open_stream(ws, "bomcsv").slices) == 1

    big = write_jsonl(tmp_path / "big.jsonl", [{"text": "y" * 3000, "time": "2001"}])
    with pytest.raises(UserError, match=r"big\.jsonl:1: document of 3,000 bytes is larger than the limit"):
        ingest(ws, str(big), "big", max_document_mb=0.001)
    huge_line = write_jsonl(tmp_path / "huge.jsonl", [{"text": "z" * 100_000, "time": "2001"}])
    with pytest.raises(UserError, match=r"huge\.jsonl:1: line of at least"):
        ingest(ws, str(huge_line), "huge", max_document_mb=0.001)


def test_hf_source_through_load_dataset(ws, tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    folder = tmp_path / "hub-like"
    folder.mkdir()
    records = docs(9)
    write_jsonl(folder / "part.jsonl", records)
    ingest(ws, f"hf:{folder}", "hub")
    _check_round_trip(ws, "hub", records)
    with pytest.raises(UserError, match="could not load Hugging Face dataset"):
        ingest(ws, f"hf:{tmp_path / 'nothing-here'}", "none")


@settings(max_examples=200)
@given(st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30), timezones=st.just(UTC)))
def test_parse_time_round_trips_iso(dt):
    seconds = parse_time(dt.isoformat(), "year")  # an explicit unit: dates of any year (issue 25)
    assert (
        seconds
        == parse_time(dt.replace(tzinfo=None).isoformat(), "year")
        == (dt - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(seconds=1)  # exact: total_seconds() is a float
    )
    assert parse_time(format_time(seconds), "year") == seconds


def test_a_damaged_stream_cache_is_named_not_trained_on(tmp_path):
    """Issue 10: cache files are recorded with size + sha256 at ingest and checked on first read."""
    from lifelong_peer.streams import store

    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"id": i, "text": "word " * 50, "time": 2000 + i % 2}) + "\n" for i in range(40)))
    ws = Workspace.init(tmp_path / "ws")
    ingest(ws, str(src), "s")
    stream = open_stream(ws, "s")
    path = stream.slices[0].path / "train.arrow"
    data = bytearray(path.read_bytes())
    data[-20] ^= 0xFF  # flip bits inside the file, size unchanged
    path.write_bytes(bytes(data))
    store._VERIFIED.clear()
    with pytest.raises(UserError, match=r"train\.arrow: altered"):
        open_stream(ws, "s").slices[0].tokens("train")
    path.write_bytes(bytes(data[:100]))
    with pytest.raises(UserError, match="truncated"):
        open_stream(ws, "s").slices[0].tokens("train")
