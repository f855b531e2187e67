"""Named SQL statements, loaded from ``sql/queries.sql``."""

from __future__ import annotations

import re
from functools import cache
from importlib.resources import files

from sqlalchemy import TextClause, text

_NAME = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)


@cache
def _load() -> dict[str, str]:
    source = files("sqla_pgotask").joinpath("sql/queries.sql").read_text(encoding="utf-8")
    parts = _NAME.split(source)
    # parts = [preamble, name1, body1, name2, body2, ...]
    return {
        name: body.strip().rstrip(";") for name, body in zip(parts[1::2], parts[2::2], strict=True)
    }


@cache
def query(name: str) -> TextClause:
    """The named statement as a SQLAlchemy ``text()`` construct."""
    return text(_load()[name])
