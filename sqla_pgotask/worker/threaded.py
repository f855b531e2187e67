"""The threaded worker: handler threads that each claim, run and settle their own batches.

Each of the ``concurrency`` handler threads drives the engine's loop
(:mod:`sqla_pgotask.engine.loop`): it claims a batch for itself (sized to
what the worker has been finishing in two ``batch_window`` seconds, its
share of that, at least one task and at most ``batch_size``), runs it, one
transaction per batch (see :mod:`sqla_pgotask.engine.run`), and claims
again.  Claims are taken one at a time (a lock), on one autocommit
connection the worker keeps.  A thread whose claim came back full rings the
doorbell, so another idle thread claims too; one that found nothing waits
for the doorbell: a ``NOTIFY`` (the listener thread), a delayed task falling
due, or the poll every ``poll_interval`` seconds in case a notification was
missed.  The thread that called :meth:`Worker.run` keeps that time and
watches for handler threads stuck far past their timeout.  A maintenance
thread extends the leases of claimed tasks and rescues other workers' lost
ones.
"""

from __future__ import annotations

import logging
import math
import os
import random
import secrets
import socket
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from sqlalchemy import Connection, Engine, text
from sqlalchemy.orm import Session, sessionmaker

from sqla_pgotask._queries import query
from sqla_pgotask.config.handlers import Handler
from sqla_pgotask.config.limits import QueueLimit
from sqla_pgotask.config.retention import Retention
from sqla_pgotask.config.schedule import Schedule
from sqla_pgotask.context import AttemptContext, Outcome
from sqla_pgotask.engine import settle
from sqla_pgotask.engine.claims import KeptConnection, LimitedClaims, claim_source
from sqla_pgotask.engine.limit_plan import plan_limits
from sqla_pgotask.engine.loop import TaskLoop
from sqla_pgotask.engine.run import (
    IDLE_TIMEOUT_MARGIN,
    BatchLimits,
    BatchLostError,
    BatchRunner,
    Item,
    KindTimes,
)
from sqla_pgotask.errors import WorkerStuckError
from sqla_pgotask.middleware import NO_HOOKS, Hooks
from sqla_pgotask.models import TASK_BIND
from sqla_pgotask.worker.listener import Listener
from sqla_pgotask.worker.maintenance import Identity, Maintenance, Timing, node_id
from sqla_pgotask.worker.periodic_thread import PeriodicThread

logger = logging.getLogger("sqla_pgotask.worker")

# Seconds after a delayed task's run_at that an idle worker claims again.
_DUE_MARGIN = 0.005
# Seconds a handler thread first waits for the database to come back.
_FIRST_BACKOFF = 0.05

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


class Doorbell:
    """Wakes one idle handler thread per ring; a ring while none waits is kept (one)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._rung = False
        self._closed = False
        #: Handler threads waiting for a ring.
        self.waiting = 0

    def set(self) -> None:
        """Ring: one waiting thread wakes (or the next to wait does not wait)."""
        with self._cond:
            self._rung = True
            self._cond.notify()

    def wait(self) -> None:
        """Wait for a ring (or :meth:`close`)."""
        with self._cond:
            self.waiting += 1
            try:
                while not self._rung and not self._closed:
                    self._cond.wait()
                self._rung = False
            finally:
                self.waiting -= 1

    def close(self) -> None:
        """Wake every waiting thread, now and from now on."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()


