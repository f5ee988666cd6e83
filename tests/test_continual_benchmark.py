"""benchmarks/continual.py (issue 16): records that no longer train as their plan entry does run again."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # continual.py imports its sibling sweep.py
_spec = importlib.util.spec_from_file_location("continual", ROOT / "benchmarks" / "continual.py")
continual = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(continual)


def test_a_record_whose_preset_changed_is_dropped_and_the_others_are_kept(tmp_path, capsys):
    entries = continual.plan(["naive", "replay"], 2, argparse.Namespace(stream="sotu"))
    replay = continual.resolved("replay", {})
    out = tmp_path / "results.json"
    records = [
        {"name": "naive", "seed": 0, "train": continual.resolved("naive", {})},  # as the preset is now
        {"name": "replay", "seed": 0, "train": {**replay, "replay": replay["replay"] / 2}},  # an older preset
        {"name": "replay", "seed": 1},  # from before records kept their TrainConfig: cannot be checked
        {"name": "other", "seed": 0, "train": {}},  # not in the plan: left alone
    ]
    out.write_text(json.dumps(records))
    continual.drop_stale(out, entries)
    kept = [(r["name"], r["seed"]) for r in json.loads(out.read_text())]
    assert kept == [("naive", 0), ("replay", 1), ("other", 0)]
    assert "replay seed 0 is stale (replay changed)" in capsys.readouterr().out


def test_another_streams_table_replaces_its_own_section_and_keeps_the_rest(tmp_path):
    md = tmp_path / "RESULTS.md"
    md.write_text("# Results\n\n## Strategies on sotu\n\nsotu table\n\n## Fig. 3a\n\nreading\n")
    continual.replace_section("## Strategies on debian\n\nfirst table\n", "debian", md)
    continual.replace_section("## Strategies on debian\n\nsecond table\n", "debian", md)
    text = md.read_text()
    assert "second table" in text and "first table" not in text
    assert text.index("sotu table") < text.index("reading") < text.index("second table")  # appended after the rest
    md.write_text(text + "\n## Notes\n\nkept\n")
    continual.replace_section("## Strategies on debian\n\nthird table\n", "debian", md)
    assert md.read_text().endswith("third table\n\n## Notes\n\nkept\n")


def test_the_sotu_table_is_rewritten_in_place_and_every_later_section_kept(tmp_path):
    md = tmp_path / "RESULTS.md"
    md.write_text(
        "# old title\n\nold protocol\n\n## Strategies on sotu\n\nold table\n\n## Reading\n\nby hand\n\n## Paper\n\nx\n"
    )
    out = tmp_path / "results.json"
    out.write_text(json.dumps([{"wall_s": 10.0}, {"wall_s": 20.0}]))
    continual.write_results_md("## Strategies on sotu\n\nnew table\n", out, md)
    text = md.read_text()
    assert "old table" not in text and "old protocol" not in text and "runs took 10–20 s" in text
    assert text.index("new table") < text.index("## Reading\n\nby hand\n") < text.index("## Paper\n\nx\n")
    assert text.endswith("## Paper\n\nx\n")
