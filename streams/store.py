"""Ingest a source into a workspace stream, and open stored streams for training.

``ingest`` runs two passes over the source so memory is bounded by one record, not the file:

1. **scan** — validate every record (text, time, id), keeping only small per-document numbers
   (time, byte count, split hash, category); bad records are collected (``file:line: problem``) and
   either reported all together (default) or skipped and counted (``on_bad_record="skip"``);
2. **pack** — with slices and splits decided, read the records again and append each document's
   tokens to its (slice, split) writer (``packing.PackWriter``).

The stream is built in a temporary folder and published by one rename plus one atomic manifest
write, all under the workspace lock: a failure at any point leaves the workspace as it was. The
fingerprint covers the source's bytes and every option that changes the result, so re-ingesting
an unchanged source is a no-op, and a changed one under an existing name needs ``replace=True``.

Stored layout: ``streams/<name>-<fingerprint[:12]>/<slice index:03d>/{train,validation,test}.arrow``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from array import array
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from lifelong_peer import advice
from lifelong_peer.errors import CheckpointError, UserError
from lifelong_peer.files import file_record, verify_file
from lifelong_peer.workspace import Workspace, check_name, now_iso

from .packing import PackWriter, read_tokens
from .slicing import SPLITS, SliceSpec, assign_slices, assign_splits, boundary_time, hash_unit
from .sources import ReadOptions, json_kind, open_source
from .times import TIME_UNITS, format_time, parse_time
from .tokenize import SEPARATOR_ID, encode_array, get_tokenizer, token_dtype, tokenizer_fingerprint

#: bumped when the stored layout or the meaning of an option changes (old fingerprints then differ)
STORE_VERSION = 1
Progress = Callable[[str, int, "int | None"], None]


@dataclass
class IngestOptions:
    """Options of ``lpeer ingest`` (each one documents itself into ``--help``)."""

    text_field: str = "text"
    """field / column holding the document text"""
    time_field: str = "time"
    """field / column holding the document time (ISO date or datetime, YYYY-MM, year, epoch seconds)"""
    time_unit: str = "auto"
    """how a bare number in the time field is read: auto (a year if 1000-2100, epoch seconds if 1973-2100, else an error) | year | s | ms"""
    id_field: str = "id"
    """field holding a stable document id, used for the split hash; without it, the text's hash is the id"""
    slice: str = "year"
    """year | quarter | month | eras:B1,B2,... | quantiles:K | field:NAME"""
    split: tuple[float, float, float] = (0.9, 0.05, 0.05)
    """train / validation / test fractions, assigned by a hash of the document id"""
    block_size: int = 4096
    """tokens per stored block (storage only: the trainer samples windows across blocks)"""
    tokenizer: str = "bytes"
    """bytes (UTF-8 bytes, vocabulary 256) or hf:NAME_OR_PATH (a Hugging Face model's own tokenizer)"""
    on_bad_record: str = "error"
    """error: stop and list the bad records; skip: skip them, count and report them"""
    max_listed: int = 10
    """how many bad records an error message or summary lists"""
    encoding: str = "utf-8"
    """text encoding of the source files"""
    max_document_mb: float = 16.0
    """a larger document is an error naming it"""
    time_from_name: str | None = None
    """for .txt folders: regex on the file name giving the time (named group `time`, group 1 or the match)"""
    hf_split: str | None = None
    """Hugging Face datasets: read only this split"""
    replace: bool = False
    """re-ingest over an existing stream whose source or options changed"""

    def __post_init__(self):
        self.split = tuple(float(x) for x in self.split)
        if len(self.split) != 3 or min(self.split) < 0 or abs(sum(self.split) - 1) > 1e-6 or self.split[0] == 0:
            raise UserError(f"--split {self.split} must be three fractions train,validation,test summing to 1")
        if self.time_unit not in TIME_UNITS:
            raise UserError(f"--time-unit {self.time_unit!r} must be one of {', '.join(TIME_UNITS)}")
        if self.on_bad_record not in ("error", "skip"):
            raise UserError(f"--on-bad-record {self.on_bad_record!r} must be error or skip")
        if self.block_size < 1:
            raise UserError("--block-size must be positive")
        if self.max_document_mb <= 0:
            raise UserError("--max-document-mb must be positive")

    def read_options(self) -> ReadOptions:
        return ReadOptions(
            encoding=self.encoding,
            max_document_bytes=int(self.max_document_mb * 2**20),
            time_from_name=self.time_from_name,
            hf_split=self.hf_split,
        )

    def result_key(self) -> dict:
        """The options that change what is stored (part of the fingerprint)."""
        d = asdict(self)
        for k in ("on_bad_record", "max_listed", "replace", "max_document_mb"):
            d.pop(k)
        if d["time_unit"] == "auto":  # the default: streams ingested before the option keep their fingerprint
            d.pop("time_unit")
        return d


