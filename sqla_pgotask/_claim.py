"""Claiming due tasks: one short, committed transaction per batch.

The claimed rows become ``Task`` objects here, one row at a time: a row that
no handler can be given (a payload nested too deeply for Python to decode,
written by plain SQL; a task with no attempt left) fails alone, at once,
with a ``TaskError`` that says why, and the tasks claimed with it run as
usual.  Claims read the JSON columns as text and decode them per row for
that reason: decoded by the driver, one bad row would fail the whole fetch
after the claim committed, and leave every task of the batch ``running``
until its lease ran out.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from functools import cache
from typing import Any

import psycopg
from psycopg.types.string import TextLoader
from sqlalchemy import Connection, Engine, inspect
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import Session, configure_mappers, make_transient_to_detached, sessionmaker
from sqlalchemy.orm.attributes import set_committed_value

from sqla_pgotask._connections import driver_sql
from sqla_pgotask._queries import query
from sqla_pgotask.errors import ConfigurationError, UnrunnableTaskError, qualified_name
from sqla_pgotask.models import Task, TaskStatus

logger = logging.getLogger("sqla_pgotask.worker")

_AUTOCOMMIT = {"isolation_level": "AUTOCOMMIT"}

#: The JSON columns of a task, decoded row by row (see the module's docstring).
_JSON_COLUMNS = frozenset({"payload", "result", "trace_context"})
#: The column a claim statement may add after the task's: see ``limits_claim``.
RETRY_COLUMN = "pgotask_retry_in"


class Claimed(list[Task]):
    """The tasks a claim returns, ready to run, in claim order.

    ``refused`` counts the tasks the same claim took but failed at once
    without running (see :class:`~sqla_pgotask.errors.UnrunnableTaskError`).
    """

    refused: int = 0
    #: Seconds until a full rate window frees a start (limited claims only).
    retry_in: float | None = None

    def extend_claim(self, other: Claimed) -> Claimed:
        """Add the tasks of ``other``, a later claim of the same round, in claim order."""
        self.extend(other)
        self.sort(key=_claim_order)
        self.refused += other.refused
        return self


def _claim_order(task: Task) -> tuple[int, Any, int]:
    return (-task.priority, task.run_at, task.id)


def driver_connection(connection: Connection) -> psycopg.Connection[Any]:
    """The psycopg connection under a SQLAlchemy one (also when detached from its pool)."""
    fairy = connection.connection
    driver = fairy.driver_connection or fairy.dbapi_connection
    if not isinstance(driver, psycopg.Connection):
        raise ConfigurationError("sqla_pgotask needs the psycopg 3 driver")
    return driver


def claim_cursor(conn: psycopg.Connection[Any]) -> psycopg.Cursor[Any]:
    """A cursor that reads JSON columns as text, so each claimed row is decoded on its own."""
    cursor = conn.cursor()
    cursor.adapters.register_loader("jsonb", TextLoader)
    cursor.adapters.register_loader("json", TextLoader)
    return cursor


def take_claimed(
    conn: psycopg.Connection[Any],
    cursor: psycopg.Cursor[Any],
    rows: Sequence[tuple[Any, ...]],
    dialect: Dialect,
    worker_id: str,
) -> Claimed:
    """The rows a claim returned, as ``Task`` objects; the unrunnable ones failed on ``conn``.

    Rows whose ``id`` is NULL (a claim that carries ``retry_in`` alone) are
    skipped.  If the rows cannot be handed over at all, they go back to
    ``pending``, their attempt refunded, before the error propagates.
    """
    description = cursor.description
    assert description is not None
    try:
        claimed, refused = _tasks(description, rows, dialect)
    except BaseException:
        _give_back(conn, description, rows)
        raise
    if refused:
        _fail_refused(conn, worker_id, refused)
        claimed.refused = len(refused)
    names = [column.name for column in description]
    if RETRY_COLUMN in names and rows:
        retry = rows[0][names.index(RETRY_COLUMN)]
        claimed.retry_in = None if retry is None else float(retry)
    return claimed


def _tasks(
    description: Sequence[psycopg.Column], rows: Sequence[tuple[Any, ...]], dialect: Dialect
) -> tuple[Claimed, list[tuple[Task, str]]]:
    configure_mappers()  # a new process's first claim may come before any other ORM use
    setters = _setters(tuple((c.name, c.type_code) for c in description), dialect)
    id_at = [c.name for c in description].index("id")
    manager = inspect(Task).class_manager
    claimed = Claimed()
    refused: list[tuple[Task, str]] = []
    for row in rows:
        if row[id_at] is None:
            continue
        task = manager.new_instance()
        problem = None
        for index, key, process, is_json in setters:
            value = row[index]
            if is_json and value is not None:
                try:
                    value = json.loads(value)
                except (RecursionError, ValueError) as exc:
                    problem = f"its {key} cannot be decoded: {type(exc).__name__}: {exc}"
                    value = None
            elif process is not None:
                value = process(value)
            set_committed_value(task, key, value)
        make_transient_to_detached(task)
        if problem is None and task.max_attempts is not None and task.attempts > task.max_attempts:
            problem = f"it has no attempt left ({task.attempts - 1} of {task.max_attempts} used)"
        if problem is None:
            claimed.append(task)
        else:
            refused.append((task, problem))
    claimed.sort(key=_claim_order)
    return claimed, refused


@cache
def _setters(
    columns: tuple[tuple[str, int], ...], dialect: Dialect
) -> list[tuple[int, str, Any, bool]]:
    """For each returned column mapped by ``Task``: index, attribute, result processor, JSON?"""
    mapper = inspect(Task)
    table = Task.__table__
    setters = []
    for index, (name, type_code) in enumerate(columns):
        column = table.c.get(name)
        if column is None:
            continue
        key = mapper.get_property_by_column(column).key
        process = column.type.dialect_impl(dialect).result_processor(dialect, type_code)
        setters.append((index, key, process, name in _JSON_COLUMNS))
    return setters


def _fail_refused(
    conn: psycopg.Connection[Any], worker_id: str, refused: list[tuple[Task, str]]
) -> None:
    """End each unrunnable task ``failed``, with a ``TaskError`` saying why (fenced, as ever)."""
    error_type = qualified_name(UnrunnableTaskError)
    for task, problem in refused:
        logger.error(
            "task %s (%s) cannot run: %s; it fails without running", task.id, task.kind, problem
        )
    conn.execute(
        driver_sql("fail"),
        {
            "ids": [task.id for task, _ in refused],
            "attempts": [task.attempts for task, _ in refused],
            "statuses": [TaskStatus.FAILED.value] * len(refused),
            "delays": [0.0] * len(refused),
            "exception_types": [error_type] * len(refused),
            "messages": [f"the task cannot run: {problem}" for _, problem in refused],
            "tracebacks": [None] * len(refused),
            "worker": worker_id,
        },
    )


def _give_back(
    conn: psycopg.Connection[Any],
    description: Sequence[psycopg.Column],
    rows: Sequence[tuple[Any, ...]],
) -> None:
    """Claimed rows that could not be handed to the worker: back to pending, attempt refunded."""
    names = [column.name for column in description]
    id_at, attempts_at = names.index("id"), names.index("attempts")
    claimed = [(row[id_at], row[attempts_at]) for row in rows if row[id_at] is not None]
    if not claimed:
        return
    try:
        conn.execute(
            driver_sql("release"),
            {"ids": [i for i, _ in claimed], "attempts": [a for _, a in claimed]},
        )
    except Exception:
        logger.exception("could not give back claimed tasks %s", [i for i, _ in claimed])


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
) -> Claimed:
    """Mark up to ``limit`` due tasks running for ``worker_id`` and return them, detached.

    ``kinds`` maps each kind the worker handles to its handler's
    ``max_attempts``, which a task without one of its own takes at its first
    claim.  The tasks come back in claim order (priority, then ``run_at``),
    loaded and detached, ready to be added to the Session that runs their
    handler.
    """
    if limit <= 0 or not kinds:
        return Claimed()
    with session_factory() as session:
        # One statement is its own transaction: autocommit saves the BEGIN and
        # COMMIT round trips (the row locks still last only for the statement).
        _autocommit(session)
        connection = session.connection(bind_arguments={"mapper": Task.__mapper__})
        claimed = _run_claim(
            connection,
            worker_id,
            _claim_params(worker_id, kinds, queues, limit, lease_seconds, excluded_queues),
        )
        session.commit()
    return claimed


def _run_claim(
    connection: Connection, worker_id: str, named: tuple[str, dict[str, object]]
) -> Claimed:
    name, params = named
    conn = driver_connection(connection)
    cursor = claim_cursor(conn)
    cursor.execute(driver_sql(name), params)
    return take_claimed(conn, cursor, cursor.fetchall(), connection.dialect, worker_id)


def _claim_params(
    worker_id: str,
    kinds: Mapping[str, int],
    queues: Sequence[str] | None,
    limit: int,
    lease_seconds: float,
    excluded_queues: Sequence[str] = (),
) -> tuple[str, dict[str, object]]:
    """The name of the claim statement and its parameters.

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
    return name, params


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
    """A worker's claims: one autocommit connection, kept between claims.

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
    ) -> Claimed:
        """As :func:`claim_tasks`, on the kept connection (opened again after a failure)."""
        if limit <= 0 or not kinds:
            return Claimed()
        named = _claim_params(worker_id, kinds, queues, limit, lease_seconds, excluded_queues)
        try:
            return _run_claim(self.session().connection(), worker_id, named)
        except Exception:
            self.close()
            raise

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

    def release_orphans(self, worker_id: str, known: Sequence[int]) -> list[int]:
        """Give back tasks claimed by ``worker_id`` that it never received; return their ids.

        After a claim statement failed in flight (a restart, a killed
        connection), it may have committed without its reply arriving: its
        rows are ``running`` under this worker's id, and no handler will run
        them.  ``known`` lists the tasks the worker does hold.
        """
        try:
            ids = self.session().execute(
                query("release_orphans"), {"worker": worker_id, "known": list(known)}
            )
            return sorted(ids.scalars())
        except Exception:
            self.close()
            raise

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
