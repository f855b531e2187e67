"""Inspecting and repairing the queue: the Python API behind the operator commands.

:mod:`~sqla_pgotask.admin.stats` (queue statistics), :mod:`~sqla_pgotask.admin.tasks`
(finding, retrying and cancelling tasks), :mod:`~sqla_pgotask.admin.health` (the
health check) and :mod:`~sqla_pgotask.admin.queues` (pausing queues), all
taking the application's Session or sessionmaker first.

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

from sqla_pgotask.admin.health import HealthCheck, HealthReport, health
from sqla_pgotask.admin.stats import THROUGHPUT_WINDOW, QueueKindStats, QueueStats, queue_stats
from sqla_pgotask.admin.tasks import (
    DEFAULT_BATCH_SIZE,
    LIVE_STATUSES,
    RETRYABLE_STATUSES,
    CancelResult,
    Progress,
    RetryResult,
    TaskFilter,
    cancel_tasks,
    get_task,
    list_tasks,
    retry_tasks,
)

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "LIVE_STATUSES",
    "RETRYABLE_STATUSES",
    "THROUGHPUT_WINDOW",
    "CancelResult",
    "HealthCheck",
    "HealthReport",
    "Progress",
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
