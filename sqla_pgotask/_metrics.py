"""What the OpenTelemetry and Prometheus integrations share: the queue depth reader.

Neither integration's library is imported here.  Both report the same
queue metrics, read by :class:`QueueDepthReader` with one aggregate over the
live tasks, at most once per ``interval`` seconds however often a metrics
reader or a scrape asks.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy.orm import Session, sessionmaker

from sqla_pgotask._queries import query
from sqla_pgotask.errors import ConfigurationError
from sqla_pgotask.models import TASK_BIND
from sqla_pgotask.scheduler import Scheduler

logger = logging.getLogger("sqla_pgotask.metrics")

#: Seconds between two reads of the queue depth, by default.
QUEUE_METRICS_INTERVAL = 15.0

#: Upper bounds (seconds) of the attempt duration histogram's buckets.
DURATION_BUCKETS: tuple[float, ...] = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
)

#: The states :attr:`QueueDepth.counts` reports.
STATES = ("due", "scheduled", "running")


class Instrumented:
    """The schedulers one integration has instrumented in this process."""

    def __init__(self, integration: str) -> None:
        self.integration = integration
        self._lock = threading.Lock()
        self._schedulers: weakref.WeakSet[Scheduler] = weakref.WeakSet()

    def __contains__(self, scheduler: Scheduler) -> bool:
        with self._lock:
            return scheduler in self._schedulers

    def check(self, scheduler: Scheduler, queue_metrics_interval: float) -> None:
        """Raise :class:`~sqla_pgotask.ConfigurationError` unless ``instrument()`` may go on."""
        if queue_metrics_interval < 0:
            raise ConfigurationError(
                f"queue_metrics_interval must not be negative, got {queue_metrics_interval!r}"
            )
        if scheduler in self:
            raise self._twice(scheduler)

    def add(self, scheduler: Scheduler) -> None:
        """Record ``scheduler`` as instrumented (once its instruments exist)."""
        with self._lock:
            if scheduler in self._schedulers:
                raise self._twice(scheduler)
            self._schedulers.add(scheduler)

    def _twice(self, scheduler: Scheduler) -> ConfigurationError:
        return ConfigurationError(f"{scheduler!r} is already instrumented for {self.integration}")


@dataclass(frozen=True)
class QueueDepth:
    """The live tasks of one (queue, kind)."""

    queue: str
    kind: str
    #: Pending and due (``run_at`` passed): waiting for a worker.
    due: int
    #: Pending with ``run_at`` in the future.
    scheduled: int
    running: int
    #: Seconds the oldest due task has waited past its ``run_at``; 0 when none is due.
    oldest_due_seconds: float

    def counts(self) -> dict[str, int]:
        """The task counts by state (:data:`STATES`)."""
        return {"due": self.due, "scheduled": self.scheduled, "running": self.running}


class QueueDepthReader:
    """Reads :class:`QueueDepth` rows through ``session_factory``, at most once per ``interval``.

    A (queue, kind) seen once keeps being reported, with zeros, after its
    last live task is gone, so a gauge falls to 0 instead of keeping its
    last value.  If the database cannot be read, :meth:`read` logs a
    warning and returns nothing (the series go missing rather than report
    stale numbers), and tries again after ``interval``.  Thread-safe.
    """

    def __init__(
        self,
        session_factory: sessionmaker[Session],
        interval: float = QUEUE_METRICS_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if interval < 0:
            raise ValueError(f"interval must not be negative, got {interval!r}")
        self.session_factory = session_factory
        self.interval = interval
        self._clock = clock
        self._lock = threading.Lock()
        self._read_at: float | None = None
        self._rows: list[QueueDepth] = []
        self._seen: set[tuple[str, str]] = set()
        self._stuck: dict[str, int] = {}

    def read(self) -> list[QueueDepth]:
        """The rows of the last read, reading again if it is older than ``interval``."""
        with self._lock:
            now = self._clock()
            if self._read_at is None or now - self._read_at >= self.interval:
                self._read_at = now
                self._rows = self._query()
            return self._rows

    def stuck_slots(self) -> dict[str, int]:
        """Each registered worker's stuck handler threads, as of the last :meth:`read`."""
        with self._lock:
            return dict(self._stuck)

    def _query(self) -> list[QueueDepth]:
        try:
            with self.session_factory() as session:
                result = session.execute(query("metrics_queue_depth"), bind_arguments=TASK_BIND)
                rows = [QueueDepth(**row._asdict()) for row in result]
                stuck = session.execute(query("metrics_stuck_slots"), bind_arguments=TASK_BIND)
                # A worker gone since the last read falls to 0, then out.
                self._stuck = {worker: 0 for worker, n in self._stuck.items() if n} | {
                    worker: n for worker, n in stuck.all()
                }
        except Exception:
            logger.warning("could not read the queue depth for metrics", exc_info=True)
            return []
        present = {(row.queue, row.kind) for row in rows}
        rows += [QueueDepth(q, k, 0, 0, 0, 0.0) for q, k in sorted(self._seen - present)]
        self._seen |= present
        return rows
