"""Running claimed tasks: their handlers, then their settlement, in batches.

A batch is one transaction on one connection.  Each task's handler gets a
Session from the application's ``sessionmaker`` joined to that connection;
after the last handler, one statement completes every task that succeeded
(fenced by status and attempt), one records the failures (the functions of
:mod:`.settle`), and the batch commits: the handlers' writes and the
tasks' completions are one commit.

Guarantee 2 holds per task: the first task of a transaction needs no
savepoint (if it fails the transaction is rolled back and begun again); each
later one runs in a savepoint of its own (sent just before the handler's
first statement, never released; none without SQL; see
:mod:`.savepoints`), so a failing handler leaves none of its
writes and the others keep theirs.  A transaction closes after ``size``
tasks, ``savepoints`` savepoints that were used, or ``window`` seconds;
tasks of handlers with a ``timeout``, or declared ``batch=False``, or whose
kind has been slow, run in a transaction of their own.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, Engine, event, text
from sqlalchemy.orm import Session, SessionTransaction, sessionmaker
from sqlalchemy.orm.base import instance_state

from sqla_pgotask.config.handlers import Handler
from sqla_pgotask.context import AttemptContext, Outcome, reset_current, set_current
from sqla_pgotask.engine import savepoints as _savepoints
from sqla_pgotask.engine import settle
from sqla_pgotask.errors import (
    HandlerTransactionError,
    Snooze,
    TaskCancelledError,
    TaskTimeoutError,
    qualified_name,
)
from sqla_pgotask.middleware import NO_HOOKS, CallNext, Hooks, compose, log_fields, notify
from sqla_pgotask.models import Task

logger = logging.getLogger("sqla_pgotask.worker")

_IN_HANDLER = "sqla_pgotask.in_handler"
#: ``session.info`` key: the handler's Session transaction, once it began one.
_ROOT = "sqla_pgotask.root"
# Bounds the handler's SQL on the server: each statement, and time spent idle
# inside the transaction (a handler stuck in Python holding locks).
_SET_TIMEOUTS = text(
    "SELECT set_config('statement_timeout', :statement, true), "
    "set_config('idle_in_transaction_session_timeout', :idle, true)"
)
# How much longer than the handler's timeout the server lets its transaction idle.
IDLE_TIMEOUT_MARGIN = 5.0

Item = tuple[Task, AttemptContext]


@dataclass(frozen=True)
class BatchLimits:
    """When a batch's transaction commits and a new one begins."""

    #: Tasks per transaction at most (1: every task in a transaction of its own).
    size: int = 100
    #: Seconds a transaction stays open for more tasks (checked between tasks).
    window: float = 0.1
    #: Task savepoints that were used, at most, per transaction.
    savepoints: int = 48
    #: A kind whose handler took this long on average runs alone.
    slow: float = 0.1


@dataclass
class KindTimes:
    """Average handler time per kind (exponentially weighted), shared by a worker's threads."""

    weight: float = 0.2
    _kinds: dict[str, float] = field(default_factory=dict)
    #: The average over all kinds (``None`` before the first run).
    overall: float | None = None

    def observe(self, kind: str, seconds: float) -> None:
        """Record one handler run of ``kind``."""
        w = self.weight
        before = self._kinds.get(kind)
        self._kinds[kind] = seconds if before is None else before + w * (seconds - before)
        overall = self.overall
        self.overall = seconds if overall is None else overall + w * (seconds - overall)

    def average(self, kind: str) -> float:
        """The average time of ``kind`` (0 before its first run)."""
        return self._kinds.get(kind, 0.0)


class BatchLostError(Exception):
    """The database failed under a batch: the outcomes of its started attempts are unknown."""

    def __init__(self, started: list[AttemptContext], rest: list[Item], cause: Exception) -> None:
        super().__init__(str(cause))
        self.started = started
        self.rest = rest
        self.cause = cause


def _forbid_handler_commit(session: Session) -> None:
    # A handler's writes must commit together with the task's completion, so
    # a handler may not commit the transaction itself.  Savepoints
    # (``session.begin_nested()``) are fine: they commit into it.
    if session.info.get(_IN_HANDLER) and session.get_nested_transaction() is None:
        raise HandlerTransactionError(
            "a handler must not call session.commit(): the worker commits the handler's "
            "writes together with the task's completion (use session.flush() to send "
            "them early, or session.begin_nested() for a savepoint)"
        )


