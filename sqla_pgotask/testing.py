"""Helpers for the application's own tests: run, inspect and assert on real tasks.

Tasks stay real rows in the real database, inside the test's transaction: no
in-memory fake.  Every helper takes the test's Session (or its Connection),
so they work with the usual rolled-back-transaction fixture, and every task
runs through the production path (claim, handler in a savepoint, fenced
completion), so retries, ``TaskError`` rows, results and
``current_attempt()`` behave as they do in a worker::

    from sqla_pgotask.testing import assert_enqueued, drain, inline

    def test_checkout_sends_a_receipt(session):
        checkout(session, order_id=7)                     # adds a Task
        assert_enqueued(session, kind="send_receipt", payload={"order_id": 7})
        result = drain(scheduler, session)                # runs it, in this transaction
        assert result.succeeded == 1
        assert session.get(Order, 7).receipt_sent         # the handler's write

    def test_inline(session):
        with inline(scheduler, session):                  # tasks run at each commit
            checkout(session, order_id=7)                 # ...which calls session.commit()
        assert session.get(Order, 7).receipt_sent

See ``docs/testing.md``.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, Engine, event, func, select
from sqlalchemy.orm import Session, SessionTransaction, sessionmaker

from sqla_pgotask._queries import query
from sqla_pgotask.config.handlers import Handler, HandlerFunc
from sqla_pgotask.context import Outcome
from sqla_pgotask.engine.loop import Outcomes
from sqla_pgotask.engine.run import BatchLimits
from sqla_pgotask.errors import ConfigurationError, UnknownKindError
from sqla_pgotask.models import TASK_BIND, Task, TaskError, TaskStatus
from sqla_pgotask.scheduler import Scheduler
from sqla_pgotask.schema import check_schema
from sqla_pgotask.worker.inline import session_loop
from sqla_pgotask.worker.threaded import new_worker_id

__all__ = [
    "DRAIN_LIMIT",
    "DrainLimitError",
    "DrainResult",
    "HandlerFailedError",
    "RanAttempt",
    "assert_enqueued",
    "assert_not_enqueued",
    "drain",
    "enqueued",
    "inline",
]

#: The default bound on the attempts one :func:`drain` runs.
DRAIN_LIMIT = 1000
_LISTED = 50  # tasks listed in an assertion message at most


@dataclass(frozen=True)
class RanAttempt:
    """One attempt that :func:`drain` ran."""

    task_id: int
    kind: str
    attempt: int
    #: ``"succeeded"``, ``"retry"`` (failed, to run again), ``"failed"``
    #: (failed for good), ``"cancelled"`` or ``"snoozed"``.
    outcome: str
    #: What the handler raised, for ``"retry"`` and ``"failed"``.
    error: BaseException | None = None


@dataclass
class DrainResult:
    """What :func:`drain` (or an :func:`inline` block) ran."""

    #: Every attempt, in the order they ran.
    attempts: list[RanAttempt] = field(default_factory=list)
    #: The tasks that ran, as they are now, in the order of their first attempt.
    tasks: list[Task] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.attempts)

    @property
    def counts(self) -> dict[str, int]:
        """The number of attempts by outcome."""
        return dict(Counter(a.outcome for a in self.attempts))

    @property
    def succeeded(self) -> int:
        """Attempts that succeeded."""
        return self._count(Outcome.SUCCEEDED)

    @property
    def retried(self) -> int:
        """Attempts that failed and left their task to run again."""
        return self._count(Outcome.RETRY)

    @property
    def failed(self) -> int:
        """Attempts that failed and ended their task ``failed``."""
        return self._count(Outcome.FAILED)

    @property
    def cancelled(self) -> int:
        """Attempts that ended their task ``cancelled``."""
        return self._count(Outcome.CANCELLED)

    @property
    def snoozed(self) -> int:
        """Attempts whose handler raised :class:`~sqla_pgotask.Snooze`."""
        return self._count(Outcome.SNOOZED)

    @property
    def errors(self) -> list[RanAttempt]:
        """The failed attempts (``"retry"`` and ``"failed"``)."""
        return [a for a in self.attempts if a.outcome in _FAILURES]

    def _count(self, outcome: Outcome) -> int:
        return sum(1 for a in self.attempts if a.outcome == outcome.value)


_FAILURES = (Outcome.RETRY.value, Outcome.FAILED.value)


class HandlerFailedError(AssertionError):
    """A handler raised during :func:`drain` (with ``raise_on_failure``, the default).

    The handler's exception is the ``__cause__`` (its traceback is shown
    above this one) and :attr:`error`; the failure was recorded as a worker
    records it (a ``TaskError`` row, the task retried later or ``failed``).
    :attr:`result` holds what ran until then.
    """

    def __init__(self, attempt: RanAttempt, max_attempts: int, result: DrainResult) -> None:
        then = "it will be retried" if attempt.outcome == Outcome.RETRY.value else "it failed"
        error = attempt.error
        super().__init__(
            f"task {attempt.task_id} ({attempt.kind}) attempt {attempt.attempt} of "
            f"{max_attempts} raised {_describe(error)}; {then} "
            "(drain(..., raise_on_failure=False) lets the drain go on and reports it)"
        )
        self.attempt = attempt
        self.error = error
        self.result = result


class DrainLimitError(AssertionError):
    """:func:`drain` ran ``max_tasks`` attempts and tasks were still due."""

    def __init__(self, message: str, result: DrainResult) -> None:
        super().__init__(message)
        self.result = result


# -- drain ----------------------------------------------------------------------------


def drain(
    scheduler: Scheduler,
    session_or_bind: Session | Connection | Engine | None = None,
    *,
    queues: Sequence[str] | None = None,
    kinds: Collection[str] | None = None,
    include_future: bool = False,
    raise_on_failure: bool = True,
    max_tasks: int = DRAIN_LIMIT,
) -> DrainResult:
    """Run due tasks, and those their handlers enqueue, in this thread until none is left.

    ``session_or_bind``: the test's Session (flushed first; the tasks run on
    its connection, in its transaction, and it is expired afterwards so the
    handlers' writes show), or a Connection, or an Engine; ``None``: the
    scheduler's ``sessionmaker`` as configured.  Each handler gets a Session
    of the scheduler's ``sessionmaker`` bound to that connection, in a
    savepoint, exactly as a worker runs it.

    ``queues``: only these queues (default: every queue; paused queues are
    skipped, as a worker skips them).  ``kinds``: only these kinds (default:
    every kind with a handler; a pending task of a kind without one then
    raises :class:`~sqla_pgotask.UnknownKindError`).  Fleet-wide limits
    hold as in a worker and are never waited for: a task a limit holds back
    is left pending.

    ``include_future``: also run tasks scheduled later, retries after their
    backoff and snoozed tasks, earliest first, by setting their ``run_at`` to
    now when nothing else is due.  ``raise_on_failure``: a handler that
    raises stops the drain with :class:`HandlerFailedError` (its exception
    chained), after the failure is recorded; ``False`` records it, goes on
    and reports it in the result.  ``max_tasks``: at most this many attempts;
    tasks still due after that raise :class:`DrainLimitError` (a task that
    re-enqueues or snoozes itself forever).
    """
    if isinstance(max_tasks, bool) or not isinstance(max_tasks, int) or max_tasks < 1:
        raise ConfigurationError(f"max_tasks must be an integer >= 1, not {max_tasks!r}")
    session = session_or_bind if isinstance(session_or_bind, Session) else None
    if session is not None:
        session.flush()
        bind: Connection | Engine | None = session.connection(bind_arguments=TASK_BIND)
    else:
        bind = session_or_bind  # type: ignore[assignment]
    result = DrainResult()
    try:
        _Drain(scheduler, bind, queues, kinds, include_future, raise_on_failure).run(
            result, max_tasks
        )
    finally:
        if session is not None:
            session.expire_all()  # the handlers wrote on its connection
    if session is not None:
        result.tasks = _reload(session, result)
    return result


class _Drain:
    """One drain: the tasks' Sessions, the handlers (wrapped to keep their exceptions)."""

    def __init__(
        self,
        scheduler: Scheduler,
        bind: Connection | Engine | None,
        queues: Sequence[str] | None,
        kinds: Collection[str] | None,
        include_future: bool,
        raise_on_failure: bool,
    ) -> None:
        handlers = scheduler.handlers
        if not handlers:
            raise ConfigurationError("no handlers are registered on this scheduler")
        if isinstance(queues, str) or isinstance(kinds, str):
            raise ConfigurationError("queues and kinds must be lists of names, not a string")
        if kinds is not None:
            unknown = sorted(set(kinds) - set(handlers))
            if unknown:
                raise UnknownKindError(
                    f"no handler is registered for task kind {unknown[0]!r} "
                    f"(registered: {', '.join(sorted(handlers))})"
                )
        self.all_kinds = kinds is None
        self.kinds = sorted(handlers) if kinds is None else sorted(set(kinds))
        self.queues = None if queues is None else list(queues)
        self.include_future = include_future
        self.raise_on_failure = raise_on_failure
        self.factory = _factory(scheduler.session_factory, bind)
        self.lease = scheduler.settings.timing.lease
        self.errors: dict[tuple[int, int], BaseException] = {}
        self.handlers = {
            kind: _capturing(h, self.errors) for kind, h in handlers.items() if kind in self.kinds
        }
        self.worker_id = new_worker_id()
        self.loop = session_loop(
            self.factory,
            _bind_of(self.factory),
            self.handlers,
            self.worker_id,
            BatchLimits(size=1),
            queues=self.queues,
            queue_limits=scheduler.queue_limits,
            lease_seconds=scheduler.settings.timing.lease,
            hooks=scheduler.hooks,
        )
        check_schema(self.factory)

    def run(self, result: DrainResult, max_tasks: int) -> None:
        first: dict[int, None] = {}

        def record(outcomes: Outcomes) -> None:
            for done, outcome in outcomes:
                first.setdefault(done.task_id)
                attempt = RanAttempt(
                    task_id=done.task_id,
                    kind=done.kind,
                    attempt=done.attempt,
                    outcome=outcome.value,
                    error=self.errors.pop((done.task_id, done.attempt), None)
                    if outcome.value in _FAILURES
                    else None,
                )
                if attempt.outcome in _FAILURES and attempt.error is None:
                    attempt = dataclasses.replace(attempt, error=self._recorded_error(attempt))
                result.attempts.append(attempt)
                if self.raise_on_failure and attempt.outcome in _FAILURES:
                    result.tasks = self._load(list(first))
                    raise HandlerFailedError(attempt, done.max_attempts, result) from attempt.error

        ran = self.loop.run_until_idle(
            batch_size=1,
            max_tasks=max_tasks,
            on_outcomes=record,
            when_idle=self._advance if self.include_future else None,
        )
        if ran >= max_tasks and self._remaining():
            raise DrainLimitError(
                f"drain ran {ran} attempts (max_tasks) and tasks are still due "
                f"({self._describe_remaining()}): does a handler re-enqueue or "
                "snooze its task forever?",
                result,
            )
        if self.all_kinds:
            self._check_unknown_kinds()
        result.tasks = self._load(list(first))

    def _claimable(self, *, include_future: bool) -> list[tuple[str, int]]:
        """The claimable tasks left, by kind (what a worker of these kinds and queues would run)."""
        with self.factory() as session:
            rows = session.execute(
                query("claimable_by_kind"),
                {"kinds": self.kinds, "queues": self.queues, "include_future": include_future},
                bind_arguments=TASK_BIND,
            ).all()
        return [(kind, n) for kind, n in rows]

    def _advance(self) -> bool:
        """Make the earliest tasks scheduled later due now; whether there were any."""
        with self.factory() as session:
            moved = session.execute(
                query("advance_earliest"),
                {"kinds": self.kinds, "queues": self.queues},
                bind_arguments=TASK_BIND,
            ).rowcount  # type: ignore[attr-defined]
            session.commit()
        return bool(moved)

    def _remaining(self) -> bool:
        return bool(self._claimable(include_future=self.include_future))

    def _describe_remaining(self) -> str:
        rows = self._claimable(include_future=self.include_future)
        return ", ".join(f"{n} of kind {kind!r}" for kind, n in rows)

    def _check_unknown_kinds(self) -> None:
        conditions = [Task.status == TaskStatus.PENDING, Task.kind.not_in(self.kinds)]
        if self.queues is not None:
            conditions.append(Task.queue.in_(self.queues))
        if not self.include_future:
            conditions.append(Task.run_at <= func.now())
        with self.factory() as session:
            row = session.execute(
                select(Task.id, Task.kind).where(*conditions).order_by(Task.id).limit(1)
            ).first()
        if row is not None:
            raise UnknownKindError(
                f"task {row.id} has kind {row.kind!r}, which has no handler on this scheduler "
                f"(registered: {', '.join(self.kinds)}); a worker would never run it"
            )

    def _recorded_error(self, attempt: RanAttempt) -> BaseException | None:
        # Failed outside the handler (timed out, lost): what the worker recorded.
        with self.factory() as session:
            error = session.scalar(
                select(TaskError).where(
                    TaskError.task_id == attempt.task_id, TaskError.attempt == attempt.attempt
                )
            )
            if error is None:
                return None
            return RuntimeError(f"{error.exception_type}: {error.message}\n{error.traceback}")

    def _load(self, ids: list[int]) -> list[Task]:
        if not ids:
            return []
        with self.factory() as session:
            tasks = {t.id: t for t in session.scalars(select(Task).where(Task.id.in_(ids)))}
            session.expunge_all()
        return [tasks[i] for i in ids if i in tasks]


