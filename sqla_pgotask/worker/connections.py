"""Connections a worker holds for itself, outside the application's pool."""

from __future__ import annotations

import secrets
import threading
import time
from typing import Any

import psycopg
from sqlalchemy import Engine, text

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


def behind_pooler(conn: Connection) -> bool:
    """Whether a connection pooler such as PgBouncer stands between ``conn`` and the server.

    The backend pid libpq knows is the one the connection's start-up message
    announced; a pooler announces one of its own, unlike the server process
    that answers ``pg_backend_pid()``.
    """
    row = conn.execute("SELECT pg_backend_pid()").fetchone()
    return row is None or row[0] != conn.info.backend_pid


def notifications_arrive(
    conn: Connection,
    engine: Engine,
    *,
    timeout: float = 5.0,
    stopping: threading.Event | None = None,
) -> bool:
    """Whether a ``NOTIFY`` from another connection of ``engine`` reaches ``conn``'s ``LISTEN``.

    A direct connection passes after one round trip.  Through a pooler,
    a notification is sent on a channel of this call's own, so no worker
    wakes for it: a pool in session mode delivers it; one that hands out
    server connections per transaction or statement (PgBouncer's
    ``transaction`` and ``statement`` modes) does not, since the server
    connection that ran ``LISTEN`` went back to the pool.  ``conn`` is in
    autocommit mode.  Gives up (``False``) after ``timeout`` seconds, or as
    soon as ``stopping`` is set.
    """
    if not behind_pooler(conn):
        return True
    channel = f"pgotask_probe_{secrets.token_hex(8)}"
    conn.execute(f"LISTEN {channel}")
    try:
        # From another client connection: under transaction pooling, a
        # notification sent on conn itself may come back on the server
        # connection that ran LISTEN, and prove nothing.
        with engine.connect() as other:
            other.execute(text("SELECT pg_notify(:channel, '')"), {"channel": channel})
            other.commit()
        deadline = time.monotonic() + timeout
        while not (stopping is not None and stopping.is_set()):
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if any(n.channel == channel for n in conn.notifies(timeout=min(left, 0.2))):
                return True
        return False
    finally:
        conn.execute(f"UNLISTEN {channel}")
