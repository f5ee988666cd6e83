"""Assemble a second dated corpus from the Debian package changelogs installed on this machine (issue 16).

Every installed package ships ``/usr/share/doc/<package>/changelog.Debian.gz``; each entry in it is one
upload, dated by its trailer line (`` -- Name <email>  Mon, 02 Jan 2023 13:06:21 +0100``). One entry is
one document: ``{"id": "<package>/<version>", "time": "YYYY-MM-DD", "text": <the entry>}``, written as
JSON lines. Nothing is downloaded; the corpus is whatever Debian packages are installed here, so it
differs between machines (the output lists the packages it read).

    python scripts/debian_changelogs.py --out /tmp/debian.jsonl [--counts]

Then ``lpeer ingest /tmp/debian.jsonl --name debian --slice eras:...`` (``--counts`` prints bytes per year
to choose era boundaries with balanced sizes).
"""

from __future__ import annotations

import argparse
import collections
import email.utils
import gzip
import json
import re
from pathlib import Path

HEADER = re.compile(r"^(\S+) \(([^)]+)\)")
TRAILER = re.compile(r"^ -- .*?  (.+)$")


def entries(path: Path):
    """(package, version, date, text) of each entry of one changelog.Debian.gz; malformed ones skipped."""
    with gzip.open(path, "rt", encoding="utf-8", errors="replace") as f:
        text = f.read()
    lines, head = [], None
    for line in text.splitlines():
        m = HEADER.match(line)
        if m and head is None:
            head, lines = m.groups(), [line]
            continue
        if head is None:
            continue
        lines.append(line)
        t = TRAILER.match(line)
        if t:
            try:
                date = email.utils.parsedate_to_datetime(t.group(1).strip())
            except (TypeError, ValueError, IndexError):
                date = None
            if date is not None:
                yield head[0], head[1], date.date().isoformat(), "\n".join(lines).strip() + "\n"
            head, lines = None, []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--root", default="/usr/share/doc")
    parser.add_argument("--counts", action="store_true", help="print bytes per year")
    args = parser.parse_args()
    seen, per_year, packages = set(), collections.Counter(), []
    with open(args.out, "w", encoding="utf-8") as out:
        for path in sorted(Path(args.root).glob("*/changelog.Debian.gz")):
            if path.resolve() in seen:  # packages of one source often link one file
                continue
            seen.add(path.resolve())
            packages.append(path.parent.name)
            for package, version, date, text in entries(path):
                out.write(json.dumps({"id": f"{package}/{version}/{date}", "time": date, "text": text}) + "\n")
                per_year[date[:4]] += len(text.encode())
    print(f"{len(packages)} changelogs, {sum(per_year.values()):,} bytes → {args.out}")
    if args.counts:
        for year in sorted(per_year):
            print(year, f"{per_year[year]:,}")


if __name__ == "__main__":
    main()