def _reload(session: Session, result: DrainResult) -> list[Task]:
    ids = [t.id for t in result.tasks]
    if not ids:
        return []
    loaded = {
        t.id: t
        for t in session.scalars(
            select(Task).where(Task.id.in_(ids)).execution_options(populate_existing=True)
        )
    }
    return [loaded[i] for i in ids if i in loaded]


def _capturing(handler: Handler, errors: dict[tuple[int, int], BaseException]) -> Handler:
    """``handler`` whose exceptions are also kept, by task and attempt, for the report."""
    func = handler.func

    def run(session: Session, task: Task) -> object:
        try:
            return func(session, task)
        except BaseException as exc:
            errors[(task.id, task.attempts)] = exc
            raise

    wrapped: HandlerFunc = run
    return dataclasses.replace(handler, func=wrapped)


def _factory(
    session_factory: sessionmaker[Session], bind: Connection | Engine | None
) -> sessionmaker[Session]:
    """The application's ``sessionmaker`` (its options and event listeners), bound to ``bind``."""
    if bind is None:
        return session_factory
    kw = dict(session_factory.kw)
    kw["bind"] = bind
    binds = kw.get("binds")
    if binds:
        # Entries on the same database follow the test's connection.
        engine = bind.engine
        kw["binds"] = {
            key: bind if getattr(value, "engine", None) is engine else value
            for key, value in binds.items()
        }
    return sessionmaker(class_=session_factory.class_, **kw)


