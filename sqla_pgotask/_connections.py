"""Connections a worker holds for itself, outside the application's pool."""

from __future__ import annotations

from functools import cache
from typing import Any

import psycopg
from sqlalchemy import Engine
from sqlalchemy.dialects import postgresql

from sqla_pgotask._queries import query
from sqla_pgotask.errors import ConfigurationError

Connection = psycopg.Connection[tuple[Any, ...]]


def require_psycopg(engine: Engine) -> None:
    """Raise :class:`ConfigurationError` unless ``engine`` uses the psycopg 3 driver."""
    if engine.dialect.name != "postgresql" or engine.dialect.driver != "psycopg":
        raise ConfigurationError(
            "sqla_pgotask needs PostgreSQL through the psycopg 3 driver (a "
            f"'postgresql+psycopg://' URL), not {engine.dialect.name}+{engine.dialect.driver}"
        )


def dedicated_connection(engine: Engine) -> Connection:
    """A connection of its own, made the way the engine makes them, in autocommit.

    It is taken out of the engine's pool for good, so a worker's LISTEN and
    heartbeats never wait for (or starve) the application's connections.
    """
    require_psycopg(engine)
    pooled = engine.raw_connection()
    conn = pooled.driver_connection
    pooled.detach()
    assert isinstance(conn, psycopg.Connection)
    if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
        conn.rollback()
    conn.autocommit = True
    return conn


@cache
def driver_sql(name: str) -> str:
    """The named query in psycopg's ``%(name)s`` parameter style."""
    return str(query(name).compile(dialect=_DIALECT))


_DIALECT = postgresql.psycopg.dialect()  # type: ignore[no-untyped-call]
