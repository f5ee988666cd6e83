"""One output path for every command: rich tables for people, ``--format json`` for scripts.

Data goes to stdout; progress, warnings and errors to stderr. Neither console reads markup or emoji
codes in strings: what is printed is text, whatever it holds — a path, a field name or a slice spec like
``eras:abc:`` once came out as ``eras🔤`` (issue 25). Styles are given as ``rich.text.Text`` parts
(``labelled``, ``Text.assemble``).
"""

from __future__ import annotations

import json
import sys
from enum import Enum

from rich.console import Console
from rich.table import Table
from rich.text import Text

# Piped output has no terminal width; rich would assume 80 columns and cut numbers with "…".
_WIDTH = None if sys.stdout.isatty() else 200
stdout = Console(soft_wrap=True, width=_WIDTH, markup=False, emoji=False)
stderr = Console(stderr=True, soft_wrap=True, markup=False, emoji=False)


class Format(str, Enum):
    human = "human"
    json = "json"


def emit(data: object, fmt: Format, human) -> None:
    """Print ``data`` as JSON, or call ``human(data)`` that renders it with rich."""
    if fmt == Format.json:
        sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
        sys.stdout.flush()
    else:
        human(data)


def key_value_table(data: dict, title: str | None = None) -> Table:
    table = Table(title=title, show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column()
    for key, value in data.items():
        table.add_row(str(key), ", ".join(map(str, value)) if isinstance(value, list) else str(value))
    return table


def labelled(label: str, style: str, text: str) -> Text:
    """``label`` in ``style``, then ``text`` as it is: ``error: ...``, ``warning: ...``, ``note: ...``."""
    return Text.assemble((label, style), " ", text)


def message(text: str | Text, quiet: bool = False) -> None:
    if not quiet:
        stderr.print(text, highlight=False)
