"""The worker: claims due tasks in batches and runs them on handler threads.

One thread claims (a short committed transaction per batch, sized to the
free handler threads); ``concurrency`` handler threads each run tasks in a
Session of their own; a listener thread turns ``NOTIFY`` into wake-ups, and
the claim loop polls every ``poll_interval`` seconds in case one was missed.
"""

from __future__ import annotations

import logging
import os
import queue
import secrets
import socket
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from sqla_pgotask._claim import claim_tasks, release_tasks
from sqla_pgotask._execute import Outcome, TaskRunner
from sqla_pgotask._listener import Listener
from sqla_pgotask.handlers import Handler
from sqla_pgotask.models import Task

logger = logging.getLogger("sqla_pgotask.worker")


def new_worker_id() -> str:
    """``host:pid:random``, unique per worker instance."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


@dataclass(frozen=True)
class WorkerSettings:
    """How one worker runs (see :meth:`Scheduler.run`)."""

    concurrency: int
    queues: Sequence[str] | None
    poll_interval: float
    lease_seconds: float


@dataclass
class WorkerStats:
    """Counts of what a worker did, by outcome."""

    succeeded: int = 0
    retried: int = 0
    failed: int = 0
    lost: int = 0

    def count(self, outcome: Outcome) -> None:
        """Add one ``outcome``."""
        if outcome is Outcome.SUCCEEDED:
            self.succeeded += 1
        elif outcome is Outcome.RETRY:
            self.retried += 1
        elif outcome is Outcome.FAILED:
            self.failed += 1
        else:
            self.lost += 1

    @property
    def total(self) -> int:
        """Attempts run."""
        return self.succeeded + self.retried + self.failed + self.lost


class Worker:
    """A running worker; made and driven by :meth:`Scheduler.run`."""

    def __init__(
        self,
        session_factory: sessionmaker[Session],
        engine: Engine,
        handlers: Mapping[str, Handler],
        settings: WorkerSettings,
        worker_id: str,
    ) -> None:
        self.session_factory = session_factory
        self.handlers = dict(handlers)
        self.settings = settings
        self.worker_id = worker_id
        self.stats = WorkerStats()
        self._kinds = sorted(self.handlers)
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._in_flight = 0
        self._work: queue.SimpleQueue[Task | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self.listener = Listener(engine, self._wake, settings.queues)

    def stop(self) -> None:
        """Ask the worker to stop; :meth:`run` returns once in-flight tasks finished."""
        self._stopping.set()
        self._wake.set()

    @property
    def stopping(self) -> bool:
        """Whether :meth:`stop` was called."""
        return self._stopping.is_set()

    def run(self) -> None:
        """Claim and run tasks until :meth:`stop`."""
        logger.info(
            "worker %s starting: kinds=%s queues=%s concurrency=%d",
            self.worker_id,
            self._kinds,
            list(self.settings.queues) if self.settings.queues is not None else "all",
            self.settings.concurrency,
        )
        self.listener.start()
        for n in range(self.settings.concurrency):
            thread = threading.Thread(
                target=self._handler_loop, name=f"pgotask-handler-{n}", daemon=True
            )
            thread.start()
            self._threads.append(thread)
        try:
            self._claim_loop()
        finally:
            self._shutdown()
        logger.info("worker %s stopped: %s", self.worker_id, self.stats)

    def _claim_loop(self) -> None:
        settings = self.settings
        failures = 0
        while not self._stopping.is_set():
            self._wake.clear()
            with self._lock:
                free = settings.concurrency - self._in_flight
            claimed = 0
            if free > 0:
                try:
                    tasks = claim_tasks(
                        self.session_factory,
                        worker_id=self.worker_id,
                        kinds=self._kinds,
                        queues=settings.queues,
                        limit=free,
                        lease_seconds=settings.lease_seconds,
                    )
                    failures = 0
                except Exception as exc:
                    failures += 1
                    delay = min(settings.poll_interval * failures, 10.0)
                    logger.warning("claim failed (%s); retrying in %.1fs", exc, delay)
                    self._stopping.wait(delay)
                    continue
                claimed = len(tasks)
                if claimed:
                    with self._lock:
                        self._in_flight += claimed
                    for task in tasks:
                        self._work.put(task)
                if claimed == free:
                    # A full batch: more may be due.  Claim again as soon as a
                    # handler thread frees up.
                    self._wake.wait(settings.poll_interval)
                    continue
            self._wake.wait(settings.poll_interval)

    def _handler_loop(self) -> None:
        runner = TaskRunner(self.session_factory, self.handlers, self.worker_id)
        try:
            while True:
                task = self._work.get()
                if task is None:
                    return
                try:
                    outcome = runner.run(task)
                    with self._lock:
                        self.stats.count(outcome)
                except Exception:
                    # The database failed while recording the outcome; the
                    # task stays claimed until its lease expires.
                    logger.exception("task %s (%s): could not record outcome", task.id, task.kind)
                finally:
                    with self._lock:
                        self._in_flight -= 1
                    self._wake.set()
        finally:
            runner.close()

    def _shutdown(self) -> None:
        unstarted: list[Task] = []
        while True:
            try:
                item = self._work.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                unstarted.append(item)
        if unstarted:
            try:
                released = release_tasks(self.session_factory, unstarted)
                logger.info("released %d claimed tasks that had not started", released)
            except Exception:
                logger.exception("could not release %d unstarted tasks", len(unstarted))
            with self._lock:
                self._in_flight -= len(unstarted)
        for _ in self._threads:
            self._work.put(None)
        for thread in self._threads:
            thread.join()
        self.listener.stop()
