"""Inspecting and repairing the queue: the Python API behind the operator commands.

``pgotask stats``, ``list``, ``show``, ``retry``, ``cancel`` and ``check``
(see ``docs/operations.md``) are thin wrappers around these functions, which
scripts and admin pages can call directly::

    from sqla_pgotask.admin import TaskFilter, health, queue_stats, retry_tasks

    with Session() as session:
        for row in queue_stats(session).rows:
            print(row.queue, row.kind, row.due, row.failed)

    result = retry_tasks(Session, TaskFilter(statuses=("failed",), kinds=("send_email",)))
    print(result.retried, "retried;", result.skipped_duplicates, "kept (a live twin exists)")

    if not health(Session, worker_timeout=60).ok:
        ...

Retrying puts a ``failed`` or ``cancelled`` task back to ``pending``, due
now, with ``max_attempts = attempts + extra_attempts`` (one more attempt by
default), so that a task that used up its budget runs again and stops again
if it fails; idle workers of its queue are notified when the batch commits,
as for a new task.  Cancelling goes through the same trigger as
:meth:`Scheduler.cancel <sqla_pgotask.Scheduler.cancel>`.  Bulk operations
work in batches, each a short transaction of its own.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import ColumnElement, func, select
from sqlalchemy.orm import Session, selectinload, sessionmaker

from sqla_pgotask._queries import query
from sqla_pgotask.errors import SchemaError
from sqla_pgotask.models import TASK_BIND, Task, TaskStatus
from sqla_pgotask.schema import check_schema

__all__ = [
    "CancelResult",
    "HealthCheck",
    "HealthReport",
    "QueueKindStats",
    "QueueStats",
    "RetryResult",
    "TaskFilter",
    "cancel_tasks",
    "get_task",
    "health",
    "list_tasks",
    "queue_stats",
    "retry_tasks",
]

#: The statuses :func:`retry_tasks` revives.
RETRYABLE_STATUSES: tuple[TaskStatus, ...] = (TaskStatus.FAILED, TaskStatus.CANCELLED)
#: The statuses :func:`cancel_tasks` acts on.
LIVE_STATUSES: tuple[TaskStatus, ...] = (TaskStatus.PENDING, TaskStatus.RUNNING)

DEFAULT_BATCH_SIZE = 1_000
#: The window of :attr:`QueueStats.throughput_per_minute`.
THROUGHPUT_WINDOW = dt.timedelta(minutes=5)

#: ``progress(done, total)``, called after each batch of a bulk operation.
Progress = Callable[[int, int], None]


# -- statistics ----------------------------------------------------------------


@dataclass(frozen=True)
class QueueKindStats:
    """Task counts of one (queue, kind): pending split into due and scheduled later."""

    queue: str
    kind: str
    due: int
    scheduled: int
    running: int
    succeeded: int
    failed: int
    cancelled: int
    #: Seconds the oldest due pending task has waited past its ``run_at``.
    oldest_due_seconds: float | None
    #: Tasks that finished (any final status) within the throughput window.
    finished_recently: int


@dataclass(frozen=True)
class QueueStats:
    """What :func:`queue_stats` returns: one row per (queue, kind), and the overall rate."""

    rows: list[QueueKindStats]
    window: dt.timedelta

    @property
    def throughput_per_minute(self) -> float:
        """Tasks finished per minute over :attr:`window`, all queues and kinds together."""
        return sum(r.finished_recently for r in self.rows) / (self.window.total_seconds() / 60)


def queue_stats(session: Session, *, window: dt.timedelta = THROUGHPUT_WINDOW) -> QueueStats:
    """Counts per queue, kind and status, with the oldest due task and throughput (one query)."""
    if window <= dt.timedelta(0):
        raise ValueError(f"window must be positive, got {window!r}")
    result = session.execute(
        query("admin_stats"), {"window_seconds": window.total_seconds()}, bind_arguments=TASK_BIND
    )
    rows = [QueueKindStats(**row._asdict()) for row in result]
    return QueueStats(rows=rows, window=window)


# -- listing -------------------------------------------------------------------


@dataclass(frozen=True)
class TaskFilter:
    """Which tasks a listing or a bulk operation is about; empty fields match everything.

    ``older_than``: created more than that long ago (the database's clock).
    """

    statuses: Sequence[TaskStatus | str] = ()
    kinds: Sequence[str] = ()
    queues: Sequence[str] = ()
    older_than: dt.timedelta | None = None

    def __post_init__(self) -> None:
        for name in ("statuses", "kinds", "queues"):
            if isinstance(getattr(self, name), str):
                raise ValueError(f"TaskFilter.{name} must be a sequence, not a string")
        for status in self.statuses:
            TaskStatus(status)  # ValueError for an unknown one
        if self.older_than is not None and self.older_than < dt.timedelta(0):
            raise ValueError(f"older_than must not be negative, got {self.older_than!r}")

    @property
    def is_empty(self) -> bool:
        """True when the filter matches every task."""
        return not (self.statuses or self.kinds or self.queues or self.older_than is not None)

    def clauses(self) -> list[ColumnElement[bool]]:
        """The filter as SQLAlchemy WHERE clauses on :class:`Task`."""
        found: list[ColumnElement[bool]] = []
        if self.statuses:
            found.append(Task.status.in_([TaskStatus(s) for s in self.statuses]))
        if self.kinds:
            found.append(Task.kind.in_(list(self.kinds)))
        if self.queues:
            found.append(Task.queue.in_(list(self.queues)))
        if self.older_than is not None:
            found.append(Task.created_at < func.now() - self.older_than)
        return found

    def restricted_to(self, statuses: Iterable[TaskStatus]) -> TaskFilter:
        """This filter, with its statuses limited to ``statuses`` (all of them if it had none)."""
        allowed = list(statuses)
        mine = [TaskStatus(s) for s in self.statuses] or allowed
        return TaskFilter(
            statuses=[s for s in mine if s in allowed],
            kinds=self.kinds,
            queues=self.queues,
            older_than=self.older_than,
        )


def list_tasks(
    session: Session, where: TaskFilter = TaskFilter(), *, limit: int = 50
) -> list[Task]:
    """The tasks matching ``where``, newest first, at most ``limit`` of them."""
    if limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    statement = select(Task).where(*where.clauses()).order_by(Task.id.desc()).limit(limit)
    return list(session.scalars(statement))


def get_task(session: Session, task_id: int) -> Task | None:
    """The task ``task_id`` with its errors loaded (oldest first), or ``None``."""
    statement = select(Task).where(Task.id == task_id).options(selectinload(Task.errors))
    return session.scalars(statement).one_or_none()


# -- bulk operations ---------------------------------------------------------------


def _batches(
    session_factory: sessionmaker[Session],
    ids: Sequence[int] | None,
    where: TaskFilter,
    batch_size: int,
) -> tuple[int, Iterable[list[int]]]:
    """How many tasks match, and their ids in batches (keyset by id, read one batch at a time)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, not {batch_size!r}")
    if ids is not None:
        unique = sorted(set(ids))
        chunks = [unique[i : i + batch_size] for i in range(0, len(unique), batch_size)]
        return len(unique), chunks
    clauses = where.clauses()
    with session_factory() as session:
        total = session.scalar(select(func.count()).select_from(Task).where(*clauses)) or 0

    def walk() -> Iterable[list[int]]:
        after = 0
        while True:
            with session_factory() as session:
                batch = list(
                    session.scalars(
                        select(Task.id)
                        .where(Task.id > after, *clauses)
                        .order_by(Task.id)
                        .limit(batch_size)
                    )
                )
            if not batch:
                return
            yield batch
            if len(batch) < batch_size:
                return
            after = batch[-1]

    return total, walk()


def _check_target(ids: Sequence[int] | None, where: TaskFilter | None) -> TaskFilter:
    if (ids is None) == (where is None):
        raise ValueError("pass either ids or a TaskFilter (where=...), not both and not neither")
    if ids is not None and (
        isinstance(ids, str | bytes) or not all(isinstance(i, int) for i in ids)
    ):
        raise ValueError(f"ids must be a sequence of task ids, not {ids!r}")
    return where if where is not None else TaskFilter()


@dataclass
class RetryResult:
    """What :func:`retry_tasks` did."""

    #: Tasks put back to ``pending``.
    retried: list[int] = field(default_factory=list)
    #: Failed or cancelled tasks left as they were because a pending or
    #: running task with the same ``kind`` and ``dedup_key`` exists.
    skipped_duplicates: list[int] = field(default_factory=list)
    #: Requested ids that are not failed or cancelled (or do not exist).
    not_retryable: list[int] = field(default_factory=list)


def retry_tasks(
    session_factory: sessionmaker[Session],
    where: TaskFilter | None = None,
    *,
    ids: Sequence[int] | None = None,
    extra_attempts: int = 1,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: Progress | None = None,
) -> RetryResult:
    """Put failed or cancelled tasks back to ``pending``, due now; see the module docs.

    Give ``ids`` or a filter (``where``; its statuses limited to ``failed``
    and ``cancelled``, both by default).  Each task gets ``max_attempts =
    attempts + extra_attempts``.  Pending and running tasks are never
    touched.  Each batch of ``batch_size`` tasks is one transaction.
    """
    where = _check_target(ids, where)
    if (
        isinstance(extra_attempts, bool)
        or not isinstance(extra_attempts, int)
        or extra_attempts < 1
    ):
        raise ValueError(f"extra_attempts must be an integer >= 1, not {extra_attempts!r}")
    check_schema(session_factory)
    total, batches = _batches(
        session_factory, ids, where.restricted_to(RETRYABLE_STATUSES), batch_size
    )
    result, done = RetryResult(), 0
    for batch in batches:
        with session_factory.begin() as session:
            params = {"ids": batch}
            session.execute(query("admin_retry_lock_dedup"), params, bind_arguments=TASK_BIND)
            rows = session.execute(
                query("admin_retry"),
                {**params, "extra_attempts": extra_attempts},
                bind_arguments=TASK_BIND,
            ).all()
            # An UPDATE fires no insert trigger: wake idle workers ourselves.
            queues = sorted({row.queue for row in rows if row.retried})
            if queues:
                session.execute(
                    query("admin_notify_queues"), {"queues": queues}, bind_arguments=TASK_BIND
                )
        seen = set()
        for row in rows:
            seen.add(row.id)
            (result.retried if row.retried else result.skipped_duplicates).append(row.id)
        result.not_retryable.extend(i for i in batch if i not in seen)
        done += len(batch)
        if progress is not None:
            progress(min(done, total), total)
    return result


@dataclass
class CancelResult:
    """What :func:`cancel_tasks` did."""

    #: Pending tasks now ``cancelled``.
    cancelled: list[int] = field(default_factory=list)
    #: Running tasks flagged: they end ``cancelled`` when their handler returns.
    requested: list[int] = field(default_factory=list)
    #: Requested ids that are not pending or running (or do not exist).
    not_cancellable: list[int] = field(default_factory=list)


def cancel_tasks(
    session_factory: sessionmaker[Session],
    where: TaskFilter | None = None,
    *,
    ids: Sequence[int] | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: Progress | None = None,
) -> CancelResult:
    """Cancel pending tasks and flag running ones, by ``ids`` or filter, in batches.

    The same semantics as :meth:`Scheduler.cancel
    <sqla_pgotask.Scheduler.cancel>` (``pgotask_cancel()`` in SQL).  A
    filter's statuses are limited to ``pending`` and ``running`` (both by
    default).
    """
    where = _check_target(ids, where)
    check_schema(session_factory)
    total, batches = _batches(session_factory, ids, where.restricted_to(LIVE_STATUSES), batch_size)
    result, done = CancelResult(), 0
    for batch in batches:
        with session_factory.begin() as session:
            rows = session.execute(
                query("admin_cancel"), {"ids": batch}, bind_arguments=TASK_BIND
            ).all()
        seen = set()
        for row in rows:
            seen.add(row.id)
            running = row.status == TaskStatus.RUNNING.value
            (result.requested if running else result.cancelled).append(row.id)
        result.not_cancellable.extend(i for i in batch if i not in seen)
        done += len(batch)
        if progress is not None:
            progress(min(done, total), total)
    return result


# -- health --------------------------------------------------------------------


@dataclass(frozen=True)
class HealthCheck:
    """One check of :func:`health`: its name, whether it passed, and what it found."""

    name: str
    ok: bool
    detail: str
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class HealthReport:
    """Every check :func:`health` ran; ``ok`` when all passed."""

    checks: list[HealthCheck]

    @property
    def ok(self) -> bool:
        """True when every check passed."""
        return all(check.ok for check in self.checks)

    @property
    def schema_ok(self) -> bool:
        """False when the schema is missing or outdated (the other checks did not run)."""
        return all(check.ok for check in self.checks if check.name == "schema")

    @property
    def problems(self) -> list[HealthCheck]:
        """The checks that failed."""
        return [check for check in self.checks if not check.ok]


def health(
    session_factory: sessionmaker[Session],
    *,
    worker_timeout: float | None = 60.0,
    stuck_after: float = 60.0,
    max_age: float | None = None,
) -> HealthReport:
    """Check the schema, live workers, stuck tasks and (optionally) the backlog's age.

    - ``schema``: at the revision this library expects (if not, nothing else is checked);
    - ``workers``: at least one registered worker with a heartbeat in the
      last ``worker_timeout`` seconds (``None`` skips this check);
    - ``handlers``: when there are live workers, every due task has one that
      would claim it: a handler for its kind, serving its queue (skipped with
      the ``workers`` check, and when no worker is live: that check fails);
    - ``slots``: when there are live workers, none has had every handler
      thread stuck (in a handler far past its ``timeout``) for more than
      ``stuck_after`` seconds; threads stuck on a worker that has free ones
      are reported, not failed;
    - ``stuck``: no running task whose lease expired more than
      ``stuck_after`` seconds ago;
    - ``backlog``: with ``max_age``, no due pending task waiting longer than that.
    """
    for name, value in (("worker_timeout", worker_timeout), ("max_age", max_age)):
        if value is not None and not value > 0:
            raise ValueError(f"{name} must be > 0 seconds, got {value!r}")
    if not stuck_after >= 0:
        raise ValueError(f"stuck_after must be 0 seconds or more, got {stuck_after!r}")
    try:
        check_schema(session_factory)
    except SchemaError as exc:
        return HealthReport([HealthCheck("schema", False, str(exc))])
    checks = [HealthCheck("schema", True, "schema at the expected revision")]
    with session_factory() as session:
        if worker_timeout is not None:
            workers = session.execute(
                query("admin_live_workers"),
                {"timeout_seconds": worker_timeout},
                bind_arguments=TASK_BIND,
            ).all()
            ids = [w.id for w in workers]
            checks.append(
                HealthCheck(
                    "workers",
                    bool(workers),
                    f"{len(workers)} live worker(s)"
                    if workers
                    else f"no worker has sent a heartbeat in the last {worker_timeout:g}s",
                    {"live": len(ids), "ids": ids},
                )
            )
            if workers:
                checks.append(_handlers_check(session, worker_timeout))
                checks.append(_slots_check(session, worker_timeout, stuck_after))
        stuck = session.execute(
            query("admin_stuck_tasks"),
            {"stuck_seconds": stuck_after, "limit": 10},
            bind_arguments=TASK_BIND,
        ).all()
        count = int(stuck[0].total) if stuck else 0
        sample = [s.id for s in stuck]
        checks.append(
            HealthCheck(
                "stuck",
                not stuck,
                "no stuck task"
                if not stuck
                else f"{count} running task(s) with a lease expired over {stuck_after:g}s ago "
                f"(ids {', '.join(map(str, sample))}{', ...' if count > len(sample) else ''})",
                {"count": count, "ids": sample},
            )
        )
        if max_age is not None:
            oldest = session.execute(
                query("admin_oldest_due"), bind_arguments=TASK_BIND
            ).one_or_none()
            age = None if oldest is None else float(oldest.age_seconds)
            late = age is not None and age > max_age
            checks.append(
                HealthCheck(
                    "backlog",
                    not late,
                    "no due task waiting"
                    if oldest is None
                    else f"oldest due task {oldest.id} ({oldest.kind}, queue {oldest.queue}) "
                    f"has waited {_waited(age)}"
                    + (f", over the {max_age:g}s allowed" if late else ""),
                    {"oldest_due_seconds": age, "task_id": None if oldest is None else oldest.id},
                )
            )
    return HealthReport(checks)


def _waited(age: float | None) -> str:
    if age is None:
        return "-"
    # A run_at of '-infinity' (plain SQL may insert one) is an infinite age.
    return "forever" if math.isinf(age) else f"{age:.0f}s"


def _slots_check(session: Session, worker_timeout: float, stuck_after: float) -> HealthCheck:
    """``slots``: no live worker has had all its handler threads stuck for over ``stuck_after``."""
    rows = session.execute(
        query("admin_stuck_slots"), {"timeout_seconds": worker_timeout}, bind_arguments=TASK_BIND
    ).all()
    workers = [
        {
            "id": r.id,
            "stuck_slots": int(r.stuck_slots),
            "concurrency": int(r.concurrency),
            "all_stuck_seconds": r.all_stuck_seconds,
        }
        for r in rows
    ]
    if not rows:
        return HealthCheck("slots", True, "no handler thread is stuck", {"workers": []})
    failing = [
        r for r in rows if r.all_stuck_seconds is not None and r.all_stuck_seconds > stuck_after
    ]
    described = "; ".join(
        f"worker {r.id}: {r.stuck_slots} of {r.concurrency} handler threads stuck"
        + (
            f", all of them for {r.all_stuck_seconds:.0f}s"
            if r.all_stuck_seconds is not None
            else ""
        )
        for r in rows
    )
    return HealthCheck(
        "slots",
        not failing,
        described
        + (
            f" (no free thread for over {stuck_after:g}s: restart the worker)"
            if failing
            else " (handlers far past their timeout; the other threads run tasks)"
        ),
        {"workers": workers},
    )


def _handlers_check(session: Session, worker_timeout: float, *, sample: int = 10) -> HealthCheck:
    """``handlers``: the due tasks that no live worker would claim, per kind and queue."""
    rows = session.execute(
        query("admin_unhandled_due"),
        {"timeout_seconds": worker_timeout, "limit": sample},
        bind_arguments=TASK_BIND,
    ).all()
    unhandled = [{"kind": r.kind, "queue": r.queue, "due": int(r.due)} for r in rows]
    if not rows:
        return HealthCheck(
            "handlers", True, "every due task has a live worker to run it", {"unhandled": []}
        )
    found = ", ".join(
        f"kind {r.kind!r} in queue {r.queue!r} ({r.due} due task{'s' if r.due != 1 else ''})"
        for r in rows
    )
    more = int(rows[0].total) - len(rows)
    return HealthCheck(
        "handlers",
        False,
        f"no live worker handles {found}"
        + (f", and {more} more kind and queue pair(s)" if more > 0 else ""),
        {"unhandled": unhandled},
    )
