"""The PostgreSQL server under test: URLs, fresh databases, counters, facts."""

from __future__ import annotations

import os
import time
from typing import Any

import psycopg
from sqlalchemy import URL, make_url

#: the only databases the suite creates or drops
DB_PREFIX = "pgotask_bench_"
DEFAULT_SERVER_URL = "postgresql://postgres@127.0.0.1:5432"
SERVER_URL_ENV = "PGOTASK_BENCH_URL"


class Server:
    """A PostgreSQL server reached through ``url``; its database part (default
    ``postgres``) is only used to create and drop the benchmark databases."""

    def __init__(self, url: str) -> None:
        parsed = make_url(url)
        self._url: URL = parsed
        self.admin_db = parsed.database or "postgres"

    def _render(self, driver: str, database: str) -> str:
        return self._url.set(drivername=driver, database=database).render_as_string(
            hide_password=False
        )

    def libpq_url(self, database: str) -> str:
        """``postgresql://...`` URL of ``database``, for psycopg."""
        return self._render("postgresql", database)

    def sqla_url(self, database: str) -> str:
        """``postgresql+psycopg://...`` URL of ``database``, for SQLAlchemy."""
        return self._render("postgresql+psycopg", database)

    def display(self) -> str:
        """The server's URL, password hidden, without a database."""
        return self._url.set(drivername="postgresql", database=None).render_as_string()

    def connect(self, database: str | None = None) -> psycopg.Connection[Any]:
        """An autocommit connection to ``database`` (default: the admin database)."""
        return psycopg.connect(self.libpq_url(database or self.admin_db), autocommit=True)

    # -- databases ----------------------------------------------------------

    def create(self, name: str) -> None:
        """Create ``name`` afresh (a leftover of that name is dropped first)."""
        _check_name(name)
        with self.connect() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{name}"')

    def drop(self, name: str) -> None:
        """Drop ``name``, disconnecting whoever is still connected."""
        _check_name(name)
        with self.connect() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    # -- counters -----------------------------------------------------------

    def xact_commit(self, name: str, settle_s: float = 10.0) -> int:
        """Committed transactions of database ``name`` so far (``pg_stat_database``).

        Backends report their counts when they exit at the latest, so this
        waits (up to ``settle_s``) until no client is connected to ``name``.
        """
        with self.connect() as conn:
            deadline = time.monotonic() + settle_s
            while time.monotonic() < deadline:
                row = conn.execute(
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE datname = %s AND backend_type = 'client backend'",
                    (name,),
                ).fetchone()
                if not row or not row[0]:
                    break
                time.sleep(0.02)
            # A backend leaves pg_stat_activity just before it flushes its counts.
            time.sleep(0.1)
            row = conn.execute(
                "SELECT xact_commit FROM pg_stat_database WHERE datname = %s", (name,)
            ).fetchone()
        return int(row[0]) if row else 0

    def checkpoint(self, name: str) -> bool:
        """``CHECKPOINT`` (needs superuser), so none lands inside a timed window."""
        try:
            with self.connect(name) as conn:
                conn.execute("CHECKPOINT")
        except psycopg.Error:
            return False
        return True

    def vacuum_analyze(self, name: str, table: str | None = None) -> None:
        with self.connect(name) as conn:
            conn.execute(f"VACUUM (ANALYZE) {table or ''}")

    # -- facts --------------------------------------------------------------

    def info(self) -> dict[str, str]:
        """Version and the settings that matter for commit-bound workloads."""
        out: dict[str, str] = {}
        with self.connect() as conn:
            for key in (
                "server_version",
                "fsync",
                "synchronous_commit",
                "wal_sync_method",
                "shared_buffers",
                "max_connections",
            ):
                row = conn.execute(f"SHOW {key}").fetchone()
                out[key] = str(row[0]) if row else "?"
        return out


def _check_name(name: str) -> None:
    if not name.startswith(DB_PREFIX) or len(name) > 63 or '"' in name:
        raise ValueError(f"refusing to touch database {name!r}: not a {DB_PREFIX}* name")


def database_name(*parts: object) -> str:
    """``pgotask_bench_<pid>_<parts...>``: unique per run, so two runs never collide."""
    name = "_".join([DB_PREFIX.rstrip("_"), str(os.getpid()), *(str(p) for p in parts)])
    return name.lower()[:63]
