"""The workers of one ``Scheduler.run()``: one, or one per queue, started and stopped together.

With ``queues={queue: concurrency}`` each queue gets a worker of its own
(handler threads, claims, heartbeats), all in this process: the first runs
in the calling thread, the others in threads of their own, and when one
fails they all stop.  Before starting, the schema is checked, waiting while
the server has no connection slot free (see
:mod:`~sqla_pgotask.worker.connection_slots`).
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from sqla_pgotask.config.handlers import Handler
from sqla_pgotask.config.limits import QueueLimit
from sqla_pgotask.config.schedule import Schedule, runnable_schedules
from sqla_pgotask.errors import ConfigurationError
from sqla_pgotask.middleware import Hooks
from sqla_pgotask.worker.connection_slots import when_admitted
from sqla_pgotask.worker.settings import task_bind, task_engine
from sqla_pgotask.worker.threaded import Worker, WorkerSettings, WorkerStats, new_worker_id


class Fleet:
    """Starts the workers of a run, stops them, and adds up what they did."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._workers: list[Worker] = []
        self._starting = False
        self._stop_requested = False
        # Set by stop() while run() still waits for a connection slot.
        self._start_abandoned = threading.Event()

    @property
    def workers(self) -> list[Worker]:
        """The workers running now (none before they start, or after they end)."""
        return list(self._workers)

    @property
    def first(self) -> Worker | None:
        """The first of :attr:`workers`, if any run."""
        workers = self._workers
        return workers[0] if workers else None

    def run(
        self,
        session_factory: sessionmaker[Session],
        handlers: Mapping[str, Handler],
        settings: WorkerSettings,
        lanes: Mapping[str, int] | None,
        *,
        schedules: Sequence[Schedule],
        queue_limits: Mapping[str, QueueLimit],
        hooks: Callable[[], Hooks],
        listen_engine: Engine | None,
        check_schema: Callable[[], None],
    ) -> WorkerStats:
        """Run one worker with ``settings``, or one per queue of ``lanes``, until :meth:`stop`."""
        if lanes is None:
            plans = [settings]
        else:
            plans = [
                dataclasses.replace(settings, queues=(queue,), concurrency=n)
                for queue, n in lanes.items()
            ]
        runnable = [runnable_schedules(list(schedules), handlers, plan.queues) for plan in plans]
        with self._lock:
            if self._starting or self._workers:
                raise ConfigurationError("this scheduler is already running a worker")
            self._starting = True
            self._stop_requested = False
            self._start_abandoned.clear()
        try:
            if not when_admitted(check_schema, self._start_abandoned, "start the worker"):
                return WorkerStats()
            workers = [
                Worker(
                    session_factory,
                    task_engine(session_factory),
                    handlers,
                    plan,
                    new_worker_id(),
                    bind=task_bind(session_factory),
                    schedules=plan_schedules,
                    queue_limits=queue_limits,
                    hooks=hooks(),
                    listen_engine=listen_engine,
                )
                for plan, plan_schedules in zip(plans, runnable, strict=True)
            ]
            with self._lock:
                self._workers = workers
                if self._stop_requested:  # stop() came while we were starting
                    for worker in workers:
                        worker.stop()
        finally:
            with self._lock:
                self._starting = False
        try:
            _run_all(workers, self.stop)
        finally:
            with self._lock:
                self._workers = []
        return _total(worker.stats for worker in workers)

    def stop(self) -> None:
        """Stop the running workers; while they are still starting, make them stop once started."""
        with self._lock:
            workers = list(self._workers)
            if not workers and self._starting:
                self._stop_requested = True
                self._start_abandoned.set()
        for worker in workers:
            worker.stop()


def _run_all(workers: list[Worker], stop_all: Callable[[], None]) -> None:
    """Run the workers, the first in this thread; when one fails, stop them all and raise."""
    if len(workers) == 1:
        workers[0].run()
        return
    errors: list[BaseException] = []

    def run(worker: Worker) -> None:
        try:
            worker.run()
        except BaseException as exc:
            errors.append(exc)
            stop_all()

    threads = [
        threading.Thread(target=run, args=(w,), name=f"pgotask-queue-{w.settings.queues}")
        for w in workers[1:]
    ]
    for thread in threads:
        thread.start()
    try:
        workers[0].run()
    except BaseException:
        stop_all()
        raise
    finally:
        for thread in threads:
            thread.join()
    if errors:
        raise errors[0]


def _total(stats: Iterable[WorkerStats]) -> WorkerStats:
    total = WorkerStats()
    for one in stats:
        for name in (f.name for f in dataclasses.fields(WorkerStats)):
            setattr(total, name, getattr(total, name) + getattr(one, name))
    return total
