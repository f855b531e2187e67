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

import threading
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

from sqlalchemy import Connection, Engine, func, select
from sqlalchemy.orm import Session, sessionmaker

from sqla_pgotask._claim import claim_tasks, release_tasks
from sqla_pgotask._connections import require_psycopg
from sqla_pgotask._execute import BatchLimits, BatchLostError, BatchRunner, new_context
from sqla_pgotask._maintenance import Timing
from sqla_pgotask.errors import ConfigurationError, UnknownKindError
from sqla_pgotask.handlers import DEFAULT_MAX_ATTEMPTS, Handler, HandlerFunc, make_handler
from sqla_pgotask.models import Task, TaskStatus
from sqla_pgotask.retry import RetrySpec
from sqla_pgotask.schema import check_schema
from sqla_pgotask.worker import Worker, WorkerSettings, WorkerStats, new_worker_id


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
    """

    def __init__(
        self,
        session_factory: sessionmaker[Session],
        *,
        concurrency: int = 4,
        queues: Sequence[str] | None = None,
        poll_interval: float = 1.0,
        lease_seconds: float = 30.0,
        heartbeat_interval: float | None = None,
        maintenance_interval: float = 5.0,
        dead_after: float | None = None,
        shutdown_grace: float = 30.0,
        batch_size: int = 100,
        batch_window: float = 0.1,
    ) -> None:
        if not isinstance(session_factory, sessionmaker):
            raise ConfigurationError(
                "Scheduler needs the application's sessionmaker, "
                f"not {type(session_factory).__name__}"
            )
        self.session_factory = session_factory
        self.settings = _settings(
            concurrency=concurrency,
            queues=queues,
            poll_interval=poll_interval,
            shutdown_grace=shutdown_grace,
            timing=_timing(lease_seconds, heartbeat_interval, maintenance_interval, dead_after),
            batch=_batch_limits(batch_size, batch_window),
        )
        self._handlers: dict[str, Handler] = {}
        self._lock = threading.Lock()
        self._worker: Worker | None = None
        self._starting = False
        self._stop_requested = False
        self._schema_checked = False

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
        or hold locks for long).
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
            )
            with self._lock:
                if kind in self._handlers:
                    raise ConfigurationError(f"a handler for kind {kind!r} is already registered")
                self._handlers[kind] = handler
            return handler

        return register

    @property
    def handlers(self) -> Mapping[str, Handler]:
        """The registered handlers by kind (read-only)."""
        return MappingProxyType(self._handlers)

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

    # -- running ------------------------------------------------------------

    def check_schema(self) -> None:
        """Raise :class:`~sqla_pgotask.SchemaError` unless the database schema is current."""
        check_schema(self.session_factory)
        self._schema_checked = True

    def run(
        self,
        *,
        concurrency: int | None = None,
        queues: Sequence[str] | None = None,
        poll_interval: float | None = None,
        shutdown_grace: float | None = None,
    ) -> WorkerStats:
        """Run a worker in this thread until :meth:`stop` is called; return what it did.

        Arguments override the Scheduler's settings for this run.  The library
        installs no signal handlers: call :meth:`stop` from one of yours (the
        ``pgotask worker`` command does) or from another thread.
        """
        current = self.settings
        settings = _settings(
            concurrency=current.concurrency if concurrency is None else concurrency,
            queues=current.queues if queues is None else queues,
            poll_interval=current.poll_interval if poll_interval is None else poll_interval,
            shutdown_grace=current.shutdown_grace if shutdown_grace is None else shutdown_grace,
            timing=current.timing,
            batch=current.batch,
        )
        self._require_handlers()
        with self._lock:
            if self._starting or self._worker is not None:
                raise ConfigurationError("this scheduler is already running a worker")
            self._starting = True
            self._stop_requested = False
        try:
            self.check_schema()
            worker = Worker(
                self.session_factory,
                self._engine(),
                self._handlers,
                settings,
                new_worker_id(),
                bind=self._bind(),
            )
            with self._lock:
                self._worker = worker
                if self._stop_requested:  # stop() came while we were starting
                    worker.stop()
        finally:
            with self._lock:
                self._starting = False
        try:
            worker.run()
        finally:
            with self._lock:
                self._worker = None
        return worker.stats

    def stop(self) -> None:
        """Stop the running worker: no new claims; in-flight tasks finish; ``run()`` returns.

        Called while :meth:`run` is still starting, it makes ``run()`` return as
        soon as it has started; called when nothing runs, it does nothing.
        """
        with self._lock:
            worker = self._worker
            if worker is None and self._starting:
                self._stop_requested = True
        if worker is not None:
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
        """The worker :meth:`run` is running, if any."""
        return self._worker

    def run_until_idle(
        self,
        *,
        queues: Sequence[str] | None = None,
        max_tasks: int | None = None,
        batch_size: int = 1,
    ) -> int:
        """Run due tasks in this thread until none is left; return how many attempts ran.

        A task that fails and is retried later is counted once per attempt run
        here; its retry is not waited for.  For tests, scripts and cron jobs.
        No heartbeats run here: a handler that takes longer than
        ``lease_seconds`` may be rescued by a worker running meanwhile, and so
        may claimed tasks waiting their turn: a ``batch_size`` above 1 is for
        tasks that are quick together.
        """
        self._require_handlers()
        if not self._schema_checked:
            self.check_schema()
        served = queues if queues is not None else self.settings.queues
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigurationError(f"batch_size must be an integer >= 1, not {batch_size!r}")
        worker_id = new_worker_id()
        limits = BatchLimits(
            size=batch_size,
            window=self.settings.batch.window,
            savepoints=self.settings.batch.savepoints,
            slow=self.settings.batch.slow,
        )
        runner = BatchRunner(self.session_factory, self._bind(), self._handlers, worker_id, limits)
        count = 0
        while max_tasks is None or count < max_tasks:
            limit = batch_size if max_tasks is None else min(batch_size, max_tasks - count)
            tasks = claim_tasks(
                self.session_factory,
                worker_id=worker_id,
                kinds={kind: h.max_attempts for kind, h in self._handlers.items()},
                queues=served,
                limit=limit,
                lease_seconds=self.settings.timing.lease,
            )
            if not tasks:
                break
            rest = [(task, new_context(task, self._handlers[task.kind])) for task in tasks]
            while rest:
                try:
                    outcomes, rest = runner.run_chunk(rest)
                except BaseException as exc:
                    # Interrupted (Ctrl-C, a database failure): what did not
                    # commit goes back (the release is fenced: what did is kept).
                    release_tasks(self.session_factory, [task for task, _ in rest])
                    if isinstance(exc, BatchLostError):
                        raise exc.cause from None
                    raise
                count += len(outcomes)
        return count

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


def _settings(
    *,
    concurrency: int,
    queues: Sequence[str] | None,
    poll_interval: float,
    shutdown_grace: float,
    timing: Timing,
    batch: BatchLimits,
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
    )


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