# -- reading stored streams ------------------------------------------------------------------------
_VERIFIED: set[Path] = set()  # cache files checked by this process


@dataclass
class StreamSlice:
    """One time slice of a stream; its splits' tokens are memory-mapped from the Arrow cache."""

    name: str
    start: str
    end: str
    documents: int
    path: Path = field(repr=False, default=Path())
    splits: dict = field(repr=False, default_factory=dict)
    """split → {"documents", "bytes", "tokens"}"""

    def tokens(self, split: str) -> np.ndarray:
        """(N,) packed tokens of ``split`` (``SEP doc SEP doc ...``), read-only and memory-mapped.

        The cache file is checked against the size and sha256 recorded at ingest the first time this
        process reads it: a truncated or altered cache is named, never silently trained on (issue 10).
        """
        path = self.path / f"{_check_split(split)}.arrow"
        record = self.splits[split].get("file")  # streams ingested before the check have none
        if record is not None and path not in _VERIFIED:
            try:
                verify_file(path, record)
            except CheckpointError as e:
                raise UserError(f"stream cache damaged: {e}; re-ingest the stream with --replace") from None
            _VERIFIED.add(path)
        return read_tokens(path)

    def num_bytes(self, split: str) -> int:
        """UTF-8 bytes of the text behind ``tokens(split)`` (separators excluded), for bits per byte."""
        return int(self.splits[_check_split(split)]["bytes"])


@dataclass
class Stream:
    name: str
    tokenizer: object
    slices: list[StreamSlice]
    """in time order"""
    source: str = ""
    separator: int = SEPARATOR_ID
    """token id placed before every document"""

    def slice(self, name: str) -> StreamSlice:
        for s in self.slices:
            if s.name == name:
                return s
        raise UserError(
            f"stream {self.name!r} has no slice {name!r} (slices: {', '.join(s.name for s in self.slices)})"
        )


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r} (use train, validation or test)")
    return split


def workspace_of(workspace: Workspace | str | Path | None) -> Workspace:
    return workspace if isinstance(workspace, Workspace) else Workspace.open(workspace)


def open_stream(workspace: Workspace | str | Path, name: str) -> Stream:
    ws = workspace_of(workspace)
    streams = ws.manifest()["streams"]
    if name not in streams:
        known = ", ".join(sorted(streams)) or f"none; run `{advice.command(advice.INGEST_DEFAULT, ws.root)}`"
        raise UserError(f"no stream {name!r} in workspace {ws.root} (streams: {known})")
    entry = streams[name]
    root = ws.root / entry["dir"]
    slices = [
        StreamSlice(s["name"], s["start"], s["end"], s["documents"], root / s["dir"], s["splits"])
        for s in entry["slices"]
    ]
    tokenizer = _tokenizer(entry["tokenizer"])
    recorded = entry.get("tokenizer_fingerprint")  # streams ingested before issue 11 have none
    if recorded is not None and recorded != tokenizer_fingerprint(tokenizer):
        raise UserError(
            f"stream {name!r} was ingested with tokenizer {entry['tokenizer']!r}, whose files have changed "
            "since; ingest it again with --replace"
        )
    return Stream(name, tokenizer, slices, entry["source"], entry["separator"])


def _tokenizer(name: str):
    """``get_tokenizer`` with unknown names and unusable tokenizers as one-line user errors."""
    try:
        tokenizer = get_tokenizer(name)
    except ValueError as e:
        raise UserError(str(e)) from None
    if tokenizer.separator_id is None:
        raise UserError(f"tokenizer {name!r} has no end-of-text or beginning-of-text token to separate documents")
    return tokenizer


