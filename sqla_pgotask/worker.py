"""The worker: claims due tasks in batches and runs them on handler threads.

One thread claims (a short committed transaction per batch, sized to the
free handler threads); ``concurrency`` handler threads each run tasks in a
Session of their own; a listener thread turns ``NOTIFY`` into wake-ups and
cancellation requests; a maintenance thread extends the leases of running
tasks and rescues other workers' lost ones.  The claim loop polls every
``poll_interval`` seconds in case a notification was missed.
"""

from __future__ import annotations

import logging
import os
import queue
import random
import secrets
import socket
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from sqlalchemy import Engine, text
from sqlalchemy.orm import Session, sessionmaker

from sqla_pgotask._claim import claim_tasks, release_tasks
from sqla_pgotask._execute import Outcome, TaskRunner, new_context
from sqla_pgotask._listener import Listener
from sqla_pgotask._maintenance import Identity, Maintenance, Timing, node_id
from sqla_pgotask._queries import query
from sqla_pgotask.context import AttemptContext
from sqla_pgotask.handlers import Handler
from sqla_pgotask.models import Task

logger = logging.getLogger("sqla_pgotask.worker")


def new_worker_id() -> str:
    """``host:pid:random``, unique per worker instance."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


@dataclass(frozen=True)
class WorkerSettings:
    """How one worker runs (see :class:`~sqla_pgotask.Scheduler`)."""

    concurrency: int
    queues: Sequence[str] | None
    poll_interval: float
    timing: Timing
    shutdown_grace: float


@dataclass
class WorkerStats:
    """Counts of what a worker did, by outcome."""

    succeeded: int = 0
    retried: int = 0
    failed: int = 0
    cancelled: int = 0
    lost: int = 0
    #: Tasks still running when the grace period ended, given back at shutdown.
    interrupted: int = 0

    def count(self, outcome: Outcome) -> None:
        """Add one ``outcome``."""
        name = "retried" if outcome is Outcome.RETRY else outcome.value
        setattr(self, name, getattr(self, name) + 1)

    @property
    def total(self) -> int:
        """Attempts that ran to an outcome."""
        return self.succeeded + self.retried + self.failed + self.cancelled + self.lost


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
        self._max_attempts = {kind: h.max_attempts for kind, h in sorted(self.handlers.items())}
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        # Claimed attempts not finished yet, queued or running, by task id.
        self._in_flight: dict[int, AttemptContext] = {}
        self._running: dict[int, AttemptContext] = {}
        self._work: queue.SimpleQueue[tuple[Task, AttemptContext] | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self.identity = Identity(
            id=worker_id,
            host=socket.gethostname(),
            pid=os.getpid(),
            node=node_id(),
            kinds=list(self._max_attempts),
            queues=settings.queues,
            concurrency=settings.concurrency,
        )
        self.listener = Listener(engine, self._wake, settings.queues, self._cancel_requested)
        self.maintenance = Maintenance(
            engine, self.identity, settings.timing, self._attempts, self._wake.set
        )

    def stop(self) -> None:
        """Ask the worker to stop; :meth:`run` returns once in-flight tasks finished."""
        self._stopping.set()
        self._wake.set()

    def run(self) -> None:
        """Claim and run tasks until :meth:`stop`."""
        logger.info(
            "worker %s starting: kinds=%s queues=%s concurrency=%d",
            self.worker_id,
            list(self._max_attempts),
            list(self.settings.queues) if self.settings.queues is not None else "all",
            self.settings.concurrency,
        )
        with self.session_factory.begin() as session:
            session.execute(query("register_worker"), self.identity.params())
        self.listener.start()
        self.maintenance.start()
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

    def _attempts(self) -> list[AttemptContext]:
        with self._lock:
            return list(self._in_flight.values())

    def _cancel_requested(self, task_id: int) -> None:
        with self._lock:
            ctx = self._in_flight.get(task_id)
        if ctx is not None:
            ctx.request_cancel()

    def _claim_loop(self) -> None:
        settings = self.settings
        failures = 0
        while not self._stopping.is_set():
            self._wake.clear()
            with self._lock:
                free = settings.concurrency - len(self._in_flight)
            if free > 0:
                try:
                    tasks = claim_tasks(
                        self.session_factory,
                        worker_id=self.worker_id,
                        kinds=self._max_attempts,
                        queues=settings.queues,
                        limit=free,
                        lease_seconds=settings.timing.lease,
                    )
                    failures = 0
                except Exception as exc:
                    # The first retry is quick: after a restart or a killed
                    # connection the pool has already dropped its dead ones.
                    failures += 1
                    delay = min(0.05 * 2 ** (failures - 1), settings.poll_interval, 5.0)
                    logger.warning("claim failed (%s); retrying in %.2fs", exc, delay)
                    self._stopping.wait(delay)
                    continue
                for task in tasks:
                    ctx = new_context(task, self.handlers[task.kind])
                    with self._lock:
                        self._in_flight[task.id] = ctx
                    self._work.put((task, ctx))
            # Jitter, so idle workers woken by the same notification do not
            # go on polling in step.
            self._wake.wait(settings.poll_interval * random.uniform(0.9, 1.1))

    def _handler_loop(self) -> None:
        runner = TaskRunner(self.session_factory, self.handlers, self.worker_id)
        try:
            while True:
                item = self._work.get()
                if item is None:
                    return
                task, ctx = item
                task_id = ctx.task_id  # the task object expires when its transaction ends
                with self._lock:
                    self._running[task_id] = ctx
                outcome: Outcome | None
                try:
                    outcome = runner.run(task, ctx)
                except Exception as exc:
                    # The database failed under the attempt (a restart, a
                    # killed connection): its transaction is gone.  Record
                    # that as soon as the database answers again, rather
                    # than leave the task to wait for its lease.
                    outcome = self._record_when_possible(runner, ctx, exc)
                with self._lock:
                    if outcome is not None:
                        self.stats.count(outcome)
                    self._in_flight.pop(task_id, None)
                    self._running.pop(task_id, None)
                self._wake.set()
        finally:
            runner.close()

    def _record_when_possible(
        self, runner: TaskRunner, ctx: AttemptContext, exc: Exception
    ) -> Outcome | None:
        logger.warning(
            "task %s (%s) attempt %s: database failed (%s); recording it when it is back",
            ctx.task_id,
            ctx.kind,
            ctx.attempt,
            exc,
        )
        delay = 0.05
        deadline = time.monotonic() + self.settings.timing.lease
        while time.monotonic() < deadline and not ctx.lost:
            try:
                return runner.record_failure(ctx, exc)
            except Exception:
                time.sleep(delay)
                delay = min(delay * 2, 1.0)
        logger.error(
            "task %s (%s): outcome not recorded; its lease will expire", ctx.task_id, ctx.kind
        )
        return None

    def _shutdown(self) -> None:
        # 1. Claimed tasks no handler started: back to pending, attempt refunded.
        unstarted: list[Task] = []
        while True:
            try:
                item = self._work.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                unstarted.append(item[0])
        if unstarted:
            try:
                released = release_tasks(self.session_factory, unstarted)
                logger.info("released %d claimed tasks that had not started", released)
            except Exception:
                logger.exception("could not release %d unstarted tasks", len(unstarted))
            with self._lock:
                for task in unstarted:
                    self._in_flight.pop(task.id, None)
        # 2. Running handlers get the grace period.
        for _ in self._threads:
            self._work.put(None)
        deadline = time.monotonic() + self.settings.shutdown_grace
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        # 3. Still running: give the tasks back now rather than at lease expiry;
        #    their handlers' transactions can no longer commit (the fence moved).
        with self._lock:
            overdue = list(self._running.values())
        if overdue:
            self._release_interrupted(overdue)
        self.maintenance.stop()
        self.listener.stop()
        try:
            with self.session_factory.begin() as session:
                session.execute(query("unregister_worker"), {"worker": self.worker_id})
        except Exception:
            logger.exception("could not unregister worker %s", self.worker_id)

    def _release_interrupted(self, attempts: list[AttemptContext]) -> None:
        for ctx in attempts:
            ctx.mark_lost()
        logger.warning(
            "grace period over: giving back %d running tasks: %s",
            len(attempts),
            [ctx.task_id for ctx in attempts],
        )
        try:
            with self.session_factory.begin() as session:
                # A handler that wrote to its own task row holds its lock: don't wait for it.
                session.execute(text("SET LOCAL lock_timeout = '2s'"))
                session.execute(
                    query("release_interrupted"),
                    {
                        "ids": [ctx.task_id for ctx in attempts],
                        "attempts": [ctx.attempt for ctx in attempts],
                        "worker": self.worker_id,
                    },
                )
            with self._lock:
                self.stats.interrupted += len(attempts)
        except Exception:
            logger.exception("could not give back %d running tasks", len(attempts))
