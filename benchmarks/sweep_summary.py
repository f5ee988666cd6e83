"""Print a sweep's validation numbers next to the reference strategies' (choices are made on these)."""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np


def main() -> None:
    split = "validation"
    rows = defaultdict(list)
    for path in sys.argv[1:]:
        if Path(path).exists():
            for r in json.loads(Path(path).read_text()):
                rows[r["name"]].append(r)
    joint = [r[split]["gain"] for r in rows.get("joint", [])]
    naive = rows.get("naive", [])
    jg = np.mean(joint) if joint else float("nan")
    nf = np.mean([r[split]["forgetting"] for r in naive]) if naive else float("nan")
    nn = np.mean([r[split]["newest"] for r in naive]) if naive else float("nan")
    print(f"{split}: joint gain {jg:.4f}, naive forgetting {nf:+.4f}, naive newest {nn:.4f}")
    print(
        f"{'name':22s} {'n':>2s} {'final':>7s} {'gain':>7s} {'share':>6s} {'forg':>7s} {'f/naive':>7s} {'newest':>7s} {'vs nv':>6s} min-own"
    )
    for name, rs in sorted(rows.items(), key=lambda kv: np.mean([r[split]["final_avg"] for r in kv[1]])):
        m = {k: np.mean([r[split][k] for r in rs]) for k in ("final_avg", "gain", "forgetting", "newest")}
        own = min(min(r[split]["own_gain"]) for r in rs)
        print(
            f"{name:22s} {len(rs):2d} {m['final_avg']:7.4f} {m['gain']:7.4f} {m['gain'] / jg:6.0%} {m['forgetting']:+7.4f} "
            f"{m['forgetting'] / nf:7.0%} {m['newest']:7.4f} {m['newest'] / nn - 1:+6.1%} {own:+.3f}"
        )


if __name__ == "__main__":
    main()