def _bind_of(factory: sessionmaker[Session]) -> Engine | Connection:
    with factory() as session:
        bind = session.get_bind(mapper=Task.__mapper__)
    if not isinstance(bind, Engine | Connection):
        raise ConfigurationError(f"the tasks' Sessions must be bound to an engine, not {bind!r}")
    return bind


def _describe(error: BaseException | None) -> str:
    if error is None:
        return "an error"
    return f"{type(error).__name__}: {error}"


# -- inline -----------------------------------------------------------------------


@contextmanager
def inline(
    scheduler: Scheduler,
    session: Session,
    *,
    queues: Sequence[str] | None = None,
    kinds: Collection[str] | None = None,
    raise_on_failure: bool = True,
) -> Iterator[DrainResult]:
    """Within the block, every commit of ``session`` runs the tasks due, as a very fast worker.

    After each ``session.commit()`` (the end of its outermost transaction,
    not savepoints), :func:`drain` runs on the session's connection (with the
    same ``queues``, ``kinds`` and ``raise_on_failure``), then the session
    is expired so the handlers' writes show.  A handler's exception, or a
    task of a kind without a handler, is raised from that ``commit()``
    call, after the commit.  A rollback runs nothing: like a worker, the
    handlers see only what was committed.  The block yields a
    :class:`DrainResult` that collects every attempt run in it.
    """
    total = DrainResult()
    committed: list[bool] = [False]

    def after_commit(sess: Session) -> None:
        committed[0] = True

    def after_transaction_end(sess: Session, transaction: SessionTransaction) -> None:
        if transaction.nested or transaction.parent is not None:
            committed[0] = False  # a savepoint's commit is not the application's
            return
        if not committed[0]:
            return
        committed[0] = False
        # The Session's transaction is over: the tasks run on its bind (the
        # test's Connection, still in the outer transaction, or the engine).
        bind = sess.get_bind(mapper=Task.__mapper__)
        result = DrainResult()
        try:
            _Drain(scheduler, bind, queues, kinds, False, raise_on_failure).run(result, DRAIN_LIMIT)
        finally:
            total.attempts += result.attempts
            seen = {t.id for t in total.tasks}
            total.tasks += [t for t in result.tasks if t.id not in seen]
            if result.attempts:
                sess.expire_all()

    event.listen(session, "after_commit", after_commit)
    event.listen(session, "after_transaction_end", after_transaction_end)
    try:
        yield total
    finally:
        event.remove(session, "after_commit", after_commit)
        event.remove(session, "after_transaction_end", after_transaction_end)


