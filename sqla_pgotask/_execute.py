"""Running one claimed task: the handler, then the fenced completion, in one transaction."""

from __future__ import annotations

import enum
import json
import logging
import time
import traceback
from collections.abc import Mapping
from typing import Any

from sqlalchemy import event, text
from sqlalchemy.orm import Session, sessionmaker

from sqla_pgotask._queries import query
from sqla_pgotask.context import AttemptContext, reset_current, set_current
from sqla_pgotask.errors import HandlerTransactionError, TaskCancelledError, TaskTimeoutError
from sqla_pgotask.handlers import Handler
from sqla_pgotask.models import Task, TaskStatus

logger = logging.getLogger("sqla_pgotask.worker")

_IN_HANDLER = "sqla_pgotask.in_handler"
_MAX_MESSAGE = 10_000
_MAX_TRACEBACK = 100_000
# Bounds the handler's SQL on the server: each statement, and time spent idle
# inside the transaction (a handler stuck in Python holding locks).
_SET_TIMEOUTS = text(
    "SELECT set_config('statement_timeout', :statement, true), "
    "set_config('idle_in_transaction_session_timeout', :idle, true)"
)
# How much longer than the handler's timeout the server lets its transaction idle.
IDLE_TIMEOUT_MARGIN = 5.0


class Outcome(str, enum.Enum):
    """What became of one attempt."""

    SUCCEEDED = "succeeded"
    RETRY = "retry"
    FAILED = "failed"
    CANCELLED = "cancelled"
    #: The claim was lost (the task is no longer ours): nothing was written.
    LOST = "lost"


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


