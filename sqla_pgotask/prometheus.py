"""Prometheus metrics for workers (``pip install 'sqla-pgotask[prometheus]'``).

``pgotask worker app:scheduler --metrics-port 9300`` serves them at
``http://HOST:9300/metrics``.  In code::

    from sqla_pgotask import prometheus

    prometheus.instrument(scheduler)      # before scheduler.run()
    prometheus.start_http_server(9300)

Metrics (every one labelled ``kind`` and ``queue``):

* ``pgotask_attempt_started_total``: attempts started;
* ``pgotask_attempt_finished_total``: attempts finished, by ``outcome``
  (``succeeded``, ``retry``, ``failed``, ``cancelled``, ``snoozed``,
  ``lost``, ``released``), counted once the outcome committed;
* ``pgotask_attempt_duration_seconds``: histogram of the seconds each
  attempt's handler (with its middleware) took, by ``outcome``;
* ``pgotask_queue_tasks``: live tasks, by ``state`` (``due``, ``scheduled``,
  ``running``), read from the database at most every
  ``queue_metrics_interval`` seconds: the whole fleet's, the same in every
  worker process (aggregate with ``max``, not ``sum``);
* ``pgotask_queue_oldest_due_age_seconds``: how long the oldest due task
  has waited past its ``run_at`` (0 when none is due).

Several processes (``pgotask worker --processes N``) use prometheus_client's
multiprocess mode: the supervisor serves one endpoint for all of them, from
the files its worker processes write in ``PROMETHEUS_MULTIPROC_DIR``.
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client import start_http_server as _start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector
from sqlalchemy.orm import Session

from sqla_pgotask._metrics import (
    DURATION_BUCKETS,
    QUEUE_METRICS_INTERVAL,
    Instrumented,
    QueueDepth,
    QueueDepthReader,
)
from sqla_pgotask.context import AttemptContext, Outcome, current_attempt
from sqla_pgotask.middleware import CallNext
from sqla_pgotask.models import Task
from sqla_pgotask.scheduler import Scheduler

__all__ = [
    "MULTIPROC_DIR_ENV",
    "instrument",
    "is_instrumented",
    "mark_process_dead",
    "multiprocess_registry",
    "start_http_server",
]

#: The environment variable naming prometheus_client's multiprocess directory.
MULTIPROC_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"

_TASKS = "pgotask_queue_tasks"
_TASKS_HELP = "Live tasks per queue, kind and state (due, scheduled, running)."
_AGE = "pgotask_queue_oldest_due_age_seconds"
_AGE_HELP = "Seconds the oldest due task has waited past its run_at (0: none due)."
_STUCK = "pgotask_worker_stuck_slots"
_STUCK_HELP = "Handler threads of each worker stuck in a handler far past its timeout."

_lock = threading.Lock()
_instrumented = Instrumented("Prometheus")
# One set of instruments per registry: several schedulers in one process share them.
_by_registry: weakref.WeakKeyDictionary[CollectorRegistry, _Attempts] = weakref.WeakKeyDictionary()


def multiprocess() -> bool:
    """Whether this process writes its metrics for a multiprocess collector."""
    return bool(os.environ.get(MULTIPROC_DIR_ENV))


def is_instrumented(scheduler: Scheduler) -> bool:
    """Whether :func:`instrument` was called for ``scheduler`` in this process."""
    return scheduler in _instrumented


def instrument(
    scheduler: Scheduler,
    *,
    registry: CollectorRegistry = REGISTRY,
    queue_metrics: bool = True,
    queue_metrics_interval: float = QUEUE_METRICS_INTERVAL,
) -> None:
    """Count and time every attempt ``scheduler``'s workers run, in ``registry``.

    Registers a middleware and an outcome hook on ``scheduler`` (before
    ``scheduler.run()``, as any middleware).  ``queue_metrics=False`` leaves
    out the two queue gauges.  Raises
    :class:`~sqla_pgotask.ConfigurationError` if ``scheduler`` is already
    instrumented.
    """
    _instrumented.check(scheduler, queue_metrics_interval)
    with _lock:
        attempts = _by_registry.get(registry)
        if attempts is None:
            attempts = _by_registry[registry] = _Attempts(registry)
        # One queue collector per registry, from the first scheduler that wants one.
        add_queue_metrics = queue_metrics and not attempts.queue_metrics
        attempts.queue_metrics = attempts.queue_metrics or queue_metrics
    _instrumented.add(scheduler)
    scheduler.middleware(attempts.middleware)
    scheduler.on_outcome(attempts.on_outcome)
    if add_queue_metrics:
        reader = QueueDepthReader(scheduler.session_factory, queue_metrics_interval)
        if multiprocess():
            # A collector in a worker process would never be asked: the
            # supervisor serves the files.  Write the gauges there instead.
            _QueueGaugeWriter(reader).start()
        else:
            registry.register(_QueueCollector(reader))


def start_http_server(
    port: int, addr: str = "0.0.0.0", registry: CollectorRegistry | None = None
) -> tuple[Any, threading.Thread]:
    """Serve ``registry`` at ``http://addr:port/metrics`` from a daemon thread.

    Returns the server (``server.server_port`` is the port, useful with
    ``port=0``) and its thread.  Without a ``registry``: the default one, or
    in multiprocess mode (``PROMETHEUS_MULTIPROC_DIR`` set) every process's
    metrics (:func:`multiprocess_registry`).  Raises ``OSError`` if the port
    cannot be bound.
    """
    if registry is None:
        registry = multiprocess_registry() if multiprocess() else REGISTRY
    server, thread = _start_http_server(port, addr, registry=registry)
    return server, thread


def multiprocess_registry(path: str | None = None) -> CollectorRegistry:
    """A registry collecting the metrics every process wrote in ``path``
    (default: ``$PROMETHEUS_MULTIPROC_DIR``)."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=path)  # type: ignore[no-untyped-call]
    return registry


