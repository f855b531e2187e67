"""Named SQL statements, loaded from the ``sql/*.sql`` files of the package.

A file holds statements (``-- name: NAME``, then the statement) and
fragments (``-- fragment: NAME``, then a piece of SQL, such as a condition):
a statement includes a fragment as ``{{NAME}}``, so a condition that several
statements share (what makes a task claimable) is written once.
"""

from __future__ import annotations

import re
from functools import cache
from importlib.resources import files

from sqlalchemy import TextClause, text
from sqlalchemy.dialects import postgresql

_NAME = re.compile(r"^-- (name|fragment): (\w+)\s*$", re.MULTILINE)
_INCLUDE = re.compile(r"\{\{(\w+)\}\}")


@cache
def _load() -> dict[str, str]:
    statements: dict[str, str] = {}
    fragments: dict[str, str] = {}
    for path in sorted(files("sqla_pgotask").joinpath("sql").iterdir(), key=lambda p: p.name):
        if not path.name.endswith(".sql"):
            continue
        parts = _NAME.split(path.read_text(encoding="utf-8"))
        # parts = [preamble, kind1, name1, body1, kind2, name2, body2, ...]
        for kind, name, body in zip(parts[1::3], parts[2::3], parts[3::3], strict=True):
            if name in statements or name in fragments:
                raise RuntimeError(f"{name!r} is defined twice in sqla_pgotask/sql")
            (statements if kind == "name" else fragments)[name] = body.strip().rstrip(";")
    return {name: _expand(body, fragments) for name, body in statements.items()}


def _expand(body: str, fragments: dict[str, str]) -> str:
    def include(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in fragments:
            raise RuntimeError(f"no fragment {name!r} in sqla_pgotask/sql")
        # The fragment's own comments stay in its file; its SQL goes in.
        lines = [line for line in fragments[name].splitlines() if not line.startswith("--")]
        return "\n".join(lines).strip()

    return _INCLUDE.sub(include, body)


@cache
def query(name: str) -> TextClause:
    """The named statement as a SQLAlchemy ``text()`` construct."""
    return text(_load()[name])


@cache
def driver_sql(name: str) -> str:
    """The named query in psycopg's ``%(name)s`` parameter style."""
    return str(query(name).compile(dialect=_DIALECT))


_DIALECT = postgresql.psycopg.dialect()  # type: ignore[no-untyped-call]
