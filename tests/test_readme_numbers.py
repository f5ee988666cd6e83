"""The README's result figures come from results files: every number in its results block must appear in
RESULTS.md (issue 16), and its demo paragraph is the demo's shipped results, benchmarks/results/demo.json
(issue 25) — a re-run that changes them and forgets the README fails here."""

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NUMBER = re.compile(r"[+\-−]?\d+\.\d+%?|\d+%")  # a signed decimal or a percentage (the sign: ASCII or U+2212)


def _block() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return text.split("<!-- results:start -->")[1].split("<!-- results:end -->")[0]


def test_readme_results_block_quotes_results_md():
    results = (ROOT / "RESULTS.md").read_text(encoding="utf-8")
    numbers = NUMBER.findall(_block())
    assert len(numbers) >= 10, numbers  # the block is a table of results, not prose
    missing = [n for n in numbers if n.replace("−", "-") not in results]
    assert not missing, f"README numbers not in RESULTS.md: {missing}"


def test_the_check_catches_a_stale_number():
    results = "| naive | 2.1132 | +0.0765 | 63% |"
    assert all(n in results for n in NUMBER.findall("2.1132 +0.0765 63%"))
    assert not all(n in results for n in NUMBER.findall("1.9280 +0.0765 63%"))


def _demo_paragraph() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return text.split("<!-- demo:start -->")[1].split("<!-- demo:end -->")[0]


def _demo_figures(record: dict) -> set[str]:
    """Every figure the demo paragraph may quote, formatted as it quotes them, from the demo's results file."""
    rows = {r["strategy"]: r for r in record["comparison"]["runs"]}
    base, naive, lifelong = rows["base"], rows["naive"], rows["lifelong"]
    figures = {f"{r['final_avg_bpb']:.4f}" for r in (base, naive, lifelong)}
    figures |= {f"{r['newest_bpb']:.4f}" for r in (naive, lifelong)}
    figures |= {f"{r['avg_forgetting_bpb']:+.4f}" for r in (naive, lifelong)}
    figures.add(f"{abs(lifelong['newest_bpb'] / naive['newest_bpb'] - 1):.1%}")
    return figures


def test_the_stated_tolerance_is_the_demo_s_difference_across_builds():
    """The reproduction paragraph's figures: how far the demo through the pure-PyTorch path ended from the
    native build, on the final averages and the newest era, beside the gaps between the strategies."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = text.split("<!-- reproduce:start -->")[1].split("<!-- reproduce:end -->")[0]
    results = ROOT / "benchmarks" / "results"
    native, pure = (json.loads((results / f).read_text()) for f in ("demo.json", "demo-pure-pytorch.json"))
    assert native["machine"]["native_kernels"]["native"] and not pure["machine"]["native_kernels"]["native"]
    rows = [{r["run"]: r for r in d["comparison"]["runs"]} for d in (native, pure)]
    runs = [run for run, r in rows[0].items() if r["strategy"] != "base"]
    apart = {k: max(abs(rows[0][run][k] - rows[1][run][k]) for run in runs) for k in ("final_avg_bpb", "newest_bpb")}
    assert f"{apart['final_avg_bpb']:.3f} bits per byte on the final averages" in block
    assert f"{apart['newest_bpb']:.3f} on the newest era" in block
    by = {r["strategy"]: r for r in rows[0].values()}
    gaps = [abs(by["naive"][k] - by["lifelong"][k]) for k in ("final_avg_bpb", "newest_bpb")]
    assert f"the gaps between its strategies ({gaps[0]:.3f} and {gaps[1]:.3f})" in block.replace("\n", " ")


def test_the_demo_paragraph_quotes_the_demo_s_results_file():
    record = json.loads((ROOT / "benchmarks" / "results" / "demo.json").read_text(encoding="utf-8"))
    paragraph = _demo_paragraph()
    quoted = [n.replace("−", "-") for n in NUMBER.findall(paragraph)]
    figures = _demo_figures(record)
    assert len(quoted) >= 7 and set(quoted) <= figures, sorted(set(quoted) - figures)
    assert {f"{r['final_avg_bpb']:.4f}" for r in record["comparison"]["runs"]} <= set(quoted)  # the verdict's basis
    rows = {r["strategy"]: r for r in record["comparison"]["runs"]}
    minutes = [round(record["seconds"] / 60), *(round(rows[s]["wall_time_s"] / 60) for s in ("naive", "lifelong"))]
    assert f"took {minutes[0]} minutes" in paragraph and f"naive about {minutes[1]} minutes" in paragraph
    assert f"lifelong about {minutes[2]})" in paragraph
    assert record["machine"]["cpu"]["model"] and record["machine"]["threads"] >= 1  # where it ran (issue 25)
    assert f"seed {record['config']['seed']}" in paragraph and f"{record['config']['steps']} steps" in paragraph