class _Notice:
    """What the listener sets on a notification: the doorbell, and the limits' gate."""

    def __init__(self, doorbell: Doorbell, limited: LimitedClaims | None) -> None:
        self._doorbell = doorbell
        self._limited = limited

    def set(self) -> None:
        if self._limited is not None:
            self._limited.kick()
        self._doorbell.set()


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
        self.handlers = dict(handlers)
        self.settings = settings
        self.worker_id = worker_id
        self.stats = WorkerStats()
        self._max_attempts = {kind: h.max_attempts for kind, h in sorted(self.handlers.items())}
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        # Claims are taken one at a time: a claim that failed in flight may
        # have committed unseen, and its rows are given back (knowing every
        # task the worker holds) before the next one.
        self._claim_lock = threading.Lock()
        self._orphans_possible = False
        self._claim_failures = 0
        self.doorbell = Doorbell()
        # When the watching thread rings next by time alone (a poll, a
        # delayed task falling due, a rate window), as time.monotonic().
        self._tick = threading.Condition()
        self._ring_at: float | None = None
        # Claimed attempts not finished yet, queued or running, by task id.
        self._in_flight: dict[int, AttemptContext] = {}
        self._running: dict[int, AttemptContext] = {}
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
        # Fleet-wide limits: limited tasks go through a locked claim (see engine.claims).
        self.source = claim_source(
            KeptConnection(engine),
            worker_id=worker_id,
            kinds=self._max_attempts,
            queues=settings.queues,
            lease_seconds=settings.timing.lease,
            plan=plan_limits(self.handlers, queue_limits or {}, settings.queues),
            poll_interval=settings.poll_interval,
        )
        limited = self.source if isinstance(self.source, LimitedClaims) else None
        notice = _Notice(self.doorbell, limited)
        # Started only if settings.listen; on listen_engine, if given.
        self.listener = Listener(
            listen_engine or engine,
            notice,
            settings.queues,
            self._cancel_requested,
        )
        self.maintenance = Maintenance(
            engine,
            self.identity,
            settings.timing,
            self._attempts,
            self.doorbell.set,
            retention=settings.retention,
        )
        # Enqueues the periodic schedules of this worker's kinds and queues.
        self.periodic = PeriodicThread(engine, schedules) if schedules else None

    def stop(self) -> None:
        """Ask the worker to stop; :meth:`run` returns once in-flight tasks finished."""
        self._stopping.set()
        self.doorbell.close()
        with self._tick:
            self._tick.notify_all()

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
            # (nor threads, nor connections) behind a worker that never ran.
            self.stop()
            self._shutdown()
            self._close_source()
            raise
        try:
            self._watch()
        finally:
            self.stop()
            self._shutdown()
            self._close_source()
        logger.info("worker %s stopped: %s", self.worker_id, self.stats)
        if self._stuck:
            raise WorkerStuckError(
                f"worker {self.worker_id}: every handler thread ({self.settings.concurrency}) "
                "is stuck in a handler far past its timeout"
            )

    def _close_source(self) -> None:
        with self._claim_lock:  # not under a claim of a thread still finishing
            self.source.close()

    def _attempts(self) -> list[AttemptContext]:
        with self._lock:
            return list(self._in_flight.values())

    def _cancel_requested(self, task_id: int, attempt: int) -> None:
        with self._lock:
            ctx = self._in_flight.get(task_id)
        if ctx is not None and ctx.attempt == attempt:
            ctx.request_cancel()

    def capacity(self, usable: int | None = None) -> int:
        """How many claimed tasks the worker holds at most: what it finishes in two batch windows.

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

    # -- the watching thread (the one that called run) -------------------------

    def _watch(self) -> None:
        """Until stopped: poll (ring the doorbell) when due, and watch for stuck threads."""
        settings = self.settings
        next_poll = time.monotonic()
        while not self._stopping.is_set():
            stuck, next_stuck = self._stuck_slots()
            if settings.concurrency - stuck <= 0:
                self._all_stuck()
                return
            now = time.monotonic()
            with self._tick:
                ring_at = self._ring_at
                if ring_at is not None and ring_at <= now:
                    self._ring_at = ring_at = None
                    self.doorbell.set()
                if now >= next_poll:
                    # Jitter, so idle workers woken by the same notification do
                    # not go on polling in step.
                    next_poll = now + settings.poll_interval * random.uniform(0.9, 1.1)
                    if self.doorbell.waiting:
                        self.doorbell.set()
                wake = next_poll if ring_at is None else min(next_poll, ring_at)
                if next_stuck is not None:  # look again when a handler overruns
                    wake = min(wake, now + next_stuck)
                if not self._stopping.is_set():
                    self._tick.wait(max(0.0, wake - now))

    def _ring_later(self, seconds: float) -> None:
        """Have the watching thread ring the doorbell in ``seconds`` (unless it rings sooner)."""
        at = time.monotonic() + max(seconds, 0.0)
        with self._tick:
            if self._ring_at is None or at < self._ring_at:
                self._ring_at = at
                self._tick.notify()

    # -- the handler threads ---------------------------------------------------

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
        loop = TaskLoop(self.source, runner, self.handlers)
        stopping = self._stopping
        backoff = [_FIRST_BACKOFF]  # after a batch found the database gone
        while not stopping.is_set():
            items = self._claim(loop)
            if not items:
                self.doorbell.wait()
                continue
            loop.run(
                items,
                on_outcomes=self._settle,
                on_start=self._started,
                should_stop=stopping.is_set,
                on_stop=lambda rest: self._give_back(loop, rest),
                on_lost=lambda lost: self._record_when_possible(runner, lost, backoff),
            )

    def _claim(self, loop: TaskLoop) -> list[Item]:
        """This thread's next batch (empty: nothing due, or the claim failed)."""
        settings = self.settings
        with self._claim_lock:
            if self._stopping.is_set():
                return []
            want = self._batch_wanted()
            try:
                if self._orphans_possible:
                    self._release_orphans()
                    self._orphans_possible = False
                items, claimed = loop.claim(want)
            except Exception as exc:
                # The first retry is quick: after a restart or a killed
                # connection the pool has already dropped its dead ones.
                self._orphans_possible = True
                self._claim_failures += 1
                delay = min(0.05 * 2 ** (self._claim_failures - 1), settings.poll_interval, 5.0)
                logger.warning("claim failed (%s); retrying in %.2fs", brief(exc), delay)
                self._ring_later(delay)
                return []
            self._claim_failures = 0
            if claimed.refused:
                with self._lock:
                    self.stats.refused += claimed.refused
                    self.stats.failed += claimed.refused
            if items:
                with self._lock:
                    for _, ctx in items:
                        self._in_flight[ctx.task_id] = ctx
            if len(items) + claimed.refused >= want:
                self.doorbell.set()  # more may be due: another idle thread claims too
            elif not items:
                self._ring_later(self._until_next_due())
            hint = self.source.wait_hint()
            if hint is not None:  # a full rate window frees a start then
                self._ring_later(hint)
        return items

    def _batch_wanted(self) -> int:
        """How many tasks a thread claims: its share of the capacity, at most ``batch_size``.

        The thread claims when it holds nothing (its batch is settled), and
        runs what it claims itself: its share does not depend on what the
        other threads hold.  With a full queue of quick tasks that is
        ``batch_size``; with slow ones, one task.
        """
        usable = max(1, self.settings.concurrency - self.stats.stuck_slots)
        share = math.ceil(self.capacity(usable) / usable)
        return max(1, min(self.settings.batch.size, share))

    def _release_orphans(self) -> None:
        with self._lock:
            known = list(self._in_flight)
        released = self.source.release_orphans(known)
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
            seconds = self.source.next_due()
        except Exception as exc:
            logger.warning("could not read when the next delayed task is due (%s)", brief(exc))
            return self.settings.poll_interval
        if seconds is None:
            return self.settings.poll_interval
        # A hair after the task's run_at, so the claim finds it due.
        return max(seconds, 0.0) + _DUE_MARGIN

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

    def _give_back(self, loop: TaskLoop, items: list[Item]) -> None:
        """Stopping: claimed tasks this thread did not start go back, attempt refunded."""
        try:
            released = loop.give_back(items)
            logger.info("released %d claimed tasks that had not started", released)
        except Exception:
            logger.exception("could not release %d unstarted tasks", len(items))
        self._settle([(ctx, None) for _, ctx in items])

    def _record_when_possible(
        self, runner: BatchRunner, lost: BatchLostError, backoff: list[float]
    ) -> None:
        # The database failed under the batch (a restart, a killed
        # connection): its transaction is gone.  Record that as soon as the
        # database answers again, rather than leave the tasks to wait for
        # their leases.
        started, exc = lost.started, lost.cause
        if not started:  # not even connected: don't spin
            self._stopping.wait(backoff[0])
            backoff[0] = min(backoff[0] * 2, 1.0)
            return
        backoff[0] = _FIRST_BACKOFF
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
        # 1. Each handler thread gives back the claimed tasks it did not
        #    start (attempt refunded); running handlers get the grace period.
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
                settle.release_interrupted(
                    session.connection(bind_arguments=TASK_BIND), attempts, self.worker_id
                )
            with self._lock:
                self.stats.interrupted += len(attempts)
        except Exception:
            logger.exception("could not give back %d running tasks", len(attempts))
