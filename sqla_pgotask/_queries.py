"""Named SQL statements, loaded from the ``sql/*.sql`` files of the package."""

from __future__ import annotations

import re
from functools import cache
from importlib.resources import files

from sqlalchemy import TextClause, text

_NAME = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)


@cache
def _load() -> dict[str, str]:
    statements: dict[str, str] = {}
    for path in sorted(files("sqla_pgotask").joinpath("sql").iterdir(), key=lambda p: p.name):
        if not path.name.endswith(".sql"):
            continue
        parts = _NAME.split(path.read_text(encoding="utf-8"))
        # parts = [preamble, name1, body1, name2, body2, ...]
        for name, body in zip(parts[1::2], parts[2::2], strict=True):
            if name in statements:
                raise RuntimeError(f"statement {name!r} is defined twice in sqla_pgotask/sql")
            statements[name] = body.strip().rstrip(";")
    return statements


@cache
def query(name: str) -> TextClause:
    """The named statement as a SQLAlchemy ``text()`` construct."""
    return text(_load()[name])