# -- assertions -------------------------------------------------------------------


Statuses = TaskStatus | str | Collection[TaskStatus | str] | None


def enqueued(
    session: Session,
    kind: str | None = None,
    *,
    payload: Mapping[str, Any] | None = None,
    exact: bool = False,
    queue: str | None = None,
    status: Statuses = TaskStatus.PENDING,
) -> list[Task]:
    """The tasks visible to ``session`` that match, oldest first (the session is flushed first).

    ``payload``: a subset of the task's payload (every key given, compared
    recursively in nested objects; lists and other values must be equal);
    ``exact=True`` compares the whole payload.  ``status``: the status (or
    statuses) to match, default ``pending``; ``None`` for any.
    """
    return [t for t in _visible(session, kind, queue, status) if _matches(t, payload, exact)]


def assert_enqueued(
    session: Session,
    kind: str | None = None,
    *,
    payload: Mapping[str, Any] | None = None,
    exact: bool = False,
    queue: str | None = None,
    status: Statuses = TaskStatus.PENDING,
    count: int | None = None,
) -> list[Task]:
    """Assert that matching tasks exist (exactly ``count`` of them if given); return them.

    Matches as :func:`enqueued`.  The failure message lists the tasks that
    are there.
    """
    found = enqueued(session, kind, payload=payload, exact=exact, queue=queue, status=status)
    if (count is None and not found) or (count is not None and len(found) != count):
        wanted = "at least 1" if count is None else f"exactly {count}"
        raise AssertionError(
            f"expected {wanted} task{'' if count in (None, 1) else 's'} "
            f"{_criteria(kind, payload, exact, queue, status)}, found {len(found)}"
            f"{_listing(session)}"
        )
    return found


