"""The Scheduler: where handlers are registered and workers are started.

It holds the registry (handlers, middleware and outcome hooks, queue limits,
periodic schedules) and the settings; running is in :mod:`sqla_pgotask.worker`
(:mod:`~sqla_pgotask.worker.fleet` for :meth:`Scheduler.run`,
:mod:`~sqla_pgotask.worker.inline` for :meth:`Scheduler.run_until_idle`).

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

import datetime as dt
import threading
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, overload

from sqlalchemy import URL, Engine, func, select
from sqlalchemy.orm import Session, sessionmaker

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
from sqla_pgotask.errors import ConfigurationError, UnknownKindError
from sqla_pgotask.middleware import Hooks, Middleware, OutcomeHook, check_callable
from sqla_pgotask.models import Task, TaskStatus
from sqla_pgotask.schema import check_schema
from sqla_pgotask.worker import inline
from sqla_pgotask.worker.fleet import Fleet
from sqla_pgotask.worker.periodic import enqueue_periodic
from sqla_pgotask.worker.settings import (
    batch_limits,
    check_retention,
    lanes,
    listen_engine,
    queue_names,
    timing,
    worker_settings,
)
from sqla_pgotask.worker.threaded import Worker, WorkerStats

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
    transaction (each handler in a savepoint of its own, sent only if it runs
    SQL and never released, all completed by one statement and one commit); ``1`` gives every
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
        self._lanes = lanes(queues)
        self.settings = worker_settings(
            concurrency=concurrency,
            queues=queue_names(queues, self._lanes),
            poll_interval=poll_interval,
            shutdown_grace=shutdown_grace,
            timing=timing(lease_seconds, heartbeat_interval, maintenance_interval, dead_after),
            batch=batch_limits(batch_size, batch_window),
            retention=check_retention(retention),
            listen=listen is not False,
        )
        self._listen_engine = listen_engine(listen)
        self._handlers: dict[str, Handler] = {}
        self._lock = threading.Lock()
        self._fleet = Fleet()
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
        run_lanes = self._lanes if queues is None else lanes(queues)
        settings = worker_settings(
            concurrency=current.concurrency if concurrency is None else concurrency,
            queues=current.queues if queues is None else queue_names(queues, run_lanes),
            poll_interval=current.poll_interval if poll_interval is None else poll_interval,
            shutdown_grace=current.shutdown_grace if shutdown_grace is None else shutdown_grace,
            timing=current.timing,
            batch=current.batch,
            retention=current.retention,
            listen=current.listen,
        )
        self._require_handlers()
        return self._fleet.run(
            self.session_factory,
            self._handlers,
            settings,
            run_lanes,
            schedules=list(self._schedules.values()),
            queue_limits=self._queue_limits,
            hooks=lambda: self.hooks,
            listen_engine=self._listen_engine,
            check_schema=self.check_schema,
        )

    def stop(self) -> None:
        """Stop the running worker: no new claims; in-flight tasks finish; ``run()`` returns.

        Called while :meth:`run` is still starting, it makes ``run()`` return as
        soon as it has started; called when nothing runs, it does nothing.
        """
        self._fleet.stop()

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
        return self._fleet.first

    @property
    def running_workers(self) -> list[Worker]:
        """Every worker :meth:`run` is running: one, or one per queue."""
        return self._fleet.workers

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
        served = self.settings.queues if queues is None else queue_names(queues, lanes(queues))
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigurationError(f"batch_size must be an integer >= 1, not {batch_size!r}")
        return inline.run_until_idle(
            self.session_factory,
            self._handlers,
            self.settings,
            queues=served,
            queue_limits=self._queue_limits,
            hooks=self.hooks,
            batch_size=batch_size,
            max_tasks=max_tasks,
        )

    def _require_handlers(self) -> None:
        if not self._handlers:
            raise ConfigurationError("no handlers are registered on this scheduler")