def list_streams(workspace: Workspace | str | Path | None = None) -> dict:
    """``{"streams": [{"name", "source", "slices": [{"name", "start", "end", "documents", "bytes", "tokens"}]}]}``."""
    ws = workspace_of(workspace)
    out = []
    for name, entry in sorted(ws.manifest()["streams"].items()):
        out.append({"name": name, "source": entry["source"], "slices": [_public_slice(s) for s in entry["slices"]]})
    return {"streams": out}


def _public_slice(s: dict) -> dict:
    return {
        "name": s["name"],
        "start": s["start"],
        "end": s["end"],
        "documents": s["documents"],
        "bytes": s["bytes"],
        "tokens": {k: s["splits"][k]["tokens"] for k in SPLITS},
    }


# -- ingest ----------------------------------------------------------------------------------------
def ingest(
    workspace: Workspace | str | Path, source: str, name: str, progress: Progress | None = None, **options
) -> dict:
    """Ingest ``source`` as stream ``name``; returns the summary that ``lpeer ingest`` renders.

    ``options`` are the fields of ``IngestOptions`` (``slice="eras:1790,1840"``, ``text_field=...``).
    """
    try:
        opts = IngestOptions(**options)
    except TypeError as e:
        raise UserError(f"ingest: {e}") from None
    ws = workspace_of(workspace)
    check_name("stream name", name)
    src = open_source(source, opts.read_options())
    return ingest_source(ws, src, name, opts, progress)


def ingest_source(ws: Workspace, src, name: str, opts: IngestOptions, progress: Progress | None = None) -> dict:
    """Ingest an opened source object (see ``sources``); the shared back end of ``ingest`` and the default."""
    started = time.perf_counter()
    spec = SliceSpec.parse(opts.slice)
    tokenizer = _tokenizer(opts.tokenizer)
    fingerprint = _fingerprint(src, opts, tokenizer)
    existing = ws.manifest()["streams"].get(name)
    if existing is not None and existing["fingerprint"] == fingerprint and (ws.root / existing["dir"]).is_dir():
        return _summary(existing, unchanged=True, seconds=time.perf_counter() - started)  # writes nothing: no lock
    # this stream only (issue 25), and not while a run reads it; the manifest is locked while it changes
    with ws.stream_lock(name):
        existing = ws.manifest()["streams"].get(name)
        if existing is not None and existing["fingerprint"] == fingerprint and (ws.root / existing["dir"]).is_dir():
            return _summary(existing, unchanged=True, seconds=time.perf_counter() - started)
        if existing is not None and not opts.replace:
            raise UserError(
                f"stream {name!r} already exists in {ws.root} (from {existing['source']}) and its source or "
                "options changed; pass --replace to re-ingest it, or choose another --name"
            )
        _check_columns(src, opts, spec)
        scan = _scan(src, opts, spec, progress)
        slices, slice_of, warnings = assign_slices(spec, scan.times, scan.nbytes, scan.categories, scan.category_of)
        split_of = assign_splits(scan.units, slices, opts.split)
        final = ws.root / "streams" / f"{name}-{fingerprint[:12]}"
        tmp = ws.root / "streams" / f".tmp-{name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            entries = _pack(src, opts, spec, scan, slices, slice_of, split_of, tmp, tokenizer, progress)
            warnings += [w for e in entries if (w := _empty_split_warning(e))]
            entry = {
                "name": name,
                "source": src.label,
                "fingerprint": fingerprint,
                "dir": str(final.relative_to(ws.root)),
                "tokenizer": opts.tokenizer,
                "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
                "separator": tokenizer.separator_id,
                "block_size": opts.block_size,
                "slicing": str(spec),
                "options": opts.result_key(),
                "ingested_at": now_iso(),
                "documents": int(sum(s["documents"] for s in entries)),
                "skipped": {"bad": scan.bad_count, "empty": scan.empty},
                "bad_records": scan.bad[: opts.max_listed],
                "warnings": warnings + scan.warnings(),
                "slices": entries,
            }
            (tmp / "stream.json").write_text(json.dumps(entry, indent=2) + "\n", encoding="utf-8")
            shutil.rmtree(final, ignore_errors=True)  # a leftover of an interrupted ingest
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

        try:
            ws.update_manifest(lambda m: m["streams"].update({name: entry}))
        except BaseException:
            shutil.rmtree(final, ignore_errors=True)
            raise
        if existing is not None and existing["dir"] != entry["dir"]:
            shutil.rmtree(ws.root / existing["dir"], ignore_errors=True)
    return _summary(entry, unchanged=False, seconds=time.perf_counter() - started)


