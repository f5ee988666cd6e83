"""``lpeer init / ingest / streams`` through the typer app, and the error path through ``main()``."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from lifelong_peer.cli.main import app, main

runner = CliRunner()


def _jsonl(path, n=8):
    path.write_text("".join(json.dumps({"text": f"doc {i}", "time": f"20{10 + i % 2}-05-01"}) + "\n" for i in range(n)))
    return str(path)


def test_init_ingest_streams(tmp_path):
    ws = str(tmp_path / "ws")
    assert runner.invoke(app, ["init", ws]).exit_code == 0
    result = runner.invoke(
        app, ["ingest", _jsonl(tmp_path / "a.jsonl"), "--name", "a", "--workspace", ws, "--format", "json"]
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["stream"] == "a" and summary["documents"] == 8
    result = runner.invoke(app, ["streams", "--workspace", ws, "--format", "json"])
    data = json.loads(result.stdout)
    (stream,) = data["streams"]
    assert stream["name"] == "a" and [s["name"] for s in stream["slices"]] == ["2010", "2011"]
    assert set(stream["slices"][0]) == {"name", "start", "end", "documents", "bytes", "tokens"}
    assert set(stream["slices"][0]["tokens"]) == {"train", "validation", "test"}
    human = runner.invoke(app, ["streams", "--workspace", ws])
    assert human.exit_code == 0 and "2010" in human.stdout


def test_streams_table_says_its_split_columns_are_tokens(tmp_path):
    """Issue 17: `lpeer streams` showed train / validation / test columns without saying they count tokens."""
    ws = str(tmp_path / "ws")
    runner.invoke(app, ["init", ws])
    runner.invoke(app, ["ingest", _jsonl(tmp_path / "a.jsonl"), "--name", "a", "--workspace", ws])
    human = runner.invoke(app, ["streams", "--workspace", ws], env={"COLUMNS": "200"})
    header = next(line for line in human.stdout.splitlines() if "slice" in line and "documents" in line)
    assert "train tokens" in header and "validation tokens" in header and "test tokens" in header


def test_skipped_bad_records_name_their_file_once_and_time_unit_is_an_option(tmp_path, capsys, monkeypatch):
    ws = tmp_path / "ws"
    runner.invoke(app, ["init", str(ws)])
    path = tmp_path / "mixed.jsonl"
    path.write_text('{"text": "a", "time": 2001}\n{nope\n{"text": "b", "time": 12}\n' + "{x\n" * 12)
    monkeypatch.setattr(
        sys, "argv", ["lpeer", "ingest", str(path), "--name", "m", "-w", str(ws), "--on-bad-record", "skip"]
    )
    main()
    err = capsys.readouterr().err
    assert err.count("mixed.jsonl") == 1 and "warning: 14 bad record(s) skipped" in err
    assert "\n    line 2: malformed JSON" in err and "\n    line 3: time: bare number 12" in err
    assert err.rstrip().endswith("and 4 more")
    monkeypatch.setattr(
        sys,
        "argv",
        ["lpeer", "ingest", str(path), "--name", "y", "-w", str(ws), "--on-bad-record", "skip", "--time-unit", "year"],
    )
    main()
    assert "line 3" not in capsys.readouterr().err  # 12 is the year 12 when the user says so


def test_workspace_from_environment_and_default_stream(tmp_path, monkeypatch):
    ws = tmp_path / "ws"
    runner.invoke(app, ["init", str(ws)])
    monkeypatch.setenv("LPEER_WORKSPACE", str(ws))
    result = runner.invoke(app, ["ingest", "--default", "--format", "json"])
    assert result.exit_code == 0, result.output
    assert [s["name"] for s in json.loads(result.stdout)["slices"]][-1] == "1970-2026"


def test_help_has_summary_and_example():
    for command in ("init", "ingest", "streams"):
        result = runner.invoke(app, [command, "--help"])
        assert result.exit_code == 0 and "Example: lpeer" in result.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["streams", "--workspace", "{tmp}"], "is not an lpeer workspace (run `"),
        (["ingest", "{tmp}/missing.jsonl", "--name", "x", "--workspace", "{ws}"], "missing.jsonl does not exist"),
        (["ingest", "--workspace", "{ws}"], "give either a SOURCE (with --name) or --default"),
        (["ingest", "{tmp}/bad.jsonl", "--name", "x", "--workspace", "{ws}"], "bad.jsonl:1: malformed JSON"),
    ],
)
def test_user_errors_exit_2_with_one_line(tmp_path, monkeypatch, capsys, args, message):
    ws = tmp_path / "ws"
    runner.invoke(app, ["init", str(ws)])
    (tmp_path / "bad.jsonl").write_text("{oops\n")
    argv = ["lpeer"] + [a.format(tmp=tmp_path, ws=ws) for a in args]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.strip().count("\n") == 0
    assert err.strip().startswith("error:")


def test_messages_with_brackets_are_printed_as_text(tmp_path, monkeypatch, capsys):
    """Field names and values reach error and warning lines; "[/a]" there crashed rich's markup parser."""
    ws = tmp_path / "ws"
    runner.invoke(app, ["init", str(ws)])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"[/a]": 1, "time": 2001}\n')
    monkeypatch.setattr(sys, "argv", ["lpeer", "ingest", str(bad), "--name", "b", "-w", str(ws)])
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 2 and "no field 'text' (fields: [/a], time)" in capsys.readouterr().err
    good = tmp_path / "good.jsonl"
    good.write_text('{"text": "x", "time": 2001, "k": "[/b]"}\n')
    monkeypatch.setattr(sys, "argv", ["lpeer", "ingest", str(good), "--name", "g", "-w", str(ws), "--slice", "field:k"])
    main()
    assert "slice '[/b]' has 1 document(s)" in capsys.readouterr().err


