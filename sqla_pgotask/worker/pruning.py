"""Pruning finished tasks: delete old ``succeeded``, ``failed`` and ``cancelled`` rows.

Workers apply a :class:`Retention` (by default: succeeded and cancelled
tasks kept 1 day, failed ones 14 days) in their maintenance loop, one worker
of the fleet at a time, in small batches.  To prune by hand, or with workers
that run with ``retention=None``, call :func:`prune_tasks` (or run
``pgotask prune``) from a cron job or a timer::

    import datetime as dt
    from sqla_pgotask import prune_tasks

    deleted = prune_tasks(engine, older_than=dt.timedelta(days=7))

Only tasks in a final status whose ``finished_at`` is older than ``now() -
older_than`` (the database's clock) are deleted; their ``TaskError`` rows go
with them (``ON DELETE CASCADE``).  Pending and running tasks are never
touched.  Rows are deleted in batches of ``batch_size``, each batch a short
transaction of its own, so pruning a large backlog never holds many locks for
long, and rows that someone else has locked at that moment are skipped (the
next run takes them).  See ``docs/pruning.md``.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import psycopg
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session, sessionmaker

from sqla_pgotask._queries import driver_sql
from sqla_pgotask.config.retention import FINISHED_STATUSES, Retention
from sqla_pgotask.models import TASK_BIND, TaskStatus
from sqla_pgotask.schema import check_schema

__all__ = ["RETENTION_LOCK", "apply_retention", "prune_tasks"]

logger = logging.getLogger("sqla_pgotask.retention")

DEFAULT_BATCH_SIZE = 10_000

# The cutoff is read once, from the database clock, so that every batch
# prunes the same set of rows and a run ends even while tasks keep finishing.
_CUTOFF = text("SELECT now() - CAST(:older_than AS interval)")

# One batch.  It walks the primary key upwards from the last id the previous
# batch deleted (:after), so each batch starts where the last one stopped
# instead of re-reading the rows (and dead row versions) already handled: a
# whole run reads the table about once.  SKIP LOCKED: a row someone else
# holds is left for the next run rather than waited for.  The errors of the
# deleted tasks go by the foreign key's ON DELETE CASCADE.
_DELETE_BATCH = text(
    """
    WITH doomed AS (
        SELECT id
        FROM pgotask_task
        WHERE id > :after
          AND status = ANY(CAST(:statuses AS text[]))
          AND finished_at < :cutoff
        ORDER BY id
        LIMIT :batch_size
        FOR UPDATE SKIP LOCKED
    ),
    deleted AS (
        DELETE FROM pgotask_task AS t
        USING doomed
        WHERE t.id = doomed.id
        RETURNING t.id
    )
    SELECT count(*) AS deleted, max(id) AS last_id FROM deleted
    """
)


# The key of the advisory lock that lets one worker of the fleet at a time
# delete ("pgotask retention" as ASCII).
RETENTION_LOCK = 0x7067_6F74_7265_7400

# Taken by each batch's transaction, and released by its commit or rollback.
# Not a session lock held for the whole pass: behind a pooler that hands out
# server connections per transaction (PgBouncer's transaction mode), the lock
# and its unlock reach different server connections, and the lock stays on a
# pooled one, blocking every worker's retention until that connection closes.
# Nor a lease row: it needs a table of its own, and a lease outlives a worker
# that dies in a pass, where a transaction's lock goes with its connection.
# A transaction lock leaves nothing behind whatever the pool, and passes
# still do not overlap: at most one worker deletes at any moment, and one
# that finds the lock taken ends its pass, leaving the rest to the holder.
_TAKE_TURN = "SELECT pg_try_advisory_xact_lock(%s)"


def apply_retention(conn: psycopg.Connection[Any], retention: Retention) -> int | None:
    """One retention pass on a worker's own autocommit connection; how many tasks it deleted.

    ``None`` if another worker is deleting right now (its lock is held), or
    if no status is pruned.  Each batch is a transaction of its own that
    takes the lock first; the pass ends at a batch that finds it taken.
    """
    periods = retention.periods()
    if not periods:
        return None
    total, after, batches = 0, 0, 0
    deadline = time.monotonic() + retention.max_seconds
    params: dict[str, Any] = {
        "statuses": [status.value for status in periods],
        "keep_seconds": [keep.total_seconds() for keep in periods.values()],
        "batch_size": retention.batch_size,
    }
    while True:
        with conn.transaction():
            if not conn.execute(_TAKE_TURN, (RETENTION_LOCK,)).fetchone()[0]:  # type: ignore[index]
                # Another worker's batch: it goes on from there.
                return None if not batches else _done(total, periods)
            row = conn.execute(driver_sql("retention_batch"), {**params, "after": after}).fetchone()
        batches += 1
        deleted, last_id = row if row is not None else (0, None)
        total += int(deleted)
        if deleted < retention.batch_size or last_id is None:
            break
        after = int(last_id)
        if time.monotonic() >= deadline:
            logger.info("retention pass stopped after %.1fs; the rest waits", retention.max_seconds)
            break
    return _done(total, periods)


def _done(total: int, periods: dict[TaskStatus, dt.timedelta]) -> int:
    if total:
        logger.info(
            "retention: deleted %d finished tasks (%s)",
            total,
            ", ".join(f"{status.value} after {keep}" for status, keep in periods.items()),
        )
    return total


def prune_tasks(
    bind: Engine | sessionmaker[Session],
    *,
    older_than: dt.timedelta,
    statuses: Iterable[TaskStatus | str] = FINISHED_STATUSES,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Delete tasks in ``statuses`` that finished more than ``older_than`` ago; return how many.

    ``progress(deleted_so_far)`` is called after each batch, if given.

    ``bind`` is an ``Engine`` or the application's ``sessionmaker``.
    ``statuses`` defaults to every final status (``succeeded``, ``failed``,
    ``cancelled``); ``pending`` or ``running`` raise ``ValueError``, as do a
    negative ``older_than`` and a ``batch_size`` below 1.  Each batch of at
    most ``batch_size`` tasks is deleted and committed in its own
    transaction.  Raises :class:`~sqla_pgotask.SchemaError` if the schema is
    missing or outdated.
    """
    wanted = _check_statuses(statuses)
    if not isinstance(older_than, dt.timedelta):
        raise ValueError(
            f"older_than must be a datetime.timedelta, not {type(older_than).__name__}"
        )
    if older_than < dt.timedelta(0):
        raise ValueError(f"older_than must not be negative, got {older_than!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, not {batch_size!r}")

    session_factory = bind if isinstance(bind, sessionmaker) else sessionmaker(bind)
    check_schema(session_factory)
    with session_factory() as session:
        cutoff = _scalar(session, _CUTOFF, {"older_than": older_than})

    total, batches, after = 0, 0, 0
    params: dict[str, Any] = {
        "statuses": [status.value for status in wanted],
        "cutoff": cutoff,
        "batch_size": batch_size,
    }
    while True:
        try:
            with session_factory.begin() as session:
                row = session.execute(
                    _DELETE_BATCH,
                    {**params, "after": after},
                    bind_arguments=TASK_BIND,
                ).one()
        except Exception:
            if total:
                logger.warning("pruning stopped by an error after deleting %d tasks", total)
            raise
        deleted = int(row.deleted)
        batches += 1
        total += deleted
        if progress is not None:
            progress(total)
        logger.debug("prune batch %d: deleted %d tasks", batches, deleted)
        # Fewer than asked: the scan reached the end (SKIP LOCKED keeps
        # scanning past locked rows, so a short batch is the last one).
        if deleted < batch_size or row.last_id is None:
            break
        after = int(row.last_id)
    logger.info(
        "pruned %d tasks (%s) finished before %s, in %d batches",
        total,
        ", ".join(status.value for status in wanted),
        cutoff.isoformat() if isinstance(cutoff, dt.datetime) else cutoff,
        batches,
    )
    return total


def _check_statuses(statuses: Iterable[TaskStatus | str]) -> tuple[TaskStatus, ...]:
    """The statuses as :class:`TaskStatus` values, refusing anything but final ones."""
    if isinstance(statuses, str):
        raise ValueError(
            f"statuses must be a collection of statuses, not the string {statuses!r} "
            f"(did you mean [{statuses!r}]?)"
        )
    finished = ", ".join(status.value for status in FINISHED_STATUSES)
    wanted: list[TaskStatus] = []
    for value in statuses:
        try:
            status = TaskStatus(value)
        except ValueError:
            raise ValueError(f"unknown task status {value!r} (choose from {finished})") from None
        if status not in FINISHED_STATUSES:
            raise ValueError(
                f"cannot prune {status.value} tasks: only finished tasks ({finished}) are "
                "pruned, so that no task that may still run is ever deleted"
            )
        if status not in wanted:
            wanted.append(status)
    if not wanted:
        raise ValueError(f"statuses must name at least one of {finished}")
    return tuple(wanted)


def _scalar(session: Session, statement: Any, params: dict[str, Any]) -> Any:
    return session.execute(statement, params, bind_arguments=TASK_BIND).scalar_one()
