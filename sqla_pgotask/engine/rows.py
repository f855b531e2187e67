"""Claimed rows into ``Task`` objects, one row at a time.

The rows a claim returns become ``Task`` objects here: a row that
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
from collections.abc import Sequence
from functools import cache
from typing import Any

import psycopg
from psycopg.types.string import TextLoader
from sqlalchemy import Connection, inspect
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import configure_mappers
from sqlalchemy.orm.base import instance_state

from sqla_pgotask._queries import driver_sql
from sqla_pgotask.engine.settle import fail_params
from sqla_pgotask.errors import ConfigurationError, UnrunnableTaskError, qualified_name
from sqla_pgotask.models import Task

logger = logging.getLogger("sqla_pgotask.worker")

#: The JSON columns of a task, decoded row by row (see the module's docstring).
_JSON_COLUMNS = frozenset({"payload", "result", "trace_context"})
#: Where a returned column that ``Task`` does not map is loaded (and dropped).
_UNMAPPED = "\0unmapped"
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
    values = task.__dict__
    return (-values["priority"], values["run_at"], values["id"])


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
    keys, processed, decoded = _loading(tuple((c.name, c.type_code) for c in description), dialect)
    id_at = keys.index("id")
    unmapped = _UNMAPPED in keys
    mapper = inspect(Task)
    new_instance = mapper.class_manager.new_instance
    identity_key = mapper.identity_key_from_primary_key
    loads = json.loads
    claimed = Claimed()
    refused: list[tuple[Task, str]] = []
    for row in rows:
        if row[id_at] is None:
            continue
        task = new_instance()
        # Loaded as the ORM loads a row: the values go straight into the
        # instance's dict (no attribute events, so no history), and the
        # object gets its identity key, which makes it detached.  That is
        # what make_transient_to_detached() does, less its pass over every
        # attribute: all the columns are loaded, and the one relationship
        # (errors) loads lazily on first use, as after a query.
        values = task.__dict__
        values.update(zip(keys, row, strict=True))
        if unmapped:
            del values[_UNMAPPED]
        for key, process in processed:
            value = values[key]
            if value is not None:
                values[key] = process(value)
        problem = None
        for key in decoded:
            value = values[key]
            if value is not None:
                try:
                    values[key] = loads(value)
                except (RecursionError, ValueError) as exc:
                    problem = f"its {key} cannot be decoded: {type(exc).__name__}: {exc}"
                    values[key] = None
        instance_state(task).key = identity_key((values["id"],))
        if problem is None:
            limit = values["max_attempts"]
            if limit is not None and values["attempts"] > limit:
                used = values["attempts"] - 1
                problem = f"it has no attempt left ({used} of {limit} used)"
        if problem is None:
            claimed.append(task)
        else:
            refused.append((task, problem))
    if len(claimed) > 1:
        claimed.sort(key=_claim_order)
    return claimed, refused


@cache
def _loading(
    columns: tuple[tuple[str, int], ...], dialect: Dialect
) -> tuple[list[str], list[tuple[str, Any]], list[str]]:
    """How the returned columns load into a ``Task``'s dict.

    The attribute of each column (``_UNMAPPED`` for a column ``Task`` does
    not map), the attributes whose values go through the column type's result
    processor, and the JSON attributes, decoded row by row.
    """
    mapper = inspect(Task)
    table = Task.__table__
    keys: list[str] = []
    processed: list[tuple[str, Any]] = []
    decoded: list[str] = []
    for name, type_code in columns:
        column = table.c.get(name)
        if column is None:
            keys.append(_UNMAPPED)
            continue
        key = mapper.get_property_by_column(column).key
        keys.append(key)
        if name in _JSON_COLUMNS:
            decoded.append(key)
            continue
        process = column.type.dialect_impl(dialect).result_processor(dialect, type_code)
        if process is not None:
            processed.append((key, process))
    return keys, processed, decoded


def _fail_refused(
    conn: psycopg.Connection[Any], worker_id: str, refused: list[tuple[Task, str]]
) -> None:
    """End each unrunnable task ``failed``, with a ``TaskError`` saying why (fenced, as ever)."""
    error_type = qualified_name(UnrunnableTaskError)
    for task, problem in refused:
        logger.error(
            "task %s (%s) cannot run: %s; it fails without running", task.id, task.kind, problem
        )
    n = len(refused)
    conn.execute(
        driver_sql("fail"),
        fail_params(
            [(task.id, task.attempts) for task, _ in refused],
            worker_id,
            final=[True] * n,
            delays=[0.0] * n,
            exception_types=[error_type] * n,
            messages=[f"the task cannot run: {problem}" for _, problem in refused],
            tracebacks=[None] * n,
        ),
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
