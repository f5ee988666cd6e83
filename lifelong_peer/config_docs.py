"""Field documentation of config dataclasses, read from their source (the string under each field).

One source of truth: the docstrings written under ``TrainConfig``/``ModelConfig``/``PEERConfig``
fields feed the command line's ``--help`` (issue 7) and the configuration reference.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import itertools
import textwrap


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """{field name: the string literal written right under it} for a dataclass ``cls``."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # the class statement's body
    docs = {}
    for stmt, nxt in itertools.pairwise(body):
        if (
            isinstance(stmt, ast.AnnAssign)
            and isinstance(stmt.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return docs


def reference(cls: type) -> list[dict]:
    """Rows {name, type, default, doc} for every field of ``cls``: the configuration reference."""
    docs = field_docs(cls)
    rows = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else "(computed)"
        rows.append({"name": f.name, "type": str(f.type), "default": default, "doc": docs.get(f.name, "")})
    return rows
