"""The Scheduler: where handlers are registered and workers are started.

::

    from sqlalchemy.orm import sessionmaker
    from sqla_pgotask import Scheduler, Task

    Session = sessionmaker(create_engine("postgresql+psycopg:///app"))
    scheduler = Scheduler(Session)

    @scheduler.handler("send_email", max_attempts=10)
    def send_email(session, task):
        session.add(SentEmail(to=task.payload["to"]))  # commits with the task

    # elsewhere, in the application's own transaction:
    with Session.begin() as session:
        session.add(Task(kind="send_email", payload={"to": "a@example.com"}))

    scheduler.run(concurrency=4)  # blocks until scheduler.stop()
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, overload

from sqlalchemy import URL, Connection, Engine, create_engine, func, make_url, select
from sqlalchemy.exc import ArgumentError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

from sqla_pgotask.config.handlers import DEFAULT_MAX_ATTEMPTS, Handler, HandlerFunc, make_handler
from sqla_pgotask.config.limits import QueueLimit, RateLimitSpec, as_rate_limit, check_max_running
from sqla_pgotask.config.retention import Retention
from sqla_pgotask.config.retry import RetrySpec
from sqla_pgotask.config.schedule import (
    HandlerDecorator,
    MissedPolicy,
    Schedule,
    for_handler,
    make_schedule,
    runnable_schedules,
)
from sqla_pgotask.engine.claims import SessionConnection, claim_source
from sqla_pgotask.engine.limit_plan import plan_limits
from sqla_pgotask.engine.loop import TaskLoop
from sqla_pgotask.engine.run import BatchLimits, BatchRunner
from sqla_pgotask.errors import ConfigurationError, UnknownKindError
from sqla_pgotask.middleware import Hooks, Middleware, OutcomeHook, check_callable
from sqla_pgotask.models import Task, TaskStatus
from sqla_pgotask.schema import check_schema
from sqla_pgotask.worker.connection_slots import when_admitted
from sqla_pgotask.worker.connections import require_psycopg
from sqla_pgotask.worker.maintenance import Timing
from sqla_pgotask.worker.periodic import enqueue_periodic
from sqla_pgotask.worker.threaded import Worker, WorkerSettings, WorkerStats, new_worker_id

#: Finished tasks kept 1 day (succeeded, cancelled) or 14 days (failed).
DEFAULT_RETENTION = Retention()


class Scheduler:
    """Handlers by task kind, and the workers that run them.

    ``session_factory`` is the application's ``sessionmaker``: every handler
    runs in one of its Sessions, and the worker's own statements go through
    the same engine.

    ``lease_seconds``: how long a claim lasts without a heartbeat; a worker
    that dies (even by ``kill -9``) has its tasks rescued once their leases
    expire, or sooner once it is known dead (silent for ``dead_after``
    seconds, default ``lease_seconds``; or its process gone from the same
    machine, noticed within ``maintenance_interval``).  Live workers renew
    their leases every ``heartbeat_interval`` (default ``lease_seconds / 6``).
    ``shutdown_grace``: how long :meth:`stop` lets running handlers finish.

    ``batch_size``: how many tasks a handler thread may run in one
    transaction (each handler in a savepoint of its own that costs no round
    trip, all completed by one statement and one commit); ``1`` gives every
    task a transaction of its own.  ``batch_window``: seconds a batch's
    transaction stays open for more tasks; it also sizes the claim (what
    the worker finishes in two windows is claimed ahead).  Tasks of handlers
    with a ``timeout`` or ``batch=False``, and of kinds that take
    ``batch_window`` or longer on average, always run alone.

    ``retention``: how long finished tasks are kept, per status (a
    :class:`~sqla_pgotask.Retention`; by default succeeded and cancelled
    tasks 1 day, failed ones 14 days); the workers' maintenance loop deletes
    older ones in small batches.  ``None``: workers delete nothing.

    ``listen``: where workers ``LISTEN`` for new tasks and cancellation
    requests.  ``True``: on a connection of the application's engine.  A
    database URL (or an ``Engine``): on a connection of its own to it, while
    everything else goes through the application's engine; for an engine
    behind PgBouncer in transaction mode, point it at PostgreSQL directly or
    at a session-mode pool.  ``False``: no ``LISTEN``; workers find new
    tasks by polling every ``poll_interval`` and cancellation requests by
    their heartbeats (see ``docs/deployment.md``).

    ``middleware``: functions ``fn(call_next, session, task)`` wrapped around
    every handler attempt, the first outermost; ``on_outcome``: functions
    ``fn(ctx, outcome, error)`` called after each attempt's outcome
    committed (see :meth:`middleware`, :meth:`on_outcome` and
    ``docs/observability.md``).
    """

    def __init__(
        self,
        session_factory: sessionmaker[Session],
        *,
        concurrency: int = 4,
        queues: Sequence[str] | Mapping[str, int] | None = None,
        poll_interval: float = 1.0,
        lease_seconds: float = 30.0,
        heartbeat_interval: float | None = None,
        maintenance_interval: float = 5.0,
        dead_after: float | None = None,
        shutdown_grace: float = 30.0,
        batch_size: int = 100,
        batch_window: float = 0.1,
        retention: Retention | None = DEFAULT_RETENTION,
        listen: bool | str | URL | Engine = True,
        middleware: Sequence[Middleware] = (),
        on_outcome: Sequence[OutcomeHook] = (),
    ) -> None:
        if not isinstance(session_factory, sessionmaker):
            raise ConfigurationError(
                "Scheduler needs the application's sessionmaker, "
                f"not {type(session_factory).__name__}"
            )
        self.session_factory = session_factory
        self._lanes = _lanes(queues)
        self.settings = _settings(
            concurrency=concurrency,
            queues=_queue_names(queues, self._lanes),
            poll_interval=poll_interval,
            shutdown_grace=shutdown_grace,
            timing=_timing(lease_seconds, heartbeat_interval, maintenance_interval, dead_after),
            batch=_batch_limits(batch_size, batch_window),
            retention=_retention(retention),
            listen=listen is not False,
        )
        self._listen_engine = _listen_engine(listen)
        self._handlers: dict[str, Handler] = {}
        self._lock = threading.Lock()
        self._workers: list[Worker] = []
        self._starting = False
        self._stop_requested = False
        # Set by stop() while run() still waits for a connection slot.
        self._start_abandoned = threading.Event()
        self._schema_checked = False
        self._schedules: dict[str, Schedule] = {}
        self._queue_limits: dict[str, QueueLimit] = {}
        self._middleware: list[Middleware] = []
        self._outcome_hooks: list[OutcomeHook] = []
        for fn in middleware:
            self.middleware(fn)
        for hook in on_outcome:
            self.on_outcome(hook)

    # -- handlers -----------------------------------------------------------

    def handler(
        self,
        kind: str,
        *,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        retry: RetrySpec = None,
        queue: str = "default",
        non_retryable: tuple[type[BaseException], ...] | type[BaseException] = (),
        timeout: float | None = None,
        batch: bool = True,
        max_running: int | None = None,
        rate_limit: RateLimitSpec = None,
    ) -> Callable[[HandlerFunc], Handler]:
        """Register the decorated ``def fn(session, task)`` as the handler of ``kind``.

        ``max_attempts``: attempts before the task ends ``failed`` (a task's own
        ``max_attempts`` overrides it).  ``retry``: backoff between attempts
        (see :mod:`sqla_pgotask.retry`).  ``queue``: the queue of tasks made
        with :meth:`Handler.task`.  ``non_retryable``: exception types that
        fail the task at once.  ``timeout``: seconds an attempt may take; its
        SQL is cut off by the server, and an attempt that overruns fails with
        :class:`~sqla_pgotask.TaskTimeoutError` (see :mod:`sqla_pgotask.context`).
        ``batch=False``: each task runs in a transaction of its own, never
        batched with others (for handlers that use the raw DBAPI connection,
        or hold locks for long).  ``max_running``: at most this many tasks of
        the kind running at once, fleet-wide; ``rate_limit``: at most
        ``count`` starts per ``per`` seconds, fleet-wide, as
        ``RateLimit(count, per)`` or ``(count, per)`` (see ``docs/limits.md``).
        """

        def register(func: HandlerFunc) -> Handler:
            handler = make_handler(
                kind,
                func,
                max_attempts=max_attempts,
                retry=retry,
                queue=queue,
                non_retryable=non_retryable,
                timeout=timeout,
                batch=batch,
                max_running=max_running,
                rate_limit=rate_limit,
            )
            with self._lock:
                if kind in self._handlers:
                    raise ConfigurationError(f"a handler for kind {kind!r} is already registered")
                self._handlers[kind] = handler
            return handler

        return register

    def middleware(self, fn: Middleware) -> Middleware:
        """Wrap every handler attempt in ``fn(call_next, session, task)``; return ``fn``.

        Usable as a decorator.  ``fn`` runs in the attempt's transaction and
        ``current_attempt()`` context, calls ``call_next(session, task)`` to
        run the rest (later middleware, then the handler), and returns its
        result or raises.  Exceptions it does not catch (including
        :class:`~sqla_pgotask.Snooze` and
        :class:`~sqla_pgotask.TaskCancelledError`) count as the handler's.
        Middleware registered first is outermost.  Register it before
        :meth:`run`: a running worker keeps the middleware it started with.
        """
        check_callable(fn, "middleware")
        with self._lock:
            self._middleware.append(fn)
        return fn

    def on_outcome(self, fn: OutcomeHook) -> OutcomeHook:
        """Call ``fn(ctx, outcome, error)`` after each attempt's outcome commits; return ``fn``.

        Usable as a decorator.  ``ctx`` is the attempt's
        :class:`~sqla_pgotask.AttemptContext`, ``outcome`` an
        :class:`~sqla_pgotask.Outcome`, ``error`` what the attempt raised
        (``None`` if it did not).  Hooks run on the handler thread, outside
        any transaction, after the batch committed; an exception in a hook is
        logged and ignored.  Register them before :meth:`run`.
        """
        check_callable(fn, "on_outcome hook")
        with self._lock:
            self._outcome_hooks.append(fn)
        return fn

    @property
    def hooks(self) -> Hooks:
        """The middleware and outcome hooks registered so far (a snapshot)."""
        with self._lock:
            return Hooks(tuple(self._middleware), tuple(self._outcome_hooks))

    @property
    def handlers(self) -> Mapping[str, Handler]:
        """The registered handlers by kind (read-only)."""
        return MappingProxyType(self._handlers)

    def limit_queue(
        self,
        queue: str,
        *,
        max_running: int | None = None,
        rate_limit: RateLimitSpec = None,
    ) -> QueueLimit:
        """Limit ``queue`` fleet-wide, whatever the kinds of its tasks; return the limit.

        ``max_running``: at most this many of its tasks running at once.
        ``rate_limit``: at most ``count`` starts per ``per`` seconds, as
        ``RateLimit(count, per)`` or ``(count, per)``.  A worker enforces the
        limits it declares, so every worker serving the queue should declare
        the same (see ``docs/limits.md``).  Declare limits before ``run()``.
        """
        if not isinstance(queue, str) or not queue:
            raise ConfigurationError(
                f"limit_queue: queue must be a non-empty string, not {queue!r}"
            )
        where = f"queue {queue!r}"
        try:
            limit = QueueLimit(
                max_running=check_max_running(max_running, where),
                rate_limit=as_rate_limit(rate_limit, where),
            )
        except ConfigurationError as exc:
            raise ConfigurationError(f"{where}: {exc}") from None
        with self._lock:
            if queue in self._queue_limits:
                raise ConfigurationError(f"queue {queue!r} already has a limit")
            self._queue_limits[queue] = limit
        return limit

    @property
    def queue_limits(self) -> Mapping[str, QueueLimit]:
        """The queue limits declared with :meth:`limit_queue` (read-only)."""
        return MappingProxyType(self._queue_limits)

    def task(self, kind: str, payload: Any = None, **options: Any) -> Task:
        """A new ``Task`` of a registered ``kind``; unknown kinds raise :class:`UnknownKindError`.

        ``options`` are those of :meth:`Handler.task` (``queue``, ``priority``,
        ``run_at``, ``max_attempts``, ``dedup_key``, ``on_duplicate``).
        """
        try:
            handler = self._handlers[kind]
        except KeyError:
            known = ", ".join(sorted(self._handlers)) or "none"
            raise UnknownKindError(
                f"no handler is registered for task kind {kind!r} (registered: {known})"
            ) from None
        return handler.task(payload, **options)

    # -- periodic tasks -----------------------------------------------------

    @overload
    def periodic(
        self,
        expression: str | None = None,
        *,
        every: float | dt.timedelta | None = None,
        kind: None = None,
        name: str | None = None,
        payload: Any = None,
        timezone: str | dt.tzinfo | None = None,
        missed: MissedPolicy = "once",
        backfill: int | None = None,
        grace: float | dt.timedelta | None = None,
        queue: str | None = None,
        priority: int | None = None,
    ) -> HandlerDecorator: ...

    @overload
    def periodic(
        self,
        expression: str | None = None,
        *,
        every: float | dt.timedelta | None = None,
        kind: str,
        name: str | None = None,
        payload: Any = None,
        timezone: str | dt.tzinfo | None = None,
        missed: MissedPolicy = "once",
        backfill: int | None = None,
        grace: float | dt.timedelta | None = None,
        queue: str | None = None,
        priority: int | None = None,
    ) -> Schedule: ...

    def periodic(
        self,
        expression: str | None = None,
        *,
        every: float | dt.timedelta | None = None,
        kind: str | None = None,
        name: str | None = None,
        payload: Any = None,
        timezone: str | dt.tzinfo | None = None,
        missed: MissedPolicy = "once",
        backfill: int | None = None,
        grace: float | dt.timedelta | None = None,
        queue: str | None = None,
        priority: int | None = None,
    ) -> HandlerDecorator | Schedule:
        """Run a task of a kind on a schedule, one task per slot across all workers.

        ``expression``: a cron expression, 5 fields or 6 with seconds first,
        in ``timezone`` (an IANA name, default UTC); or ``every``: whole
        seconds (or a ``timedelta``), slots aligned to the Unix epoch.
        Stacked above ``@scheduler.handler(...)`` it schedules that
        handler's kind and returns the handler; called with ``kind=`` it
        returns the :class:`~sqla_pgotask.periodic.Schedule`.  ``name``
        (default: the kind) identifies the schedule in ``pgotask_schedule``.
        ``missed``: slots missed while no worker ran: ``"skip"`` (only a slot
        at most ``grace`` seconds late runs, default 60), ``"once"`` (the
        latest runs) or ``"backfill"`` (the latest ``backfill`` run).
        ``payload``, ``queue`` (default: the handler's) and ``priority`` are
        the tasks'.  Bad arguments raise :class:`ConfigurationError` here.
        """
        spec = make_schedule(
            expression,
            every=every,
            kind=kind,
            name=name,
            payload=payload,
            timezone=timezone,
            missed=missed,
            backfill=backfill,
            grace=grace,
            queue=queue,
            priority=priority,
        )
        if kind is not None:
            return self._add_schedule(spec)

        def decorate(handler: Handler) -> Handler:
            self._add_schedule(for_handler(spec, handler))
            return handler

        return decorate

    def _add_schedule(self, schedule: Schedule) -> Schedule:
        with self._lock:
            if schedule.name in self._schedules:
                raise ConfigurationError(
                    f"a periodic schedule named {schedule.name!r} is already registered "
                    "(give the other one a name=)"
                )
            self._schedules[schedule.name] = schedule
        return schedule

    @property
    def schedules(self) -> Mapping[str, Schedule]:
        """The registered periodic schedules by name (read-only)."""
        return MappingProxyType(self._schedules)

    def enqueue_periodic(
        self, *, queues: Sequence[str] | None = None, now: dt.datetime | None = None
    ) -> dict[str, list[dt.datetime]]:
        """Enqueue the due slots of the registered schedules once; return them by schedule.

        What a worker's periodic thread does at each slot, done once in this
        thread: for cron jobs and scripts (then :meth:`run_until_idle`), and
        tests.  ``queues`` (default: the Scheduler's) limits it to the
        schedules of those queues.  ``now`` (timezone-aware) stands in for
        the database clock.
        """
        served = self.settings.queues if queues is None else queues
        schedules = runnable_schedules(list(self._schedules.values()), self._handlers, served)
        if not self._schema_checked:
            self.check_schema()
        return enqueue_periodic(self.session_factory, schedules, now=now)

    # -- running ------------------------------------------------------------

    def check_schema(self) -> None:
        """Raise :class:`~sqla_pgotask.SchemaError` unless the database schema is current."""
        check_schema(self.session_factory)
        self._schema_checked = True

    def run(
        self,
        *,
        concurrency: int | None = None,
        queues: Sequence[str] | Mapping[str, int] | None = None,
        poll_interval: float | None = None,
        shutdown_grace: float | None = None,
    ) -> WorkerStats:
        """Run a worker in this thread until :meth:`stop` is called; return what it did.

        Arguments override the Scheduler's settings for this run.  ``queues``
        as a mapping ``{queue: concurrency}`` gives each queue handler threads
        and claims of its own: one worker per queue, in this process, whose
        stats are added up.  The library installs no signal handlers: call
        :meth:`stop` from one of yours (the ``pgotask worker`` command does)
        or from another thread.

        While the server has no connection slot free for it (``max_connections``
        reached), it waits before starting, logging a warning at each retry
        (after 0.25 s, doubling up to 5 s); a :meth:`stop` meanwhile makes it
        return at once, having run nothing.
        """
        current = self.settings
        lanes = self._lanes if queues is None else _lanes(queues)
        settings = _settings(
            concurrency=current.concurrency if concurrency is None else concurrency,
            queues=current.queues if queues is None else _queue_names(queues, lanes),
            poll_interval=current.poll_interval if poll_interval is None else poll_interval,
            shutdown_grace=current.shutdown_grace if shutdown_grace is None else shutdown_grace,
            timing=current.timing,
            batch=current.batch,
            retention=current.retention,
            listen=current.listen,
        )
        self._require_handlers()
        if lanes is None:
            plans = [settings]
        else:
            plans = [
                dataclasses.replace(settings, queues=(queue,), concurrency=n)
                for queue, n in lanes.items()
            ]
        schedules = [
            runnable_schedules(list(self._schedules.values()), self._handlers, plan.queues)
            for plan in plans
        ]
        with self._lock:
            if self._starting or self._workers:
                raise ConfigurationError("this scheduler is already running a worker")
            self._starting = True
            self._stop_requested = False
            self._start_abandoned.clear()
        try:
            if not when_admitted(self.check_schema, self._start_abandoned, "start the worker"):
                return WorkerStats()
            workers = [
                Worker(
                    self.session_factory,
                    self._engine(),
                    self._handlers,
                    plan,
                    new_worker_id(),
                    bind=self._bind(),
                    schedules=plan_schedules,
                    queue_limits=self._queue_limits,
                    hooks=self.hooks,
                    listen_engine=self._listen_engine,
                )
                for plan, plan_schedules in zip(plans, schedules, strict=True)
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
        """Stop the running worker: no new claims; in-flight tasks finish; ``run()`` returns.

        Called while :meth:`run` is still starting, it makes ``run()`` return as
        soon as it has started; called when nothing runs, it does nothing.
        """
        with self._lock:
            workers = list(self._workers)
            if not workers and self._starting:
                self._stop_requested = True
                self._start_abandoned.set()
        for worker in workers:
            worker.stop()

    def cancel(self, session: Session, task_id: int) -> TaskStatus | None:
        """Cancel a task, in ``session``'s transaction (it takes effect when that commits).

        A pending task becomes ``cancelled`` and never runs.  A running task
        is flagged: its worker is notified, ``current_attempt().check()``
        raises :class:`~sqla_pgotask.TaskCancelledError` in its handler, and
        when the handler ends its transaction is rolled back and the task ends
        ``cancelled``.  Returns the task's status after the request
        (``cancelled`` or ``running``), or ``None`` if there is no such task
        or it already finished.  Plain SQL does the same:
        ``UPDATE pgotask_task SET cancel_requested_at = now() WHERE id = ...``.
        """
        status = session.execute(select(func.pgotask_cancel(task_id))).scalar_one_or_none()
        return None if status is None else TaskStatus(status)

    @property
    def running_worker(self) -> Worker | None:
        """The worker :meth:`run` is running (the first queue's, with per-queue concurrency)."""
        workers = self._workers
        return workers[0] if workers else None

    @property
    def running_workers(self) -> list[Worker]:
        """Every worker :meth:`run` is running: one, or one per queue."""
        return list(self._workers)

    def run_until_idle(
        self,
        *,
        queues: Sequence[str] | Mapping[str, int] | None = None,
        max_tasks: int | None = None,
        batch_size: int = 1,
    ) -> int:
        """Run due tasks in this thread until none is left; return how many attempts ran.

        A task that fails and is retried later is counted once per attempt run
        here; its retry is not waited for.  For tests, scripts and cron jobs.
        No heartbeats run here: a handler that takes longer than
        ``lease_seconds`` may be rescued by a worker running meanwhile, and so
        may claimed tasks waiting their turn: a ``batch_size`` above 1 is for
        tasks that are quick together.  Fleet-wide limits hold here too, and
        are never waited for: a task held back by one is left for later.
        """
        self._require_handlers()
        if not self._schema_checked:
            self.check_schema()
        served = self.settings.queues if queues is None else _queue_names(queues, _lanes(queues))
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigurationError(f"batch_size must be an integer >= 1, not {batch_size!r}")
        worker_id = new_worker_id()
        limits = BatchLimits(
            size=batch_size,
            window=self.settings.batch.window,
            savepoints=self.settings.batch.savepoints,
            slow=self.settings.batch.slow,
        )
        runner = BatchRunner(
            self.session_factory, self._bind(), self._handlers, worker_id, limits, hooks=self.hooks
        )
        source = claim_source(
            SessionConnection(self.session_factory),
            worker_id=worker_id,
            kinds={kind: h.max_attempts for kind, h in self._handlers.items()},
            queues=served,
            lease_seconds=self.settings.timing.lease,
            # Limited tasks: never waited for here (the claims are not gated).
            plan=plan_limits(self._handlers, self._queue_limits, served),
        )
        return TaskLoop(source, runner, self._handlers).run_until_idle(
            batch_size=batch_size, max_tasks=max_tasks
        )

    def _require_handlers(self) -> None:
        if not self._handlers:
            raise ConfigurationError("no handlers are registered on this scheduler")

    def _bind(self) -> Engine | Connection:
        with self.session_factory() as session:
            bind = session.get_bind(mapper=Task.__mapper__)
        engine = bind.engine if isinstance(bind, Connection) else bind
        require_psycopg(engine)
        return bind

    def _engine(self) -> Engine:
        bind = self._bind()
        return bind.engine if isinstance(bind, Connection) else bind


def _lanes(queues: object) -> dict[str, int] | None:
    """``{queue: concurrency}`` if ``queues`` is such a mapping (checked), else ``None``."""
    if not isinstance(queues, Mapping):
        return None
    if not queues:
        raise ConfigurationError("queues must name at least one queue")
    lanes: dict[str, int] = {}
    for name, concurrency in queues.items():
        if not isinstance(name, str) or not name:
            raise ConfigurationError(f"queues must be non-empty queue names, not {name!r}")
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise ConfigurationError(
                f"the concurrency of queue {name!r} must be an integer >= 1, not {concurrency!r}"
            )
        lanes[name] = concurrency
    return lanes


def _queue_names(
    queues: Sequence[str] | Mapping[str, int] | None, lanes: dict[str, int] | None
) -> Sequence[str] | None:
    return queues if lanes is None else tuple(lanes)  # type: ignore[return-value]


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


def _settings(
    *,
    concurrency: int,
    queues: Sequence[str] | None,
    poll_interval: float,
    shutdown_grace: float,
    timing: Timing,
    batch: BatchLimits,
    retention: Retention | None,
    listen: bool,
) -> WorkerSettings:
    if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
        raise ConfigurationError(f"concurrency must be an integer >= 1, not {concurrency!r}")
    if queues is not None:
        if isinstance(queues, str):
            raise ConfigurationError("queues must be a list of queue names, not a string")
        queues = tuple(queues)
        if not queues or not all(isinstance(q, str) and q for q in queues):
            raise ConfigurationError(f"queues must be non-empty queue names, not {queues!r}")
    _positive("poll_interval", poll_interval)
    if shutdown_grace < 0:
        raise ConfigurationError(f"shutdown_grace must be >= 0, not {shutdown_grace!r}")
    return WorkerSettings(
        concurrency=concurrency,
        queues=queues,
        poll_interval=float(poll_interval),
        shutdown_grace=float(shutdown_grace),
        timing=timing,
        batch=batch,
        retention=retention,
        listen=listen,
    )


def _listen_engine(listen: object) -> Engine | None:
    """The engine of the LISTEN connection that ``listen`` names; ``None``: the application's."""
    if isinstance(listen, bool):
        return None
    if isinstance(listen, Engine):
        try:
            require_psycopg(listen)
        except ConfigurationError as exc:
            raise ConfigurationError(f"listen: {exc}") from None
        return listen
    if not isinstance(listen, str | URL):
        raise ConfigurationError(
            f"listen must be True, False, a database URL or an Engine, not {type(listen).__name__}"
        )
    try:
        url = make_url(listen)
        dialect = f"{url.get_backend_name()}+{url.get_driver_name()}"
    except ArgumentError:  # not echoed: it may hold a password
        raise ConfigurationError(
            "listen: not a database URL (expected one like postgresql+psycopg://user@host/db)"
        ) from None
    if dialect != "postgresql+psycopg":
        raise ConfigurationError(
            "listen: sqla_pgotask needs PostgreSQL through the psycopg 3 driver (a "
            f"'postgresql+psycopg://' URL), not {dialect}"
        )
    # One connection, held for the worker's life: nothing to pool.
    return create_engine(url, poolclass=NullPool)


def _retention(retention: object) -> Retention | None:
    if retention is not None and not isinstance(retention, Retention):
        raise ConfigurationError(
            "retention must be a sqla_pgotask.Retention (or None to keep finished tasks "
            f"forever), not {retention!r}"
        )
    return retention


def _batch_limits(size: int, window: float) -> BatchLimits:
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ConfigurationError(f"batch_size must be an integer >= 1, not {size!r}")
    _positive("batch_window", window)
    return BatchLimits(size=size, window=float(window), slow=float(window))


def _timing(
    lease_seconds: float,
    heartbeat_interval: float | None,
    maintenance_interval: float,
    dead_after: float | None,
) -> Timing:
    _positive("lease_seconds", lease_seconds)
    heartbeat = lease_seconds / 6 if heartbeat_interval is None else heartbeat_interval
    _positive("heartbeat_interval", heartbeat)
    if heartbeat > lease_seconds / 2:
        raise ConfigurationError(
            f"heartbeat_interval ({heartbeat:g} s) must be at most half of lease_seconds "
            f"({lease_seconds:g} s), or leases expire between heartbeats"
        )
    _positive("maintenance_interval", maintenance_interval)
    dead = lease_seconds if dead_after is None else dead_after
    if dead < 2 * heartbeat:
        raise ConfigurationError(
            f"dead_after ({dead:g} s) must be at least twice heartbeat_interval ({heartbeat:g} s)"
        )
    return Timing(
        lease=float(lease_seconds),
        heartbeat_interval=float(heartbeat),
        maintenance_interval=float(maintenance_interval),
        dead_after=float(dead),
    )


def _positive(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ConfigurationError(f"{name} must be a number > 0, not {value!r}")
