"""Claiming due tasks: one short, committed transaction per batch."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from functools import cache
from typing import Any

from sqlalchemy import Connection, Engine, select
from sqlalchemy.orm import Session, sessionmaker

from sqla_pgotask._queries import query
from sqla_pgotask.models import Task

logger = logging.getLogger("sqla_pgotask.worker")

_AUTOCOMMIT = {"isolation_level": "AUTOCOMMIT"}


def _autocommit(session: Session) -> None:
    # Not for a sessionmaker bound to a Connection (already in a transaction).
    if not isinstance(session.get_bind(mapper=Task.__mapper__), Connection):
        session.connection(execution_options=_AUTOCOMMIT)


def claim_tasks(
    session_factory: sessionmaker[Session],
    *,
    worker_id: str,
    kinds: Mapping[str, int],
    queues: Sequence[str] | None,
    limit: int,
    lease_seconds: float,
    excluded_queues: Sequence[str] = (),
) -> list[Task]:
    """Mark up to ``limit`` due tasks running for ``worker_id`` and return them, detached.

    ``kinds`` maps each kind the worker handles to its handler's
    ``max_attempts``, which a task without one of its own takes at its first
    claim.  The tasks come back in claim order (priority, then ``run_at``),
    loaded and detached, ready to be added to the Session that runs their
    handler.
    """
    if limit <= 0 or not kinds:
        return []
    statement, params = _claim(worker_id, kinds, queues, limit, lease_seconds, excluded_queues)
    with session_factory() as session:
        # One statement is its own transaction: autocommit saves the BEGIN and
        # COMMIT round trips (the row locks still last only for the statement).
        _autocommit(session)
        tasks = list(session.scalars(statement, params))
        # Detach before the commit so an ``expire_on_commit`` sessionmaker
        # keeps the loaded values.
        session.expunge_all()
        session.commit()
    return _in_claim_order(tasks)


def _claim(
    worker_id: str,
    kinds: Mapping[str, int],
    queues: Sequence[str] | None,
    limit: int,
    lease_seconds: float,
    excluded_queues: Sequence[str] = (),
) -> tuple[Any, dict[str, object]]:
    """The ORM statement of a claim (it loads ``Task`` objects) and its parameters.

    ``excluded_queues`` (with ``queues=None`` only): queues whose tasks only
    the limited claim takes (see :mod:`sqla_pgotask._limits`).
    """
    params: dict[str, object] = {
        "kinds": list(kinds),
        "max_attempts": list(kinds.values()),
        "limit": limit,
        "worker": worker_id,
        "lease_seconds": float(lease_seconds),
    }
    name = "claim"
    if queues is not None:
        name = "claim_in_queues"
        params["queues"] = list(queues)
    else:
        params["excluded_queues"] = list(excluded_queues)
    return _orm_statement(name), params


@cache
def _orm_statement(name: str) -> Any:
    return select(Task).from_statement(query(name)).execution_options(populate_existing=True)


def _in_claim_order(tasks: list[Task]) -> list[Task]:
    tasks.sort(key=lambda t: (-t.priority, t.run_at, t.id))
    return tasks


def release_tasks(session_factory: sessionmaker[Session], tasks: Sequence[Task]) -> int:
    """Return claimed tasks that never started to ``pending``, refunding their attempt."""
    if not tasks:
        return 0
    with session_factory() as session:
        _autocommit(session)
        result = session.execute(
            query("release"),
            {"ids": [t.id for t in tasks], "attempts": [t.attempts for t in tasks]},
        )
        session.commit()
        return int(result.rowcount)  # type: ignore[attr-defined]


class Claimer:
    """A worker's claims: one autocommit connection and Session, kept between claims.

    Saves a pool checkout, an isolation-level switch and a new Session per
    claim, which is most of a claim's client time when tasks trickle in.  The
    connection is detached from the pool, so it never takes a slot the
    handlers or the application need.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._session: Session | None = None

    def claim(
        self,
        *,
        worker_id: str,
        kinds: Mapping[str, int],
        queues: Sequence[str] | None,
        limit: int,
        lease_seconds: float,
        excluded_queues: Sequence[str] = (),
    ) -> list[Task]:
        """As :func:`claim_tasks`, on the kept connection (opened again after a failure)."""
        if limit <= 0 or not kinds:
            return []
        statement, params = _claim(worker_id, kinds, queues, limit, lease_seconds, excluded_queues)
        session = self.session()
        try:
            tasks = list(session.scalars(statement, params))
        except Exception:
            self.close()
            raise
        finally:
            if self._session is not None:
                session.expunge_all()
        return _in_claim_order(tasks)

    def session(self) -> Session:
        """The kept Session, on its autocommit connection (opened on first use)."""
        session = self._session
        if session is None:
            conn = self.engine.connect()
            conn.detach()  # outside the pool, like the LISTEN and heartbeat connections
            # Each claim statement is its own transaction (psycopg autocommit);
            # the Session's own begin and rollback are then no-ops.
            conn.connection.dbapi_connection.autocommit = True  # type: ignore[union-attr]
            session = self._session = Session(bind=conn)
        return session

    def next_due(self, kinds: Mapping[str, int], queues: Sequence[str] | None) -> float | None:
        """Seconds until the next delayed task of ``kinds`` becomes due, or ``None``."""
        if not kinds:
            return None
        session = self.session()
        try:
            seconds = session.execute(
                query("next_due"),
                {"kinds": list(kinds), "queues": None if queues is None else list(queues)},
            ).scalar()
        except Exception:
            self.close()
            raise
        return None if seconds is None else float(seconds)

    def close(self) -> None:
        """Give the connection back (after a failure, or when the worker stops)."""
        session, self._session = self._session, None
        if session is not None:
            bind = session.bind
            try:
                session.close()
                if isinstance(bind, Connection):
                    bind.close()
            except Exception:
                logger.debug("closing the claim connection failed", exc_info=True)
