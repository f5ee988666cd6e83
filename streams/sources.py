"""Read a source into a stream of raw records, one at a time (bounded memory), with their location.

A source is a JSONL / CSV / Parquet file, a folder of such files, a folder of ``.txt`` files (one
document per file, time from the file name), or a Hugging Face dataset (``hf:NAME[:CONFIG]`` or a
local ``datasets`` save directory). Every source yields ``(where, fields, problem)`` triples:
``where`` is "file:line" (or "file:row N", "name[split]:row N"), ``fields`` the record's fields as a
dict (``None`` when the record could not be parsed) and ``problem`` the reason it could not. Problems
that make the whole source unreadable (missing, empty, binary, not UTF-8, no such column) raise
``UserError`` at once; the caller turns per-record problems into a report.

JSONL is read line by line in binary and decoded per line, so a decoding error names its line; a
line longer than the document limit is refused before it is held in memory.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from lifelong_peer.errors import UserError

Triple = tuple[str, "dict | None", "str | None"]
TABULAR = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet"}
_UTF8 = ("utf-8", "utf8", "utf-8-sig", "utf_8")
_BOMS = {b"\xff\xfe": "UTF-16", b"\xfe\xff": "UTF-16"}


@dataclass
class ReadOptions:
    """How to read the files of a source."""

    encoding: str = "utf-8"
    """text encoding of the files; a UTF-8 byte-order mark is accepted either way"""
    max_document_bytes: int = 16 * 2**20
    """a document (or a line / CSV field / .txt file) larger than this is an error, not an OOM"""
    time_from_name: str | None = None
    """for .txt folders: a regex on the file name; its group ``time`` (or group 1, or the whole match) is the time"""
    hf_split: str | None = None
    """for Hugging Face datasets: read only this split (default: all splits, in order)"""


class FileSource:
    """JSONL / CSV / Parquet files (a mixture is allowed), read in the given order."""

    def __init__(self, label: str, files: list[Path], base: Path, opts: ReadOptions):
        self.label, self.files, self.base, self.opts = label, files, base, opts

    def rel(self, path: Path) -> str:
        return str(path) if self.base == path else str(path.relative_to(self.base.parent))

    def fingerprint(self) -> str:
        return _hash_files(self.files, self.base)

    def columns(self) -> list[str] | None:
        """The columns every file has (None when a JSONL file is involved: JSON records have no schema)."""
        common: list[str] | None = None
        for path in self.files:
            kind = TABULAR[path.suffix.lower()]
            if kind == "jsonl":
                return None
            cols = _csv_header(path, self.opts) if kind == "csv" else _parquet_file(path).schema_arrow.names
            common = cols if common is None else [c for c in common if c in cols]
        return common

    def records(self, needed: list[str]) -> Iterator[Triple]:
        for path in self.files:
            kind = TABULAR[path.suffix.lower()]
            if kind == "parquet":
                yield from _parquet_records(path, self.rel(path), needed)
            else:
                _check_text_file(path, self.opts)
                reader = _jsonl_records if kind == "jsonl" else _csv_records
                yield from reader(path, self.rel(path), self.opts)


class TxtFolderSource:
    """One document per ``.txt`` file; its time comes from the file name (``--time-from-name``)."""

    def __init__(self, label: str, files: list[Path], base: Path, opts: ReadOptions):
        self.label, self.files, self.base, self.opts = label, files, base, opts
        try:
            self.pattern = re.compile(opts.time_from_name or "")
        except re.error as e:
            raise UserError(f"--time-from-name {opts.time_from_name!r} is not a valid regex ({e})") from None

    def fingerprint(self) -> str:
        return _hash_files(self.files, self.base)

    def columns(self) -> list[str]:
        return ["text", "time", "id"]

    def records(self, needed: list[str]) -> Iterator[Triple]:
        for path in self.files:
            rel = str(path.relative_to(self.base)) if path != self.base else path.name
            size = path.stat().st_size
            _check_text_file(path, self.opts)
            if size > self.opts.max_document_bytes:
                raise UserError(_too_large(rel, size, self.opts))
            m = self.pattern.search(path.name)
            if not m:
                yield rel, None, f"file name does not match --time-from-name {self.pattern.pattern!r}"
                continue
            time = m.group("time") if "time" in self.pattern.groupindex else m.group(1 if m.groups() else 0)
            yield rel, {"text": _decode_whole(path, rel, self.opts), "time": time, "id": rel}, None


class HFSource:
    """A Hugging Face ``datasets`` Dataset or DatasetDict, read through ``datasets`` (Arrow, memory-mapped)."""

    def __init__(self, label: str, dataset, opts: ReadOptions):
        import datasets

        self.label = label
        if isinstance(dataset, (datasets.DatasetDict, datasets.IterableDatasetDict)):
            if opts.hf_split is not None:
                if opts.hf_split not in dataset:
                    raise UserError(f"{label} has no split {opts.hf_split!r} (splits: {', '.join(dataset)})")
                self.parts = [(opts.hf_split, dataset[opts.hf_split])]
            else:
                self.parts = list(dataset.items())
        else:
            self.parts = [(opts.hf_split or "data", dataset)]

    def fingerprint(self) -> str:
        parts = [f"{name}:{getattr(ds, '_fingerprint', None)}" for name, ds in self.parts]
        return hashlib.sha256("|".join(parts).encode()).hexdigest()

    def columns(self) -> list[str]:
        common = None
        for _, ds in self.parts:
            cols = list(ds.column_names or [])
            common = cols if common is None else [c for c in common if c in cols]
        return common or []

    def records(self, needed: list[str]) -> Iterator[Triple]:
        for split, ds in self.parts:
            row = 0
            cols = [c for c in needed if c in ds.column_names]
            for batch in ds.select_columns(cols).iter(batch_size=256):
                n = len(batch[cols[0]]) if cols else 0
                for i in range(n):
                    row += 1
                    yield f"{self.label}[{split}]:row {row}", {c: batch[c][i] for c in cols}, None


class RecordSource:
    """Records built in Python (the shipped default stream): ``(where, fields)`` pairs and a fingerprint."""

    def __init__(self, label: str, records: list[tuple[str, dict]], fingerprint: str):
        self.label, self._records, self._fingerprint = label, records, fingerprint

    def fingerprint(self) -> str:
        return self._fingerprint

    def columns(self) -> list[str]:
        return sorted({k for _, r in self._records for k in r})

    def records(self, needed: list[str]) -> Iterator[Triple]:
        for where, fields in self._records:
            yield where, fields, None


# -- opening a source ------------------------------------------------------------------------------
def open_source(source: str, opts: ReadOptions):
    """A SOURCE argument → a source object; ``UserError`` if it does not exist or is not readable."""
    if source.startswith("hf:"):
        return _open_hub(source, opts)
    path = Path(source)
    if not path.exists():
        raise UserError(f"source {source} does not exist")
    if path.is_dir():
        if any((path / f).exists() for f in ("dataset_info.json", "dataset_dict.json", "state.json")):
            return _open_saved(path, opts)
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        if opts.time_from_name is not None:
            txt = [p for p in files if p.suffix.lower() == ".txt"]
            if not txt:
                raise UserError(f"{path} has no .txt files (--time-from-name reads a folder of .txt files)")
            return TxtFolderSource(str(path), txt, path, opts)
        tab = [p for p in files if p.suffix.lower() in TABULAR]
        if not tab:
            if any(p.suffix.lower() == ".txt" for p in files):
                raise UserError(f"{path} is a folder of .txt files: pass --time-from-name REGEX to date them")
            found = ", ".join(sorted({p.suffix or p.name for p in files})) or "nothing"
            raise UserError(f"{path} has no .jsonl, .csv or .parquet files (found: {found})")
        return FileSource(str(path), tab, path, opts)
    suffix = path.suffix.lower()
    if suffix == ".txt":
        if opts.time_from_name is None:
            raise UserError(f"{path} is a .txt file: pass --time-from-name REGEX to date it")
        return TxtFolderSource(str(path), [path], path, opts)
    if suffix not in TABULAR:
        raise UserError(f"{path}: unknown file type {suffix or '(none)'!r} (use .jsonl, .csv, .parquet or .txt)")
    return FileSource(str(path), [path], path, opts)


_REPO_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")


def _open_hub(source: str, opts: ReadOptions):
    """``hf:NAME[:CONFIG]`` through ``datasets.load_dataset``. Issue 25: offline, the hub's client retried
    for ~30 s (six lines) before failing; one short probe of the hub fails fast instead, saying how to
    work offline. With HF_HUB_OFFLINE / HF_DATASETS_OFFLINE set, datasets loads from its cache, unprobed."""
    name, _, config = source[3:].partition(":")
    offline = any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in _OFFLINE_VARS)
    if not offline and _REPO_ID.fullmatch(name) and not Path(name).exists():
        from .hf_tokenizer import hub_endpoint, hub_unreachable

        endpoint = hub_endpoint()
        problem = hub_unreachable(f"{endpoint}/api/datasets/{name}")
        if problem:
            raise UserError(
                f"cannot reach the Hugging Face Hub at {endpoint} ({problem}) to load {name!r}; {offline_advice(name)}"
            )
    import datasets

    try:
        ds = datasets.load_dataset(name, config or None)
    except Exception as e:  # datasets raises many types (FileNotFoundError, ConnectionError, ValueError...)
        advice = f"; {offline_advice(name)}" if offline else ""
        raise UserError(f"could not load Hugging Face dataset {name!r}: {str(e).splitlines()[0]}{advice}") from None
    return HFSource(source, ds, opts)


_OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


def offline_advice(name: str) -> str:
    """How to ingest Hugging Face dataset ``name`` on a machine without a network (issue 25)."""
    return (
        f"to work offline, save it where there is a network (datasets.load_dataset({name!r}).save_to_disk(DIR)) "
        "and ingest DIR, or ingest a local JSONL, CSV or Parquet file"
    )


def _open_saved(path: Path, opts: ReadOptions):
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:
        raise UserError(f"{path}: not a readable `datasets` save directory ({str(e).splitlines()[0]})") from None
    return HFSource(str(path), ds, opts)


# -- file readers ----------------------------------------------------------------------------------
def _check_text_file(path: Path, opts: ReadOptions) -> None:
    """Refuse empty and binary files up front, with a sentence saying so."""
    with open(path, "rb") as f:
        head = f.read(8192)
    if not head.strip():
        raise UserError(f"{path} is empty")
    if opts.encoding.lower() in _UTF8:
        for bom, name in _BOMS.items():
            if head.startswith(bom):
                raise UserError(f"{path} is {name}, not UTF-8; pass --encoding utf-16 to read it")
        if b"\x00" in head:
            raise UserError(f"{path} looks like a binary file (it contains NUL bytes), not text")


def _decode(raw: bytes, where: str, opts: ReadOptions) -> str:
    enc = opts.encoding
    try:
        return raw.decode("utf-8-sig" if enc.lower() in _UTF8 else enc)
    except UnicodeDecodeError as e:
        raise UserError(
            f"{where}: not valid {enc} (byte 0x{raw[e.start]:02x} at offset {e.start}); "
            "if the file uses another encoding, pass --encoding NAME (e.g. latin-1)"
        ) from None
    except LookupError:
        raise UserError(f"unknown --encoding {enc!r}") from None


def _decode_whole(path: Path, rel: str, opts: ReadOptions) -> str:
    return _decode(path.read_bytes(), rel, opts)


def _too_large(where: str, size: int, opts: ReadOptions) -> str:
    return (
        f"{where}: document of {size:,} bytes is larger than the limit of {opts.max_document_bytes:,} bytes "
        "(raise it with --max-document-mb)"
    )


def _jsonl_records(path: Path, rel: str, opts: ReadOptions):
    # a JSON line escapes its text, so allow some slack over the document limit before refusing it
    limit = 2 * opts.max_document_bytes + 65536
    with open(path, "rb") as f:
        for lineno, raw in enumerate(iter(lambda: f.readline(limit), b""), 1):
            where = f"{rel}:{lineno}"
            if len(raw) >= limit and not raw.endswith(b"\n"):
                raise UserError(_too_large(where, len(raw), opts).replace("document of", "line of at least"))
            # without its line break: parsed with it, an error at the end of the line is "line 2 column 1"
            line = _decode(raw, where, opts).rstrip("\r\n")
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                yield where, None, f"malformed JSON ({_json_error(e, line)})"
                continue
            if not isinstance(record, dict):
                yield where, None, f"{json_kind(record)}, not a JSON object"
                continue
            yield where, record, None


def _json_error(e: json.JSONDecodeError, line: str) -> str:
    """The decoder's message with the column in the line (1-based, in characters)."""
    at = f"{e.msg} column" if e.msg.endswith(" at") else f"{e.msg} at column"  # "Unterminated string starting at"
    end = ", the end of the line" if e.pos >= len(line.rstrip()) else ""
    return f"{at} {e.pos + 1}{end}"