def _note_root(session: Session, transaction: SessionTransaction) -> None:
    # The handler's Session begins its transaction when the handler first
    # uses it (or never): remember that one, to tell afterwards whether the
    # handler ended it.
    if transaction.parent is None:
        info = session.info
        if info.get(_IN_HANDLER) and _ROOT not in info:
            info[_ROOT] = transaction


_listen_lock = threading.Lock()


def _guard_commits(session_factory: sessionmaker[Session]) -> None:
    with _listen_lock:
        if not event.contains(session_factory, "before_commit", _forbid_handler_commit):
            event.listen(session_factory, "before_commit", _forbid_handler_commit)
        if not event.contains(session_factory, "after_transaction_create", _note_root):
            event.listen(session_factory, "after_transaction_create", _note_root)


@dataclass
class _Chunk:
    """What one transaction of a batch did, before it commits."""

    started: list[AttemptContext] = field(default_factory=list)
    done: list[tuple[AttemptContext, str | None]] = field(default_factory=list)
    failed: list[tuple[AttemptContext, Handler, Exception]] = field(default_factory=list)
    cancelled: list[AttemptContext] = field(default_factory=list)
    lost: list[AttemptContext] = field(default_factory=list)
    snoozed: list[tuple[AttemptContext, float]] = field(default_factory=list)
    #: What each attempt that raised raised, by ``id(ctx)`` (for outcome hooks).
    errors: dict[int, BaseException] = field(default_factory=dict)


