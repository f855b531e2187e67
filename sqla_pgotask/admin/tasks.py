"""Finding tasks, and retrying or cancelling them in bulk, in batches of short transactions."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from sqlalchemy import ColumnElement, func, select
from sqlalchemy.orm import Session, selectinload, sessionmaker

from sqla_pgotask._queries import query
from sqla_pgotask.models import TASK_BIND, Task, TaskStatus
from sqla_pgotask.schema import check_schema

#: The statuses :func:`retry_tasks` revives.
RETRYABLE_STATUSES: tuple[TaskStatus, ...] = (TaskStatus.FAILED, TaskStatus.CANCELLED)
#: The statuses :func:`cancel_tasks` acts on.
LIVE_STATUSES: tuple[TaskStatus, ...] = (TaskStatus.PENDING, TaskStatus.RUNNING)

DEFAULT_BATCH_SIZE = 1_000

#: ``progress(done, total)``, called after each batch of a bulk operation.
Progress = Callable[[int, int], None]


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