def json_kind(value: object) -> str:
    """What a parsed JSON value is, in JSON's words with its article: ``a number (42)``, ``an array``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({'true' if value else 'false'})"
    if isinstance(value, (int, float)):
        return f"a number ({value!r})" if len(repr(value)) <= 24 else "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return f"a {type(value).__name__} value"


def _csv_header(path: Path, opts: ReadOptions) -> list[str]:
    _check_text_file(path, opts)
    with _open_csv(path, opts) as f:
        try:
            return next(csv.reader(f), [])
        except UnicodeDecodeError:
            raise UserError(f"{path}: header is not valid {opts.encoding}; pass --encoding NAME") from None


def _open_csv(path: Path, opts: ReadOptions):
    enc = "utf-8-sig" if opts.encoding.lower() in _UTF8 else opts.encoding
    try:
        return open(path, encoding=enc, newline="")
    except LookupError:
        raise UserError(f"unknown --encoding {opts.encoding!r}") from None


def _csv_records(path: Path, rel: str, opts: ReadOptions):
    csv.field_size_limit(opts.max_document_bytes + 1)
    with _open_csv(path, opts) as f:
        reader = csv.reader(f)
        header: list[str] = []
        try:
            header = next(reader)
            for row in reader:
                where = f"{rel}:{reader.line_num}"
                if not any(cell.strip() for cell in row):
                    continue
                if len(row) != len(header):
                    yield where, None, f"row has {len(row)} fields, the header has {len(header)}"
                    continue
                yield where, dict(zip(header, row, strict=True)), None
        except UnicodeDecodeError as e:
            raise UserError(
                f"{rel}:{reader.line_num + 1}: not valid {opts.encoding} (byte 0x{e.object[e.start]:02x}); "
                "if the file uses another encoding, pass --encoding NAME (e.g. latin-1)"
            ) from None
        except csv.Error as e:
            if "field larger than field limit" in str(e):
                raise UserError(_too_large(f"{rel}:{reader.line_num}", opts.max_document_bytes + 1, opts)) from None
            raise UserError(f"{rel}:{reader.line_num}: malformed CSV ({e})") from None


def _parquet_file(path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise UserError(f"{path}: not a readable Parquet file ({e})") from None


def _parquet_records(path: Path, rel: str, needed: list[str]):
    pf = _parquet_file(path)
    cols = [c for c in needed if c in pf.schema_arrow.names]
    row = 0
    for batch in pf.iter_batches(batch_size=256, columns=cols):
        data = batch.to_pydict()
        for i in range(batch.num_rows):
            row += 1
            yield f"{rel}:row {row}", {c: data[c][i] for c in cols}, None


def _hash_files(files: list[Path], base: Path) -> str:
    h = hashlib.sha256()
    for path in files:
        h.update(f"{path.relative_to(base) if path != base else path.name}\0".encode())
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()