class TaskRunner:
    """Runs claimed tasks one after another in one reusable Session of the application."""

    def __init__(
        self,
        session_factory: sessionmaker[Session],
        handlers: Mapping[str, Handler],
        worker_id: str,
    ) -> None:
        self.handlers = handlers
        self.worker_id = worker_id
        self.session = session_factory()
        event.listen(self.session, "before_commit", _forbid_handler_commit)

    def close(self) -> None:
        """Close the Session."""
        self.session.close()

    def run(self, task: Task, ctx: AttemptContext | None = None) -> Outcome:
        """Run ``task``'s handler and record the outcome; never raises for handler errors.

        Raises only if the database fails while the outcome is recorded; the
        caller then records the failure once the database answers again
        (:meth:`record_failure`).
        """
        handler = self.handlers[task.kind]
        if ctx is None:
            ctx = new_context(task, handler)
        ctx.begin()
        task_id, attempt, kind = task.id, task.attempts, task.kind
        session = self.session
        token = set_current(ctx)
        try:
            try:
                outcome = self._run_handler(session, handler, task, ctx)
            except Exception as exc:
                _rollback(session)
                outcome = self._after_exception(session, handler, ctx, exc)
        finally:
            reset_current(token)
            session.close()
        duration = time.monotonic() - (ctx.started or 0.0)
        extra = {"task_id": task_id, "kind": kind, "attempt": attempt, "duration": duration}
        if outcome is Outcome.LOST:
            logger.warning(
                "task %s (%s) attempt %s: claim lost, its writes were rolled back",
                task_id,
                kind,
                attempt,
                extra=extra,
            )
        elif logger.isEnabledFor(logging.INFO):
            logger.info(
                "task %s (%s) attempt %s: %s in %.3fs",
                task_id,
                kind,
                attempt,
                outcome.value,
                duration,
                extra=extra,
            )
        return outcome

    def _run_handler(
        self, session: Session, handler: Handler, task: Task, ctx: AttemptContext
    ) -> Outcome:
        root = session.begin()
        if handler.timeout is not None:
            session.execute(
                _SET_TIMEOUTS,
                {
                    "statement": f"{int(handler.timeout * 1000)}ms",
                    "idle": f"{int((handler.timeout + IDLE_TIMEOUT_MARGIN) * 1000)}ms",
                },
            )
        session.add(task)
        session.info[_IN_HANDLER] = True
        try:
            result = handler(session, task)
            session.flush()
        finally:
            session.info[_IN_HANDLER] = False
        if session.get_transaction() is not root or not root.is_active:
            raise HandlerTransactionError(
                "the handler ended the task's transaction (session.rollback() or "
                "session.close()); raise an exception to fail the task instead"
            )
        ctx.check()  # cancelled, timed out or lost while the handler ran: do not commit
        completed = session.execute(
            query("complete"),
            {"id": task.id, "attempt": task.attempts, "result": _result_json(result)},
        )
        if completed.rowcount == 1:  # type: ignore[attr-defined]
            root.commit()
            return Outcome.SUCCEEDED
        # The fence did not hold: the task was taken over, or cancellation was
        # requested after the last check.
        root.rollback()
        return self._finish_cancelled(session, ctx)

    def record_failure(self, ctx: AttemptContext, exc: Exception) -> Outcome:
        """Record, once the database is back, an attempt whose outcome could not be written."""
        self.session.close()
        return self._record_failure(self.session, self.handlers[ctx.kind], ctx, exc)

    def _after_exception(
        self,
        session: Session,
        handler: Handler,
        ctx: AttemptContext,
        exc: Exception,
    ) -> Outcome:
        if ctx.lost:
            return Outcome.LOST
        if isinstance(exc, TaskCancelledError) or ctx.cancel_requested:
            return self._finish_cancelled(session, ctx)
        if ctx.timed_out and not isinstance(exc, TaskTimeoutError):
            timeout = TaskTimeoutError(ctx.timeout_message())
            timeout.__cause__ = exc
            exc = timeout
        return self._record_failure(session, handler, ctx, exc)

    def _finish_cancelled(self, session: Session, ctx: AttemptContext) -> Outcome:
        with session.begin():
            done = session.execute(
                query("finish_cancelled"), {"id": ctx.task_id, "attempt": ctx.attempt}
            )
        return Outcome.CANCELLED if done.rowcount == 1 else Outcome.LOST  # type: ignore[attr-defined]

    def _record_failure(
        self,
        session: Session,
        handler: Handler,
        ctx: AttemptContext,
        exc: Exception,
    ) -> Outcome:
        attempt = ctx.attempt
        final = attempt >= ctx.max_attempts or not handler.retryable(exc)
        status = TaskStatus.FAILED if final else TaskStatus.PENDING
        delay = 0.0 if final else handler.retry.delay(attempt)
        with session.begin():
            recorded = session.execute(
                query("fail"),
                {
                    "id": ctx.task_id,
                    "attempt": attempt,
                    "status": status.value,
                    "delay": float(delay),
                    "exception_type": _qualified_name(type(exc)),
                    "message": str(exc)[:_MAX_MESSAGE],
                    "traceback": "".join(traceback.format_exception(exc))[-_MAX_TRACEBACK:],
                    "worker": self.worker_id,
                },
            )
            if recorded.rowcount != 1:  # type: ignore[attr-defined]
                return Outcome.LOST
        outcome = Outcome.FAILED if final else Outcome.RETRY
        logger.warning(
            "task %s (%s) attempt %s failed: %s: %s%s",
            ctx.task_id,
            ctx.kind,
            attempt,
            type(exc).__name__,
            exc,
            "" if final else f" (retry in {delay:.1f}s)",
            extra={"task_id": ctx.task_id, "kind": ctx.kind, "attempt": attempt},
        )
        return outcome


def new_context(task: Task, handler: Handler) -> AttemptContext:
    """The context of the attempt about to run ``task``."""
    return AttemptContext(
        task_id=task.id,
        kind=task.kind,
        attempt=task.attempts,
        max_attempts=task.max_attempts or handler.max_attempts,
        timeout=handler.timeout,
    )


def _rollback(session: Session) -> None:
    # The server may have closed the connection (idle-in-transaction timeout,
    # restart): rolling back then fails, and closing the Session lets the pool
    # drop the connection so the outcome is recorded on a fresh one.
    try:
        session.rollback()
    except Exception:
        logger.debug("rollback failed; discarding the connection", exc_info=True)
        session.close()


def _qualified_name(cls: type[BaseException]) -> str:
    module = cls.__module__
    return cls.__qualname__ if module == "builtins" else f"{module}.{cls.__qualname__}"


def _result_json(result: Any) -> str | None:
    if result is None:
        return None
    try:
        return json.dumps(result, allow_nan=False)
    except (TypeError, ValueError):
        logger.debug("handler result %r is not JSON-serialisable; not stored", result)
        return None
