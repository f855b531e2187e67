"""Queue statistics: tasks by queue and kind, how late they are, throughput."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from sqlalchemy.orm import Session

from sqla_pgotask._queries import query
from sqla_pgotask.models import TASK_BIND

#: The window of :attr:`QueueStats.throughput_per_minute`.
THROUGHPUT_WINDOW = dt.timedelta(minutes=5)


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