class _Attempts:
    """The middleware and outcome hook that count and time attempts."""

    def __init__(self, registry: CollectorRegistry) -> None:
        #: Whether the registry has the queue gauges.
        self.queue_metrics = False
        self.started = Counter(
            "pgotask_attempt_started",
            "Task attempts started.",
            ["kind", "queue"],
            registry=registry,
        )
        self.finished = Counter(
            "pgotask_attempt_finished",
            "Task attempts finished, by outcome (once it committed).",
            ["kind", "queue", "outcome"],
            registry=registry,
        )
        self.duration = Histogram(
            "pgotask_attempt_duration_seconds",
            "Seconds each attempt's handler (and middleware) took, by outcome.",
            ["kind", "queue", "outcome"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )

    def middleware(self, call_next: CallNext, session: Session, task: Task) -> object:
        ctx = current_attempt()
        self.started.labels(ctx.kind, ctx.queue).inc()
        return call_next(session, task)

    def on_outcome(
        self, ctx: AttemptContext, outcome: Outcome, error: BaseException | None
    ) -> None:
        self.finished.labels(ctx.kind, ctx.queue, outcome.value).inc()
        if ctx.duration is not None:
            self.duration.labels(ctx.kind, ctx.queue, outcome.value).observe(ctx.duration)


class _QueueCollector(Collector):
    """The queue gauges, read (through the reader's cache) at each scrape."""

    def __init__(self, reader: QueueDepthReader) -> None:
        self.reader = reader

    def describe(self) -> Iterable[Metric]:
        # Without this, registering would read the database once to learn the names.
        return [
            GaugeMetricFamily(_TASKS, _TASKS_HELP, labels=["queue", "kind", "state"]),
            GaugeMetricFamily(_AGE, _AGE_HELP, labels=["queue", "kind"]),
            GaugeMetricFamily(_STUCK, _STUCK_HELP, labels=["worker"]),
        ]

    def collect(self) -> Iterator[Metric]:
        tasks = GaugeMetricFamily(_TASKS, _TASKS_HELP, labels=["queue", "kind", "state"])
        age = GaugeMetricFamily(_AGE, _AGE_HELP, labels=["queue", "kind"])
        for row in self.reader.read():
            for state, count in row.counts().items():
                tasks.add_metric([row.queue, row.kind, state], count)
            age.add_metric([row.queue, row.kind], row.oldest_due_seconds)
        stuck = GaugeMetricFamily(_STUCK, _STUCK_HELP, labels=["worker"])
        for worker, count in self.reader.stuck_slots().items():
            stuck.add_metric([worker], count)
        yield tasks
        yield age
        yield stuck


class _QueueGaugeWriter:
    """In a worker process of a supervisor: refreshes the queue gauges every interval."""

    def __init__(self, reader: QueueDepthReader) -> None:
        self.reader = reader
        # Every worker process reads the same numbers: the most recent wins.
        self.tasks = Gauge(
            _TASKS,
            _TASKS_HELP,
            ["queue", "kind", "state"],
            registry=None,
            multiprocess_mode="mostrecent",
        )
        self.age = Gauge(
            _AGE, _AGE_HELP, ["queue", "kind"], registry=None, multiprocess_mode="mostrecent"
        )
        self.stuck = Gauge(
            _STUCK, _STUCK_HELP, ["worker"], registry=None, multiprocess_mode="mostrecent"
        )

    def start(self) -> None:
        thread = threading.Thread(target=self._run, name="pgotask-metrics", daemon=True)
        thread.start()

    def _run(self) -> None:
        while True:
            self.write(self.reader.read())
            time.sleep(max(self.reader.interval, 1.0))

    def write(self, rows: list[QueueDepth]) -> None:
        for row in rows:
            for state, count in row.counts().items():
                self.tasks.labels(row.queue, row.kind, state).set(count)
            self.age.labels(row.queue, row.kind).set(row.oldest_due_seconds)
        for worker, count in self.reader.stuck_slots().items():  # as of that read
            self.stuck.labels(worker).set(count)