def test_user_text_is_never_read_as_markup_or_emoji_codes(tmp_path, monkeypatch, capsys):
    """Issue 25: `--slice eras:abc` printed `eras🔤 'abc'` (rich read ":abc:" as an emoji code). Paths,
    field names, values and slice names reach errors, warnings, tables and progress lines as they are."""
    ws = tmp_path / "ws"
    runner.invoke(app, ["init", str(ws)])
    docs = tmp_path / ":smile:[b].jsonl"
    docs.write_text('{"text": "x", "time": 2001, "k": ":thumbs_up:[/b]"}\n')

    def run(*args: str) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["lpeer", *args, "-w", str(ws)])
        try:
            main()
            code = 0
        except SystemExit as e:
            code = e.code
        out = capsys.readouterr()
        return code, out.out, out.err

    code, _, err = run("ingest", str(docs), "--name", "x", "--slice", "eras:abc")
    assert code == 2 and "--slice eras:abc: 'abc' is not a time" in err and "🔤" not in err
    code, _, err = run("ingest", str(docs), "--name", "x", "--slice", "field::smile:")
    assert code == 2 and "no field ':smile:'" in err and "😄" not in err
    code, _, err = run("ingest", str(tmp_path / "a:+1:.jsonl"), "--name", "x")
    assert code == 2 and "a:+1:.jsonl does not exist" in err and "👍" not in err
    code, out, err = run("ingest", str(docs), "--name", "x", "--slice", "field:k")
    assert code == 0 and "slice ':thumbs_up:[/b]' has 1 document(s)" in err and ":smile:[b].jsonl" in out
    code, out, _ = run("streams")
    assert code == 0 and ":thumbs_up:[/b]" in out and "👍" not in out


def test_the_consoles_read_no_markup():
    """The one place that decides it (cli/output.py): styles come as Text, never from strings."""
    from lifelong_peer.cli.output import stderr, stdout

    for console in (stdout, stderr):
        with console.capture() as captured:
            console.print("[bold]:smile:[/bold] [/b]")
        assert captured.get().strip() == "[bold]:smile:[/bold] [/b]"


def test_progress_bar_renders_both_passes():
    from lifelong_peer.cli.output import Format
    from lifelong_peer.cli.streams_cmds import _progress

    bar = _progress(Format.human)
    bar.enabled = True
    with bar as update:
        update("scan", 0, None)
        update("scan", 256, None)
        update("pack", 10, 20)
    assert set(bar.tasks) == {"scan", "pack"}
    assert _progress(Format.json).__enter__() is None


@pytest.mark.parametrize("offline", [{"HF_ENDPOINT": "http://127.0.0.1:9"}, {"HF_HUB_OFFLINE": "1"}])
def test_a_hub_source_offline_fails_at_once_saying_how_to_work_offline(tmp_path, offline):
    """Issue 25: offline, `lpeer ingest hf:NAME` printed six retry lines over 30 s before its error. Now one
    line, no retries, with the way to work offline: the hub unreachable (nothing listens on port 9), or
    offline mode with nothing in the cache."""
    ws = tmp_path / "ws"
    runner.invoke(app, ["init", str(ws)])
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")} | {"HF_HOME": str(tmp_path / "hf")}
    done = subprocess.run(
        [sys.executable, "-m", "lifelong_peer.cli", "ingest", "hf:some/dataset", "--name", "x", "-w", str(ws)],
        env=env | offline, capture_output=True, text=True, check=False, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2
    err = done.stderr.strip()
    assert err.startswith("error:") and "\n" not in err and "Retry" not in err, err
    assert "'some/dataset'" in err and "datasets.load_dataset('some/dataset').save_to_disk(DIR)" in err
    assert "ingest DIR, or ingest a local JSONL, CSV or Parquet file" in err
    if "HF_ENDPOINT" in offline:
        assert "cannot reach the Hugging Face Hub at http://127.0.0.1:9" in err
    assert json.loads((ws / "workspace.json").read_text())["streams"] == {}  # nothing changed
