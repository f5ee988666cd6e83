"""benchmarks/equal_memory.py and sweep.phase_cost (issue 24): the rows' bases, reused runs, the cost table."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # equal_memory.py imports its sibling sweep.py
_spec = importlib.util.spec_from_file_location("equal_memory", ROOT / "benchmarks" / "equal_memory.py")
equal_memory = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(equal_memory)
import sweep  # noqa: E402


def test_every_row_continues_its_pools_base_and_the_long_stream_has_48_slices_or_more(tmp_path):
    bases = {"small": tmp_path / "small.safetensors", "big": tmp_path / "big.safetensors"}
    entries = equal_memory.plan(list(equal_memory.ROWS), equal_memory.PROTOCOLS["long"], bases)
    for e in entries:
        assert e["base"] == str(bases[equal_memory.ROWS[e["name"]][2]])
        assert e["seeds"] == [0, 1] and e["stream"] == "sotu-long"
    assert {e["name"]: e["base"] for e in entries}["replay-50"] == str(bases["big"])  # equal memory: start big
    slices = e["slice"].removeprefix("eras:").split(",")
    assert len(slices) >= 48 and slices == sorted(slices)


def test_another_corpus_rows_name_its_stream_source_and_slicing(tmp_path):
    bases = {"small": tmp_path / "small.safetensors", "big": tmp_path / "debian-128.safetensors"}
    stream = {"stream": "debian", "source": str(tmp_path / "d.jsonl"), "slice": "eras:2019,2021"}
    entries = equal_memory.plan(["naive", "lifelong"], equal_memory.PROTOCOLS["eras"], bases, stream)
    assert all(e["stream"] == "debian" and e["source"] == stream["source"] for e in entries)
    assert all(e["slice"] == "eras:2019,2021" and e["base"] == str(bases["big"]) for e in entries)
    assert [e["seeds"] for e in entries] == [[0, 1, 2]] * 2


def test_imported_records_take_their_label_once(tmp_path):
    source = tmp_path / "sweep-results.json"
    source.write_text(json.dumps([{"name": "big-x", "seed": 0, "v": 1}, {"name": "other", "seed": 0}]))
    out = tmp_path / "out.json"
    out.write_text(json.dumps([{"name": "lifelong", "seed": 1}]))
    for _ in range(2):  # a second import adds nothing
        equal_memory.import_records(f"{source}:lifelong=big-x", out)
    got = json.loads(out.read_text())
    assert [(r["name"], r["seed"]) for r in got] == [("lifelong", 1), ("lifelong", 0)]
    assert got[1]["v"] == 1 and got[1]["reused_from"] == "sweep-results.json: big-x"


def test_phase_cost_and_the_cost_rows_by_hand(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    lines = [{"phase": 0, "tok_s": t} for t in (100.0, 200.0, 400.0)] + [{"phase": 1, "tok_s": 50.0}]
    metrics.write_text("".join(json.dumps(x) + "\n" for x in lines))
    phase = lambda experts, active: SimpleNamespace(  # noqa: E731
        train_tokens=300, num_experts=experts, params=10 * experts, active_params=active
    )
    results = SimpleNamespace(phases=[phase(8, 5), phase(16, 6)])
    cost = sweep.phase_cost(metrics, results, [1000, 3000], layers=2)
    # 100 tokens per step (300 over 3 steps): 1000 / 200 tok/s is the median step, 500 ms; phase 1: 300 tokens, 6 s
    assert [c["ms_per_step"] for c in cost] == [500.0, 6000.0]
    assert [c["experts_per_layer"] for c in cost] == [4, 8] and [c["run_bytes"] for c in cost] == [1000, 3000]
    records = [{"name": "lifelong", "phase_cost": cost}, {"name": "lifelong", "phase_cost": cost}]
    (row,) = equal_memory.cost_rows(records)
    assert row["ms_first"] == 500.0 and row["ms_last"] == 6000.0 and row["active_last"] == 6 and row["mb_last"] == 0.003


def test_the_section_is_replaced_in_place_and_its_reading_kept(tmp_path):
    md = tmp_path / "RESULTS.md"
    md.write_text("# R\n\n## Eq\n\nold table\n\n### Reading\n\nby hand\n\n## Other\n\nx\n")
    equal_memory.replace_section("## Eq\n\nnew table\n", md)
    assert md.read_text() == "# R\n\n## Eq\n\nnew table\n\n### Reading\n\nby hand\n\n## Other\n\nx\n"
    equal_memory.replace_section("## Long\n\nlong table\n", md)
    assert md.read_text().endswith("## Other\n\nx\n\n## Long\n\nlong table\n")