class BatchRunner:
    """Runs claimed tasks in batches, one transaction per batch, on one thread."""

    def __init__(
        self,
        session_factory: sessionmaker[Session],
        bind: Engine | Connection,
        handlers: Mapping[str, Handler],
        worker_id: str,
        limits: BatchLimits | None = None,
        times: KindTimes | None = None,
        hooks: Hooks = NO_HOOKS,
    ) -> None:
        self.session_factory = session_factory
        self.bind = bind
        self.handlers = handlers
        self.worker_id = worker_id
        self.limits = limits or BatchLimits()
        self.times = times or KindTimes()
        self.hooks = hooks
        # Each kind's handler wrapped in the middleware once, here: with none,
        # the handlers themselves (no per-task cost).
        self._calls: Mapping[str, CallNext] = (
            {kind: compose(hooks.middleware, h) for kind, h in handlers.items()}
            if hooks.middleware
            else handlers
        )
        # A borrowed Connection may already be in a transaction that the
        # first task must not roll back: then every task takes a savepoint.
        self._own_connections = not isinstance(bind, Connection)
        _guard_commits(session_factory)
        _savepoints.install(bind.engine if isinstance(bind, Connection) else bind)

    def run_all(self, items: Sequence[Item]) -> list[Outcome]:
        """Run every item, batch after batch; the outcomes in item order (for scripts and tests)."""
        outcomes: dict[int, Outcome] = {}
        rest = list(items)
        while rest:
            done, rest = self.run_chunk(rest)
            outcomes.update((id(ctx), outcome) for ctx, outcome in done)
        return [outcomes[id(ctx)] for _, ctx in items]

    def solo(self, item: Item) -> bool:
        """Whether ``item`` must run in a transaction of its own."""
        task, _ = item
        handler = self.handlers[task.kind]
        return (
            not handler.batch
            or handler.timeout is not None
            or self.times.average(task.kind) >= self.limits.slow
        )

    def run_chunk(
        self,
        items: Sequence[Item],
        *,
        on_start: Callable[[AttemptContext], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> tuple[list[tuple[AttemptContext, Outcome]], list[Item]]:
        """Run items from the front of ``items`` in one transaction; return outcomes and the rest.

        Raises :class:`BatchLostError` if the database failed under the
        transaction; the caller records the started attempts' failure once
        the database answers again.
        """
        limits = self.limits
        chunk = _Chunk()
        n = 0
        try:
            with self._connection() as conn:
                dbapi = conn.connection.dbapi_connection
                lazy = _savepoints.register(dbapi)
                try:
                    begun = time.monotonic()
                    txn = _begin(conn)
                    fresh = self._own_connections  # nothing written in this transaction yet
                    while n < len(items):
                        item = items[n]
                        solo = self.solo(item)
                        if n and (
                            solo
                            or n >= limits.size
                            or lazy.open >= limits.savepoints
                            or time.monotonic() - begun >= limits.window
                            or (should_stop is not None and should_stop())
                        ):
                            break
                        n += 1
                        task, ctx = item
                        if on_start is not None:
                            on_start(ctx)
                        chunk.started.append(ctx)
                        if not txn.is_active:  # the previous task rolled it back
                            txn = _begin(conn)
                            lazy.new_transaction()
                            fresh = self._own_connections
                        before = lazy.statements
                        self._run_one(conn, lazy, task, ctx, chunk, fresh, solo)
                        if lazy.statements != before:
                            fresh = False
                        if solo:
                            break
                    if not txn.is_active:
                        txn = _begin(conn)
                    outcomes = self._finish(conn, txn, chunk)
                finally:
                    _savepoints.unregister(dbapi)
        except Exception as exc:
            raise BatchLostError(chunk.started, list(items[n:]), exc) from exc
        return outcomes, list(items[n:])

    def _connection(self) -> Any:
        bind = self.bind
        if isinstance(bind, Connection):
            return _Borrowed(bind)
        return bind.connect()

    def _run_one(
        self,
        conn: Connection,
        lazy: _savepoints.LazySavepoints,
        task: Task,
        ctx: AttemptContext,
        chunk: _Chunk,
        fresh: bool,
        solo: bool,
    ) -> None:
        if ctx.lost:
            chunk.lost.append(ctx)
            return
        if ctx.cancel_requested:
            chunk.cancelled.append(ctx)
            return
        handler = self.handlers[task.kind]
        # The first task of a transaction rolls back the whole transaction if
        # it fails; every later one rolls back to its own savepoint.
        mode = "rollback_only" if fresh else "create_savepoint"
        session = self.session_factory(bind=conn, join_transaction_mode=mode)
        token = set_current(ctx)
        ctx.begin()
        try:
            if not fresh:
                lazy.arm()
            elif handler.timeout is not None:
                conn.execute(
                    _SET_TIMEOUTS,
                    {
                        "statement": f"{int(handler.timeout * 1000)}ms",
                        "idle": f"{int((handler.timeout + IDLE_TIMEOUT_MARGIN) * 1000)}ms",
                    },
                )
            try:
                result = self._call(session, self._calls[task.kind], task, ctx, lazy)
            except Exception as exc:
                _rollback(session)
                if conn.invalidated:  # the connection died: the batch is gone
                    raise
                self._after_exception(handler, ctx, exc, chunk)
            else:
                chunk.done.append((ctx, _result_json(result)))
        finally:
            ctx.end()
            lazy.disarm()
            reset_current(token)
            session.close()
            self.times.observe(ctx.kind, ctx.duration or 0.0)

    def _call(
        self,
        session: Session,
        handler: CallNext,
        task: Task,
        ctx: AttemptContext,
        lazy: _savepoints.LazySavepoints,
    ) -> object:
        statements = lazy.statements
        attach(session, task)
        info = session.info
        info[_IN_HANDLER] = True
        try:
            result = handler(session, task)
            session.flush()
        finally:
            info[_IN_HANDLER] = False
        root: SessionTransaction | None = info.pop(_ROOT, None)
        if root is not None and (session.get_transaction() is not root or not root.is_active):
            raise HandlerTransactionError(
                "the handler ended the task's transaction (session.rollback() or "
                "session.close()); raise an exception to fail the task instead"
            )
        ctx.check()  # cancelled, timed out or lost while the handler ran: do not commit
        if lazy.statements != statements or _observes_commits(session):
            (root or session.begin()).commit()
        # Else the handler sent no SQL (nor did its flush), and nothing
        # listens for the commit: there is nothing to commit, and closing
        # the Session ends its transaction, if the handler began one.
        return result

    def _after_exception(
        self, handler: Handler, ctx: AttemptContext, exc: Exception, chunk: _Chunk
    ) -> None:
        chunk.errors[id(ctx)] = exc
        if ctx.lost:
            chunk.lost.append(ctx)
        elif isinstance(exc, TaskCancelledError) or ctx.cancel_requested:
            chunk.cancelled.append(ctx)
        elif isinstance(exc, Snooze):
            chunk.snoozed.append((ctx, exc.seconds))
        else:
            if ctx.timed_out and not isinstance(exc, TaskTimeoutError):
                timeout = TaskTimeoutError(ctx.timeout_message())
                timeout.__cause__ = exc
                exc = chunk.errors[id(ctx)] = timeout
            chunk.failed.append((ctx, handler, exc))

    def _finish(
        self, conn: Connection, txn: Any, chunk: _Chunk
    ) -> list[tuple[AttemptContext, Outcome]]:
        outcomes: list[tuple[AttemptContext, Outcome]] = [(c, Outcome.LOST) for c in chunk.lost]
        if chunk.done:
            done = chunk.done
            completed = settle.complete(conn, done)
            if len(completed) == len(done):
                outcomes += [(c, Outcome.SUCCEEDED) for c, _ in done]
            else:
                # A claim was lost, or cancellation requested, after its
                # handler's last check: its writes must not commit, and they
                # cannot be told apart from the others'.  Roll the batch back;
                # the tasks still ours go back to pending, attempt refunded.
                txn.rollback()
                txn = _begin(conn)
                ours = [c for c, _ in done if c.task_id in completed]
                chunk.cancelled += [c for c, _ in done if c.task_id not in completed]
                if ours:
                    settle.release(conn, [(c.task_id, c.attempt) for c in ours])
                    outcomes += [(c, Outcome.RELEASED) for c in ours]
                    logger.warning(
                        "batch rolled back (a claim changed before commit); "
                        "%d tasks given back to run again: %s",
                        len(ours),
                        [c.task_id for c in ours],
                    )
        if chunk.failed:
            outcomes += self._record_failures(conn, chunk.failed)
        if chunk.snoozed:
            held = settle.snooze(conn, chunk.snoozed)
            outcomes += _held(held, [c for c, _ in chunk.snoozed], Outcome.SNOOZED)
        if chunk.cancelled:
            held = settle.finish_cancelled(conn, chunk.cancelled)
            outcomes += _held(held, chunk.cancelled, Outcome.CANCELLED)
        txn.commit()
        for ctx, outcome in outcomes:
            _log_outcome(ctx, outcome)
        if self.hooks.on_outcome:
            notify(self.hooks.on_outcome, outcomes, chunk.errors)
        return outcomes

    def _record_failures(
        self, conn: Connection, failures: list[tuple[AttemptContext, Handler, Exception]]
    ) -> list[tuple[AttemptContext, Outcome]]:
        rows = []
        for ctx, handler, exc in failures:
            final = ctx.attempt >= ctx.max_attempts or not handler.retryable(exc)
            delay = 0.0 if final else float(handler.retry.delay(ctx.attempt))
            rows.append((ctx, exc, final, delay))
        recorded = settle.record_failures(
            conn,
            [settle.Failure(ctx, exc, final, delay) for ctx, exc, final, delay in rows],
            self.worker_id,
        )
        outcomes = []
        for ctx, exc, final, delay in rows:
            if ctx.task_id not in recorded:
                outcomes.append((ctx, Outcome.LOST))
                continue
            outcome = Outcome.FAILED if final else Outcome.RETRY
            outcomes.append((ctx, outcome))
            logger.warning(
                "task %s (%s) attempt %s failed: %s: %s%s",
                ctx.task_id,
                ctx.kind,
                ctx.attempt,
                type(exc).__name__,
                exc,
                "" if final else f" (retry in {delay:.1f}s)",
                extra={
                    **log_fields(ctx),
                    "outcome": outcome.value,
                    "duration": ctx.duration,
                    "error_type": qualified_name(type(exc)),
                },
            )
        return outcomes

    def release(self, claimed: Sequence[tuple[int, int]]) -> int:
        """Give claimed ``(id, attempt)`` pairs that never started back, in a transaction."""
        if not claimed:
            return 0
        with self._connection() as conn:
            txn = _begin(conn)
            released = settle.release(conn, claimed)
            txn.commit()
        return released

    def record_failures(
        self, contexts: Sequence[AttemptContext], exc: Exception
    ) -> list[tuple[AttemptContext, Outcome]]:
        """Record attempts whose outcome was lost with the database (once it answers again)."""
        with self._connection() as conn:
            txn = _begin(conn)
            outcomes = self._record_failures(
                conn, [(ctx, self.handlers[ctx.kind], exc) for ctx in contexts]
            )
            txn.commit()
        for ctx, outcome in outcomes:
            if outcome is Outcome.LOST:
                _log_outcome(ctx, outcome)
        if self.hooks.on_outcome:
            notify(self.hooks.on_outcome, outcomes, {id(ctx): exc for ctx in contexts})
        return outcomes


def _held(
    held: set[int], contexts: list[AttemptContext], outcome: Outcome
) -> list[tuple[AttemptContext, Outcome]]:
    """``outcome`` for the attempts whose fence held, LOST for the others."""
    return [(c, outcome if c.task_id in held else Outcome.LOST) for c in contexts]


def _begin(conn: Connection) -> Any:
    # A sessionmaker bound to a Connection already in a transaction (a test's
    # rolled-back one): the batch is a savepoint in it.
    return conn.begin_nested() if conn.in_transaction() else conn.begin()


class _Borrowed:
    """The application's own Connection (a sessionmaker bound to one), used as is."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def __enter__(self) -> Connection:
        return self.conn

    def __exit__(self, *exc: object) -> None:
        return None


def new_context(task: Task, handler: Handler) -> AttemptContext:
    """The context of the attempt about to run ``task``."""
    return AttemptContext(
        task_id=task.id,
        kind=task.kind,
        attempt=task.attempts,
        max_attempts=task.max_attempts or handler.max_attempts,
        timeout=handler.timeout,
        queue=task.queue,
    )


def _log_outcome(ctx: AttemptContext, outcome: Outcome) -> None:
    # Every record about a task carries the same ``extra`` fields (see
    # docs/observability.md); this one, the attempt's last, also its outcome
    # and the handler's duration (``None`` if it never ran).
    if outcome is Outcome.LOST:
        logger.warning(
            "task %s (%s) attempt %s: claim lost, its writes were rolled back",
            ctx.task_id,
            ctx.kind,
            ctx.attempt,
            extra={**log_fields(ctx), "outcome": outcome.value, "duration": ctx.duration},
        )
    elif logger.isEnabledFor(logging.INFO):
        duration = ctx.duration
        logger.info(
            "task %s (%s) attempt %s: %s %s",
            ctx.task_id,
            ctx.kind,
            ctx.attempt,
            _OUTCOME_WORDS[outcome],
            "before its handler ran" if duration is None else f"after {duration:.3f}s",
            extra={**log_fields(ctx), "outcome": outcome.value, "duration": duration},
        )


#: How the outcome log line says what became of an attempt.
_OUTCOME_WORDS = {
    Outcome.SUCCEEDED: "succeeded",
    Outcome.RETRY: "failed, to be retried,",
    Outcome.FAILED: "failed for good",
    Outcome.CANCELLED: "cancelled",
    Outcome.LOST: "lost",
    Outcome.RELEASED: "given back to run again",
    Outcome.SNOOZED: "snoozed",
}


def attach(session: Session, task: Task) -> None:
    """Put ``task`` in ``session`` as ``session.add()`` does, without beginning a transaction.

    The task is persistent in the Session (``task in session``, its
    ``errors`` load, ``session.refresh(task)`` works), and the Session begins
    its transaction when the handler first uses it: a handler that never
    does costs no transaction.  With listeners for attach events, the
    Session's own ``add()`` runs them.
    """
    dispatch = session.dispatch
    if dispatch.after_attach or dispatch.detached_to_persistent:
        session.add(task)
        return
    state = instance_state(task)
    session.identity_map.add(state)
    state.session_id = session.hash_key


def _observes_commits(session: Session) -> bool:
    """Whether listeners wait for the Session's commit (besides the library's own guard)."""
    dispatch = session.dispatch
    return bool(dispatch.after_commit) or len(dispatch.before_commit) > 1


def _rollback(session: Session) -> None:
    # The server may have closed the connection (idle-in-transaction timeout,
    # restart): rolling back then fails; the caller sees the connection
    # invalidated and gives up the batch.
    try:
        session.rollback()
    except Exception:
        logger.debug("rollback failed", exc_info=True)


def _result_json(result: Any) -> str | None:
    if result is None:
        return None
    try:
        return json.dumps(result, allow_nan=False)
    except (TypeError, ValueError):
        logger.debug("handler result %r is not JSON-serialisable; not stored", result)
        return None