def _empty_split_warning(entry: dict) -> str | None:
    """Issue 17: a slice too small to fill every split is said at ingest, not found later as a gap."""
    empty = [k for k in SPLITS if entry["splits"][k]["tokens"] == 0]
    if not empty:
        return None
    what = {"train": "a phase on it trains on nothing", "validation": "it is not evaluated", "test": "it is not tested"}
    return (
        f"slice {entry['name']!r} has {entry['documents']} document(s), so its {' and '.join(empty)} "
        f"split{'s are' if len(empty) > 1 else ' is'} empty ({'; '.join(what[k] for k in empty)}); "
        "add documents or use coarser slices"
    )


def _summary(entry: dict, unchanged: bool, seconds: float) -> dict:
    return {
        "stream": entry["name"],
        "source": entry["source"],
        "unchanged": unchanged,
        "slicing": entry["slicing"],
        "documents": entry["documents"],
        "skipped": entry["skipped"],
        "bad_records": entry["bad_records"],
        "warnings": entry["warnings"],
        "slices": [_public_slice(s) for s in entry["slices"]],
        "seconds": round(seconds, 3),
    }


def _fingerprint(src, opts: IngestOptions, tokenizer) -> str:
    key = {"store": STORE_VERSION, "source": src.fingerprint(), "options": opts.result_key()}
    if opts.tokenizer != "bytes":  # the files behind a Hugging Face tokenizer's name can change
        key["tokenizer"] = tokenizer_fingerprint(tokenizer)
    key = json.dumps(key, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()


def _check_columns(src, opts: IngestOptions, spec: SliceSpec) -> None:
    """Tabular sources know their columns up front: a missing one is an error listing those that exist."""
    columns = src.columns()
    if columns is None:
        return
    required = [opts.text_field, opts.time_field] + ([spec.field] if spec.kind == "field" else [])
    for col in required:
        if col not in columns:
            raise UserError(f"{src.label} has no column {col!r} (columns: {', '.join(columns) or 'none'})")


@dataclass
class _Scan:
    """What pass 1 keeps: a few numbers per good document, and the bad records."""

    status: array = field(default_factory=lambda: array("b"))
    """per source record: 1 good, 0 bad, 2 empty text"""
    times_: array = field(default_factory=lambda: array("q"))
    nbytes_: array = field(default_factory=lambda: array("q"))
    units_: array = field(default_factory=lambda: array("d"))
    category_: array = field(default_factory=lambda: array("l"))
    categories: list[str] = field(default_factory=list)
    bad: list[str] = field(default_factory=list)
    """the first ``max_listed`` bad records, as ``where: problem``"""
    bad_count: int = 0
    empty: int = 0
    early: array = field(default_factory=lambda: array("q"))
    """times of the otherwise good documents before the first era boundary (bad records too)"""

    @property
    def times(self) -> np.ndarray:
        return np.frombuffer(self.times_, dtype=np.int64) if self.times_ else np.zeros(0, np.int64)

    @property
    def nbytes(self) -> np.ndarray:
        return np.frombuffer(self.nbytes_, dtype=np.int64) if self.nbytes_ else np.zeros(0, np.int64)

    @property
    def units(self) -> np.ndarray:
        return np.frombuffer(self.units_, dtype=np.float64) if self.units_ else np.zeros(0)

    @property
    def category_of(self) -> np.ndarray:
        return np.asarray(self.category_, dtype=np.int64)

    def warnings(self) -> list[str]:
        out = []
        if self.empty:
            out.append(f"{self.empty} record(s) with empty text skipped")
        if self.bad_count:
            out.append(f"{self.bad_count} bad record(s) skipped (--on-bad-record skip)")
        return out


def _extract(fields: dict, opts: IngestOptions, spec: SliceSpec, max_bytes: int, where: str):
    """One record → (text, bytes, time, id) or a problem string. Oversized documents raise."""
    missing = [f for f in (opts.text_field, opts.time_field) if f not in fields]
    if spec.kind == "field" and spec.field not in fields:
        missing.append(spec.field)
    if missing:
        return f"no field {missing[0]!r} (fields: {', '.join(map(str, fields)) or 'none'})"
    text = fields[opts.text_field]
    if text is None:
        return f"missing text (field {opts.text_field!r} is null)"
    if not isinstance(text, str):
        return f"field {opts.text_field!r} is {json_kind(text)}, not a string"
    raw = text.encode("utf-8")
    if len(raw) > max_bytes:
        raise UserError(
            f"{where}: document of {len(raw):,} bytes is larger than the limit of {max_bytes:,} bytes "
            "(raise it with --max-document-mb)"
        )
    if "\x00" in text:
        return "text contains a NUL character (reserved as the document separator)"
    try:
        t = parse_time(fields[opts.time_field], opts.time_unit)
    except ValueError as e:
        return f"time: {e}"
    except OverflowError:
        return f"time {fields[opts.time_field]!r} is out of range"
    doc_id = fields.get(opts.id_field)
    doc_id = str(doc_id) if doc_id is not None and doc_id != "" else "sha256:" + hashlib.sha256(raw).hexdigest()
    return text, len(raw), t, doc_id


def _scan(src, opts: IngestOptions, spec: SliceSpec, progress: Progress | None) -> _Scan:
    scan = _Scan()
    max_bytes = opts.read_options().max_document_bytes
    first = boundary_time(spec.boundaries[0]) if spec.kind == "eras" else None
    category_index: dict[str, int] = {}
    for i, (where, fields, problem) in enumerate(src.records(_needed(opts, spec))):
        if progress and i % 256 == 0:
            progress("scan", i, None)
        if problem is None:
            got = _extract(fields, opts, spec, max_bytes, where)
            if isinstance(got, str):
                problem = got
            elif not got[0].strip():
                scan.status.append(2)
                scan.empty += 1
                continue
            elif first is not None and got[2] < first:
                problem = f"time {format_time(got[2])} is before the first era boundary {spec.boundaries[0]}"
                scan.early.append(got[2])
        if problem is not None:
            scan.status.append(0)
            scan.bad_count += 1
            if len(scan.bad) < opts.max_listed:
                scan.bad.append(f"{where}: {problem}")
            continue
        _, nbytes, t, doc_id = got
        scan.status.append(1)
        scan.times_.append(t)
        scan.nbytes_.append(nbytes)
        scan.units_.append(hash_unit(doc_id))
        if spec.kind == "field":
            value = str(fields[spec.field])
            scan.category_.append(category_index.setdefault(value, len(category_index)))
    scan.categories = list(category_index)
    if scan.early and not len(scan.times_):  # issue 17: the whole source lies before the eras, one sentence
        others = scan.bad_count - len(scan.early)
        raise UserError(
            f"every document of {src.label} is before the first era boundary: its {len(scan.early):,} dated "
            f"document(s) run from {format_time(min(scan.early))} to {format_time(max(scan.early))}, and "
            f"--slice {spec} starts at {spec.boundaries[0]}"
            + (f" ({others:,} other record(s) are bad as well)" if others else "")
        )
    if scan.bad_count and opts.on_bad_record == "error":
        raise UserError(bad_records_message(src.label, scan.bad, scan.bad_count))
    if not len(scan.times_):
        what = f" ({scan.bad_count} bad, {scan.empty} empty)" if scan.bad_count or scan.empty else ""
        raise UserError(f"{src.label} has no usable documents{what}")
    return scan


_WHERE = re.compile(r"(?P<file>.*?):(?P<at>\d+|row \d+): (?P<problem>.*)", re.DOTALL)


def group_bad_records(records: list[str]) -> list[tuple[str, list[str]]]:
    """``["a.jsonl:3: problem", ...]`` → ``[("a.jsonl", ["line 3: problem", ...]), ...]``, files in order.

    A record without a line (a ``.txt`` file: the whole file is the record) is its own group.
    """
    groups: dict[str, list[str]] = {}
    for record in records:
        m = _WHERE.fullmatch(record)
        if m is None:
            where, _, problem = record.partition(": ")
            groups.setdefault(where, []).append(problem)
            continue
        at = m["at"] if m["at"].startswith("row") else f"line {m['at']}"
        groups.setdefault(m["file"], []).append(f"{at}: {m['problem']}")
    return list(groups.items())


def bad_record_lines(records: list[str], total: int, named: str | None = None) -> list[str]:
    """The listed bad records one per line under their file's path (issue 17), then the count of the rest.

    ``named``: a path the caller has already named; records of that file alone are listed without it.
    """
    groups = group_bad_records(records)
    once = len(groups) == 1 and groups[0][0] == named
    lines = []
    for path, items in groups:
        if not once:
            lines.append(f"  {path}:")
        lines += [f"  {item}" if once else f"    {item}" for item in items]
    if total > len(records):
        lines.append(f"  and {total - len(records):,} more")
    return lines


def bad_records_message(label: str, records: list[str], total: int) -> str:
    """The error for bad records: one sentence for one, else the count, then one record per line."""
    fix = "fix {}, or pass --on-bad-record skip to skip bad records"
    if total == 1:
        return f"{records[0]} ({fix.format('it')})"
    head = f"{total:,} bad records in {label} ({fix.format('them')}):"
    return "\n".join([head, *bad_record_lines(records, total, named=label)])


def _needed(opts: IngestOptions, spec: SliceSpec) -> list[str]:
    needed = [opts.text_field, opts.time_field, opts.id_field] + ([spec.field] if spec.kind == "field" else [])
    return list(dict.fromkeys(needed))


#: flush every writer once this many token bytes are buffered across them
_FLUSH_BYTES = 32 * 2**20


def _pack(src, opts, spec, scan: _Scan, slices, slice_of, split_of, tmp: Path, tokenizer, progress) -> list[dict]:
    dtype = token_dtype(tokenizer.vocab_size)
    sep = tokenizer.separator_id
    writers = []
    for i, _ in enumerate(slices):
        (tmp / f"{i:03d}").mkdir(parents=True)
        writers.append([PackWriter(tmp / f"{i:03d}" / f"{s}.arrow", dtype, sep, opts.block_size) for s in SPLITS])
    max_bytes = opts.read_options().max_document_bytes
    status = scan.status
    doc = 0
    buffered = 0
    total = len(scan.times_)
    for i, (where, fields, _) in enumerate(src.records(_needed(opts, spec))):
        if status[i] != 1:
            continue
        if progress and doc % 256 == 0:
            progress("pack", doc, total)
        text, nbytes, _, _ = _extract(fields, opts, spec, max_bytes, where)
        s = slice_of[doc]
        if s >= 0:
            w = writers[s][split_of[doc]]
            tokens = encode_array(tokenizer, text)
            w.add(tokens, nbytes)
            buffered += tokens.nbytes
            if buffered > _FLUSH_BYTES:
                for ws3 in writers:
                    for w in ws3:
                        w.flush()
                buffered = 0
        doc += 1
    if doc != total:  # the source changed between the two passes
        raise UserError(f"{src.label} changed while it was being ingested; run the ingest again")
    if progress:
        progress("pack", total, total)
    entries = []
    times = scan.times
    for i, (sl, ws3) in enumerate(zip(slices, writers, strict=True)):
        counts = {split: w.finish() for split, w in zip(SPLITS, ws3, strict=True)}
        t = times[sl.members]
        entries.append(
            {
                "name": sl.name,
                "dir": f"{i:03d}",
                "start": format_time(int(t.min())),
                "end": format_time(int(t.max())),
                "documents": len(sl.members),
                "bytes": int(sum(c["bytes"] for c in counts.values())),
                "splits": {
                    # file: size + sha256 of the cache file, checked on first read (issue 10)
                    k: {
                        "documents": c["documents"],
                        "bytes": c["bytes"],
                        "tokens": c["tokens"],
                        "file": file_record(tmp / f"{i:03d}" / f"{k}.arrow"),
                    }
                    for k, c in counts.items()
                },
            }
        )
    return entries
