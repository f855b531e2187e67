"""The worker: claims due tasks in batches and runs them on handler threads.

One thread claims (one autocommitted statement per claim, sized to the free
capacity: what the worker has been finishing in two ``batch_window``
seconds, at least one task per handler thread and at most ``batch_size``);
``concurrency`` handler threads each take a share of the claimed tasks and
run them in batches, one transaction per batch (see
:mod:`sqla_pgotask._execute`); a listener thread turns ``NOTIFY`` into
wake-ups and cancellation requests; a maintenance thread extends the leases
of claimed tasks and rescues other workers' lost ones.  The claim loop polls
every ``poll_interval`` seconds in case a notification was missed.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import random
import secrets
import socket
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from sqlalchemy import Connection, Engine, text
from sqlalchemy.orm import Session, sessionmaker

from sqla_pgotask._claim import Claimer, release_tasks
from sqla_pgotask._execute import (
    IDLE_TIMEOUT_MARGIN,
    BatchLimits,
    BatchLostError,
    BatchRunner,
    Item,
    KindTimes,
    new_context,
)
from sqla_pgotask._limits import LimitedClaims, plan_limits
from sqla_pgotask._listener import Listener
from sqla_pgotask._maintenance import Identity, Maintenance, Timing, node_id
from sqla_pgotask._periodic_thread import PeriodicThread
from sqla_pgotask._queries import query
from sqla_pgotask.context import AttemptContext, Outcome
from sqla_pgotask.errors import WorkerStuckError
from sqla_pgotask.handlers import Handler
from sqla_pgotask.limits import QueueLimit
from sqla_pgotask.middleware import NO_HOOKS, Hooks
from sqla_pgotask.models import Task
from sqla_pgotask.periodic import Schedule
from sqla_pgotask.retention import Retention

logger = logging.getLogger("sqla_pgotask.worker")

# Seconds after a delayed task's run_at that an idle worker claims again.
_DUE_MARGIN = 0.005

#: Seconds past its handler's ``timeout`` after which a running attempt's
#: thread counts as stuck: the server has cut off its SQL (and its idle
#: transaction, ``IDLE_TIMEOUT_MARGIN`` later), so whatever still holds the
#: thread is Python code that never calls ``current_attempt().check()``.
STUCK_MARGIN = IDLE_TIMEOUT_MARGIN


def brief(exc: BaseException) -> str:
    """The first line of an error: a database error's text goes on with its full SQL."""
    return str(exc).strip().partition("\n")[0] or type(exc).__name__


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
    batch: BatchLimits = field(default_factory=BatchLimits)
    #: How long finished tasks are kept; ``None``: this worker deletes none.
    retention: Retention | None = None
    #: Whether the worker LISTENs for new tasks and cancellations (else it polls).
    listen: bool = True


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
    #: Tasks that ran but were given back without using an attempt, because
    #: their batch had to be rolled back (another task's claim changed).
    released: int = 0
    #: Attempts whose handler raised :class:`~sqla_pgotask.Snooze`.
    snoozed: int = 0
    #: Claimed tasks failed at once without running: their row could not be
    #: read, or they had no attempt left (also counted in ``failed``).
    refused: int = 0
    #: Handler threads stuck in a handler far past its timeout, at the end.
    stuck_slots: int = 0

    def count(self, outcome: Outcome) -> None:
        """Add one ``outcome``."""
        name = "retried" if outcome is Outcome.RETRY else outcome.value
        setattr(self, name, getattr(self, name) + 1)

    @property
    def total(self) -> int:
        """Attempts that ran to an outcome."""
        return (
            self.succeeded + self.retried + self.failed + self.cancelled + self.lost + self.snoozed
        )


class Throughput:
    """Tasks finished per second, recently (exponentially weighted, per tenth of a second)."""

    def __init__(self, period: float = 0.1) -> None:
        self.period = period
        self._rate = 0.0
        self._count = 0
        self._since = time.monotonic()
        self._lock = threading.Lock()

    def add(self, n: int) -> None:
        """``n`` more tasks finished."""
        with self._lock:
            self._count += n

    def rate(self) -> float:
        """The recent rate, in tasks per second."""
        with self._lock:
            now = time.monotonic()
            elapsed = now - self._since
            if elapsed >= self.period:
                current = self._count / elapsed
                # Rising fast (a burst has begun), falling slowly.
                weight = 0.7 if current > self._rate else 0.2
                self._rate += weight * (current - self._rate)
                self._count = 0
                self._since = now
            return self._rate


