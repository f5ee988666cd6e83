"""The README's result figures come from RESULTS.md (issue 16): every number in its results block must
appear there, so a re-run that changes RESULTS.md and forgets the README fails here."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NUMBER = re.compile(r"[+-−]?\d+\.\d+|\d+%")


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
