"""Hostile inputs (issue 10): random bytes, random JSON records, random command lines and random
configs. Every outcome is success or a clean user error — never a traceback, a hang, or a half-made
workspace. Example counts are modest so the file stays quick; raise them locally to dig deeper."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from lifelong_peer.config import TrainConfig, load_config_file, resolve_config
from lifelong_peer.errors import UserError
from lifelong_peer.model import ModelConfig
from lifelong_peer.workspace import Workspace

FAST = settings(max_examples=25, suppress_health_check=[HealthCheck.function_scoped_fixture])
GOOD = "".join(json.dumps({"text": f"document {i} " * 8, "time": f"{2000 + i % 3}-02-01"}) + "\n" for i in range(12))

json_scalars = st.none() | st.booleans() | st.integers(-(10**20), 10**20) | st.floats() | st.text(max_size=12)
json_values = st.recursive(
    json_scalars, lambda v: st.lists(v, max_size=3) | st.dictionaries(st.text(max_size=4), v, max_size=3), max_leaves=6
)
times = st.one_of(
    st.sampled_from(["2001", "2001-05", "2001-05-03", "2001-05-03T10:00:00Z", "1e30", "-1", "", "May 2001", "9999-99"]),
    st.integers(-(10**20), 10**20),
    st.floats(),
    json_values,
)
records = st.fixed_dictionaries(
    {},
    optional={
        "text": st.text(max_size=40) | json_values,
        "time": times,
        "id": st.text(max_size=6) | st.integers(),
        "extra": json_values,
    },
)


@contextlib.contextmanager
def workspace():
    with tempfile.TemporaryDirectory() as tmp:
        yield Workspace.init(Path(tmp) / "ws"), Path(tmp)


def _snapshot(ws: Workspace) -> tuple[dict, list[str]]:
    return ws.manifest(), sorted(str(p.relative_to(ws.root)) for p in ws.root.rglob("*") if ".lock" not in p.name)


def _ingest_is_clean(ws: Workspace, source: Path, **options) -> None:
    """``ingest`` succeeds and lists the stream, or raises UserError and leaves the workspace as it was."""
    from lifelong_peer.streams import ingest

    before = _snapshot(ws)
    try:
        summary = ingest(ws, str(source), "fuzz", **options)
    except UserError as e:
        first, *records = str(e).strip().split("\n")  # one sentence (then one indented line per bad record)
        assert first and all(line.startswith("  ") for line in records)
        assert _snapshot(ws) == before  # no half-made stream, no temp folder, manifest unchanged
        return
    stream = ws.manifest()["streams"]["fuzz"]
    assert summary["documents"] == stream["documents"] > 0
    assert (ws.root / stream["dir"] / "stream.json").is_file()


@FAST
@given(data=st.binary(max_size=3000), suffix=st.sampled_from([".jsonl", ".csv", ".txt"]))
def test_random_bytes_are_ingested_or_refused_cleanly(data, suffix):
    with workspace() as (ws, tmp):
        source = tmp / f"source{suffix}"
        if suffix == ".txt":  # a folder of text files, dated by name
            source = tmp / "texts"
            source.mkdir()
            (source / "2001-01-01.txt").write_bytes(data)
            _ingest_is_clean(ws, source, time_from_name=r"\d{4}-\d\d-\d\d")
        else:
            source.write_bytes(data)
            _ingest_is_clean(ws, source)


@FAST
@given(
    rows=st.lists(records, min_size=0, max_size=12),
    skip=st.booleans(),
    slice_=st.sampled_from(["year", "month", "quantiles:2", "eras:2000,2001", "field:extra"]),
)
def test_random_json_records_are_ingested_or_refused_cleanly(rows, skip, slice_):
    with workspace() as (ws, tmp):
        source = tmp / "records.jsonl"
        source.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        _ingest_is_clean(ws, source, on_bad_record="skip" if skip else "error", slice=slice_)


# --- random command lines --------------------------------------------------------------------------

WORDS = [
    "ingest", "streams", "init", "run", "info", "--name", "--slice", "--split", "--text-field", "--time-field",
    "--id-field", "--on-bad-record", "--block-size", "--max-document-mb", "--encoding", "--format", "json",
    "human", "--replace", "--strategy", "--resume", "--steps", "--config", "--workspace", "--stream", "year",
    "quarter", "eras:2001", "quantiles:0", "field:", "skip", "error", "-1", "0", "1e400", "nan", "0.9,0.05,0.05",
    "1,2", "utf-16", "no-such-codec", "{good}", "{bad}", "{missing}", "{dir}", "{toml}", "--help",
]  # fmt: skip
SAFE_TEXT = st.text(alphabet="abcXYZ019_.,:=-", max_size=8).filter(
    lambda t: not t.startswith("hf") and t != "--default"
)


@FAST
@given(argv=st.lists(st.sampled_from(WORDS) | SAFE_TEXT, max_size=8))
def test_random_command_lines_end_in_success_or_one_clean_error(argv, monkeypatch, capsys):
    from lifelong_peer.cli.main import main

    with workspace() as (ws, tmp):
        (tmp / "good.jsonl").write_text(GOOD)
        (tmp / "bad.jsonl").write_bytes(b"\x00\xff{]\n" * 3)
        (tmp / "dir").mkdir()
        (tmp / "run.toml").write_text("[train]\nsteps = 'many'\n[model]\ndim = -1\n")
        paths = {"good": tmp / "good.jsonl", "bad": tmp / "bad.jsonl", "missing": tmp / "missing.jsonl"}
        paths |= {"dir": tmp / "dir", "toml": tmp / "run.toml"}
        args = [a.format(**paths) if a.startswith("{") else a for a in argv]
        monkeypatch.chdir(tmp)
        monkeypatch.setenv("LPEER_WORKSPACE", str(ws.root))
        monkeypatch.setattr(sys, "argv", ["lpeer", *args])
        capsys.readouterr()
        try:
            main()
            code = 0
        except SystemExit as e:
            code = e.code or 0
        err = capsys.readouterr().err
        assert code in (0, 2), (args, code, err)
        assert "Traceback" not in err and "internal error" not in err, (args, err)
        if err.lstrip().startswith("error:"):  # one sentence (then one indented line per bad record)
            assert all(line.startswith("  ") for line in err.strip().split("\n")[1:]), (args, err)
        Workspace.open(ws.root)  # the manifest is still valid


# --- configs ------------------------------------------------------------------------------------

TRAIN_KEYS = [f.name for f in dataclasses.fields(TrainConfig)]
MODEL_KEYS = [f.name for f in dataclasses.fields(ModelConfig)]
PEER_KEYS = ["dim", "num_subkeys", "heads", "topk", "dim_key", "query_norm", "activation", "new_expert_init"]
toml_scalars = st.booleans() | st.integers(-(10**15), 10**15) | st.floats(allow_nan=False) | st.text(max_size=8)
config_values = (
    toml_scalars | st.lists(st.integers(0, 10**12), max_size=3) | st.sampled_from([0, 1, 10**12, "auto", "8"])
)


def _toml(tables: dict) -> str:
    """A TOML document (JSON's scalars and arrays are TOML's, except inf, which TOML spells inf)."""

    def value(v):
        return json.dumps(v).replace("Infinity", "inf")

    lines = []
    for table, entries in tables.items():
        lines.append(f"[{table}]")
        lines += [f"{json.dumps(k)} = {value(v)}" for k, v in entries.items()]
    return "\n".join(lines) + "\n"


config_tables = st.fixed_dictionaries(
    {},
    optional={
        "train": st.dictionaries(st.sampled_from(TRAIN_KEYS) | st.text(max_size=5), config_values, max_size=4),
        "model": st.dictionaries(st.sampled_from(MODEL_KEYS) | st.text(max_size=5), config_values, max_size=3),
        "model.peer": st.dictionaries(st.sampled_from(PEER_KEYS), config_values, max_size=3),
        "other": st.dictionaries(st.text(max_size=3), toml_scalars, max_size=1),
    },
)


@FAST
@given(data=st.binary(max_size=400) | config_tables.map(_toml).map(str.encode))
def test_config_file_parser_answers_every_file(data):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "run.toml"
        path.write_bytes(data)
        try:
            config = load_config_file(path)
        except UserError as e:
            assert str(e).startswith(str(path)) and "\n" not in str(e)
            return
        assert set(config) == {"train", "model", "attach"}


@FAST
@example(model={"peer": 3})
@given(model=st.dictionaries(st.sampled_from(MODEL_KEYS) | st.text(max_size=5), config_values, max_size=4))
def test_model_config_from_dict_raises_only_value_or_type_errors(model):
    try:
        config = ModelConfig.from_dict(model)
    except (ValueError, TypeError):
        return
    assert config.peer.num_experts <= 2**34


known_tables = st.fixed_dictionaries(
    {
        "train": st.dictionaries(st.sampled_from(TRAIN_KEYS), config_values, max_size=3),
        "model": st.dictionaries(st.sampled_from(MODEL_KEYS), config_values, max_size=2),
        "model.peer": st.dictionaries(st.sampled_from(PEER_KEYS), config_values, max_size=2),
    }
)


@FAST
@example(tables={"train": {"steps": "many"}, "model": {}, "model.peer": {}}, strategy="naive")
@given(tables=known_tables, strategy=st.sampled_from(["naive", "lifelong", "dense"]))
def test_resolve_config_answers_every_config_with_a_user_error(tables, strategy):
    model = {**tables["model"], "peer": tables["model.peer"]}
    try:
        resolve_config(strategy, {**tables["train"], "model": model}, ModelConfig())
    except UserError as e:
        assert "\n" not in str(e)


def test_fuzz_helpers_see_a_good_file_as_good():
    """The harness itself: a valid source ingests, so the properties above are not vacuous."""
    with workspace() as (ws, tmp):
        (tmp / "good.jsonl").write_text(GOOD)
        _ingest_is_clean(ws, tmp / "good.jsonl")
        assert "fuzz" in ws.manifest()["streams"]