def assert_not_enqueued(
    session: Session,
    kind: str | None = None,
    *,
    payload: Mapping[str, Any] | None = None,
    exact: bool = False,
    queue: str | None = None,
    status: Statuses = TaskStatus.PENDING,
) -> None:
    """Assert that no task matches (as :func:`enqueued`); the message lists those that do."""
    found = enqueued(session, kind, payload=payload, exact=exact, queue=queue, status=status)
    if found:
        raise AssertionError(
            f"expected no task {_criteria(kind, payload, exact, queue, status)}, "
            f"found {len(found)}:\n" + "\n".join(_line(t) for t in found)
        )


def _statuses(status: Statuses) -> list[str] | None:
    if status is None:
        return None
    values = [status] if isinstance(status, TaskStatus | str) else list(status)
    try:
        return [TaskStatus(v).value for v in values]
    except ValueError:
        raise ConfigurationError(
            f"status must be one of {', '.join(s.value for s in TaskStatus)}, not {status!r}"
        ) from None


def _visible(session: Session, kind: str | None, queue: str | None, status: Statuses) -> list[Task]:
    statuses = _statuses(status)
    session.flush()
    statement = select(Task).order_by(Task.id).execution_options(populate_existing=True)
    if kind is not None:
        statement = statement.where(Task.kind == kind)
    if queue is not None:
        statement = statement.where(Task.queue == queue)
    if statuses is not None:
        statement = statement.where(Task.status.in_([TaskStatus(s) for s in statuses]))
    return list(session.scalars(statement))


def _matches(task: Task, payload: Mapping[str, Any] | None, exact: bool) -> bool:
    if payload is None:
        return True
    if exact:
        return bool(task.payload == payload)
    return _contains(task.payload, payload)


def _contains(value: object, subset: object) -> bool:
    if isinstance(subset, Mapping):
        return isinstance(value, Mapping) and all(
            key in value and _contains(value[key], item) for key, item in subset.items()
        )
    return value == subset


def _criteria(
    kind: str | None,
    payload: Mapping[str, Any] | None,
    exact: bool,
    queue: str | None,
    status: Statuses,
) -> str:
    parts = [f"of kind {kind!r}" if kind is not None else "of any kind"]
    if payload is not None:
        parts.append(f"with payload {'==' if exact else 'containing'} {dict(payload)!r}")
    if queue is not None:
        parts.append(f"in queue {queue!r}")
    statuses = _statuses(status)
    if statuses is not None:
        parts.append(f"with status {' or '.join(statuses)}")
    return " ".join(parts)


def _listing(session: Session) -> str:
    every = list(
        session.scalars(
            select(Task)
            .order_by(Task.id)
            .limit(_LISTED + 1)
            .execution_options(populate_existing=True)
        )
    )
    if not every:
        return "; no task is enqueued at all"
    lines = [_line(t) for t in every[:_LISTED]]
    if len(every) > _LISTED:
        lines.append("  ...")
    return "; the tasks visible (any status):\n" + "\n".join(lines)


def _line(task: Task) -> str:
    return (
        f"  task {task.id}: kind={task.kind!r} queue={task.queue!r} status={task.status.value} "
        f"attempts={task.attempts} payload={task.payload!r}"
    )