class Worker:
    """A running worker; made and driven by :meth:`Scheduler.run`."""

    def __init__(
        self,
        session_factory: sessionmaker[Session],
        engine: Engine,
        handlers: Mapping[str, Handler],
        settings: WorkerSettings,
        worker_id: str,
        bind: Engine | Connection | None = None,
        schedules: Sequence[Schedule] = (),
        queue_limits: Mapping[str, QueueLimit] | None = None,
        hooks: Hooks = NO_HOOKS,
        listen_engine: Engine | None = None,
    ) -> None:
        self.session_factory = session_factory
        self.hooks = hooks
        self.bind = engine if bind is None else bind
        self.times = KindTimes()
        self._throughput = Throughput()
        self._claimer = Claimer(engine)
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
        self._work: queue.SimpleQueue[Item | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        #: Set when every handler thread got stuck: run() raises WorkerStuckError.
        self._stuck = False
        self.identity = Identity(
            id=worker_id,
            host=socket.gethostname(),
            pid=os.getpid(),
            node=node_id(),
            kinds=list(self._max_attempts),
            queues=settings.queues,
            concurrency=settings.concurrency,
        )
        # Fleet-wide limits: limited tasks go through a locked claim (see _limits).
        plan = plan_limits(self.handlers, queue_limits or {}, settings.queues)
        self._limited = (
            None
            if plan is None
            else LimitedClaims(engine, plan, poll_interval=settings.poll_interval, wake=self._wake)
        )
        notice = self._wake if self._limited is None else self._limited.notice
        # Started only if settings.listen; on listen_engine, if given.
        self.listener = Listener(
            listen_engine or engine, notice, settings.queues, self._cancel_requested
        )
        self.maintenance = Maintenance(
            engine,
            self.identity,
            settings.timing,
            self._attempts,
            self._wake.set,
            retention=settings.retention,
        )
        # Enqueues the periodic schedules of this worker's kinds and queues.
        self.periodic = PeriodicThread(engine, schedules) if schedules else None

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
        try:
            if self.settings.listen:
                self.listener.start()
            self.maintenance.start()
            if self.periodic is not None:
                self.periodic.start()
            for n in range(self.settings.concurrency):
                thread = threading.Thread(
                    target=self._handler_loop, name=f"pgotask-handler-{n}", daemon=True
                )
                thread.start()
                self._threads.append(thread)
        except BaseException:
            # Say, the system refused another thread: leave no registry row
            # (nor threads) behind a worker that never ran.
            self._shutdown()
            raise
        try:
            self._claim_loop()
        finally:
            self._claimer.close()
            if self._limited is not None:
                self._limited.close()
            self._shutdown()
        logger.info("worker %s stopped: %s", self.worker_id, self.stats)
        if self._stuck:
            raise WorkerStuckError(
                f"worker {self.worker_id}: every handler thread ({self.settings.concurrency}) "
                "is stuck in a handler far past its timeout"
            )

    def _attempts(self) -> list[AttemptContext]:
        with self._lock:
            return list(self._in_flight.values())

    def _cancel_requested(self, task_id: int, attempt: int) -> None:
        with self._lock:
            ctx = self._in_flight.get(task_id)
        if ctx is not None and ctx.attempt == attempt:
            ctx.request_cancel()

    def capacity(self, usable: int | None = None) -> int:
        """How many claimed tasks to hold: what the worker finishes in two batch windows.

        At least one per usable handler thread (``usable``, all of them by
        default), at most ``batch_size`` per thread.  Judged by throughput
        rather than by each task's time, which includes waiting for the GIL
        behind the other threads.
        """
        limits = self.settings.batch
        concurrency = self.settings.concurrency if usable is None else usable
        rate = self._throughput.rate()
        wanted = int(rate * 2 * limits.window)
        return max(concurrency, min(concurrency * limits.size, wanted))

    def _claim_loop(self) -> None:
        settings = self.settings
        failures = 0
        # A claim that failed in flight may have committed unseen: its rows
        # are given back before the next claim (see Claimer.release_orphans).
        orphans_possible = False
        while not self._stopping.is_set():
            self._wake.clear()
            stuck, next_stuck = self._stuck_slots()
            usable = settings.concurrency - stuck
            if usable <= 0:
                self._all_stuck()
                return
            capacity = self.capacity(usable)
            with self._lock:
                # Tasks held by stuck threads take no capacity: they are not
                # ours any more (their lease ran out) and will not return soon.
                free = capacity - len(self._in_flight) + stuck
            # Jitter, so idle workers woken by the same notification do not
            # go on polling in step.
            wait = settings.poll_interval * random.uniform(0.9, 1.1)
            if next_stuck is not None:  # look again when a handler overruns
                wait = min(wait, next_stuck)
            # Below a quarter of the capacity free, wait for more room.
            if free > 0 and free * 4 >= capacity:
                try:
                    if orphans_possible:
                        self._release_orphans()
                        orphans_possible = False
                    if self._limited is not None:  # limited tasks first, then the rest
                        tasks = self._limited.claim(
                            self._claimer,
                            worker_id=self.worker_id,
                            limit=free,
                            lease_seconds=settings.timing.lease,
                        )
                    else:
                        tasks = self._claimer.claim(
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
                    orphans_possible = True
                    failures += 1
                    delay = min(0.05 * 2 ** (failures - 1), settings.poll_interval, 5.0)
                    logger.warning("claim failed (%s); retrying in %.2fs", brief(exc), delay)
                    self._stopping.wait(delay)
                    continue
                if tasks.refused:
                    with self._lock:
                        self.stats.refused += tasks.refused
                        self.stats.failed += tasks.refused
                for task in tasks:
                    ctx = new_context(task, self.handlers[task.kind])
                    with self._lock:
                        self._in_flight[task.id] = ctx
                    self._work.put((task, ctx))
                if not tasks and not tasks.refused:  # nothing is due: when will something be?
                    wait = min(wait, self._until_next_due())
                hint = None if self._limited is None else self._limited.wait_hint()
                if hint is not None:  # a full rate window frees a start then
                    wait = min(wait, hint)
                elif tasks.refused and not tasks:
                    wait = 0.0  # the claim took only unrunnable tasks: claim again now
            self._wake.wait(wait)

    def _release_orphans(self) -> None:
        with self._lock:
            known = list(self._in_flight)
        released = self._claimer.release_orphans(self.worker_id, known)
        if released:
            logger.warning(
                "gave back %d tasks claimed by a claim whose reply was lost: %s",
                len(released),
                released,
            )

    def _stuck_slots(self) -> tuple[int, float | None]:
        """How many handler threads are stuck, and seconds until another one may be."""
        now = time.monotonic()
        stuck = 0
        soonest: float | None = None
        with self._lock:
            running = list(self._running.values())
        for ctx in running:
            deadline = ctx.deadline
            if deadline is None or ctx.ended is not None:
                continue
            left = deadline + STUCK_MARGIN - now
            if left <= 0:
                stuck += 1
            elif soonest is None or left < soonest:
                soonest = left
        if stuck != self.stats.stuck_slots:
            self._report_stuck(stuck, running, now)
        return stuck, soonest

    def _report_stuck(self, stuck: int, running: list[AttemptContext], now: float) -> None:
        before, self.stats.stuck_slots = self.stats.stuck_slots, stuck
        self.maintenance.stuck_slots = stuck
        if stuck > before:
            overdue = [
                f"task {ctx.task_id} ({ctx.kind}) {now - (ctx.started or now):.0f}s into a "
                f"{ctx.timeout:g}s timeout"
                for ctx in running
                if ctx.deadline is not None and ctx.deadline + STUCK_MARGIN <= now
            ]
            logger.error(
                "%d of %d handler threads are stuck in handlers far past their timeout (%s); "
                "claiming for the other %d only",
                stuck,
                self.settings.concurrency,
                "; ".join(overdue),
                self.settings.concurrency - stuck,
            )
        elif stuck < before:
            logger.warning(
                "%d of %d handler threads stuck now (a stuck handler returned)",
                stuck,
                self.settings.concurrency,
            )

    def _all_stuck(self) -> None:
        logger.error(
            "every handler thread (%d) is stuck in a handler far past its timeout: the worker "
            "stops, giving back what it had claimed, so a fresh process can take over",
            self.settings.concurrency,
        )
        self._stuck = True
        self._stopping.set()

    def _until_next_due(self) -> float:
        try:
            source = self._claimer if self._limited is None else self._limited
            seconds = source.next_due(self._max_attempts, self.settings.queues)
        except Exception as exc:
            logger.warning("could not read when the next delayed task is due (%s)", brief(exc))
            return self.settings.poll_interval
        if seconds is None:
            return self.settings.poll_interval
        # A hair after the task's run_at, so the claim finds it due.
        return max(seconds, 0.0) + _DUE_MARGIN

    def _handler_loop(self) -> None:
        runner = BatchRunner(
            self.session_factory,
            self.bind,
            self.handlers,
            self.worker_id,
            self.settings.batch,
            self.times,
            self.hooks,
        )
        concurrency = self.settings.concurrency
        size = self.settings.batch.size
        last = False
        while not last:
            item = self._work.get()
            if item is None:
                return
            # Take a fair share of what is queued, so the other threads get some.
            share = min(size, max(1, math.ceil(self._work.qsize() / concurrency)))
            batch = [item]
            while len(batch) < share:
                try:
                    more = self._work.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    last = True
                    break
                batch.append(more)
            self._run_batch(runner, batch)

    def _run_batch(self, runner: BatchRunner, batch: list[Item]) -> None:
        rest = batch
        delay = 0.05
        while rest:
            if self._stopping.is_set():
                self._give_back(rest)
                return
            try:
                outcomes, rest = runner.run_chunk(
                    rest, on_start=self._started, should_stop=self._stopping.is_set
                )
            except BatchLostError as failed:
                # The database failed under the batch (a restart, a killed
                # connection): its transaction is gone.  Record that as soon
                # as the database answers again, rather than leave the tasks
                # to wait for their leases.
                self._record_when_possible(runner, failed.started, failed.cause)
                rest = failed.rest
                if not failed.started:  # not even connected: don't spin
                    self._stopping.wait(delay)
                    delay = min(delay * 2, 1.0)
                continue
            delay = 0.05
            self._settle(outcomes)

    def _started(self, ctx: AttemptContext) -> None:
        with self._lock:
            self._running[ctx.task_id] = ctx

    def _settle(self, outcomes: Sequence[tuple[AttemptContext, Outcome | None]]) -> None:
        self._throughput.add(len(outcomes))
        with self._lock:
            for ctx, outcome in outcomes:
                if outcome is not None:
                    self.stats.count(outcome)
                self._in_flight.pop(ctx.task_id, None)
                self._running.pop(ctx.task_id, None)
        if self._limited is not None:  # a limited task's slot may be free
            self._limited.finished(ctx.task_id for ctx, _ in outcomes)
        self._wake.set()

    def _give_back(self, items: list[Item]) -> None:
        """Stopping: claimed tasks this thread did not start go back, attempt refunded."""
        try:
            released = release_tasks(self.session_factory, [task for task, _ in items])
            logger.info("released %d claimed tasks that had not started", released)
        except Exception:
            logger.exception("could not release %d unstarted tasks", len(items))
        self._settle([(ctx, None) for _, ctx in items])

    def _record_when_possible(
        self, runner: BatchRunner, started: list[AttemptContext], exc: Exception
    ) -> None:
        if not started:
            return
        logger.warning(
            "database failed under %d running tasks (%s); recording it when it is back: %s",
            len(started),
            exc,
            [ctx.task_id for ctx in started],
        )
        delay = 0.05
        deadline = time.monotonic() + self.settings.timing.lease
        pending = [ctx for ctx in started if not ctx.lost]
        outcomes: list[tuple[AttemptContext, Outcome | None]] = []
        while pending and time.monotonic() < deadline:
            try:
                outcomes = list(runner.record_failures(pending, exc))
                pending = []
            except Exception:
                time.sleep(delay)
                delay = min(delay * 2, 1.0)
                pending = [ctx for ctx in pending if not ctx.lost]
        if pending:
            logger.error(
                "outcome of tasks %s not recorded; their leases will expire",
                [ctx.task_id for ctx in pending],
            )
        recorded = {id(ctx) for ctx, _ in outcomes}
        self._settle(outcomes + [(ctx, None) for ctx in started if id(ctx) not in recorded])

    def _shutdown(self) -> None:
        # 0. No more periodic slots from this worker.
        if self.periodic is not None:
            self.periodic.stop()
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
        # (Every thread stuck: none will finish, so none is waited for.)
        grace = 0.0 if self._stuck else self.settings.shutdown_grace
        deadline = time.monotonic() + grace
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
