"""Running one claimed task: the handler, then the fenced completion, in one transaction."""

from __future__ import annotations

import enum
import json
import logging
import time
import traceback
from collections.abc import Mapping
from typing import Any

from sqlalchemy import event
from sqlalchemy.orm import Session, sessionmaker

from sqla_pgotask._queries import query
from sqla_pgotask.errors import HandlerTransactionError
from sqla_pgotask.handlers import Handler
from sqla_pgotask.models import Task, TaskStatus

logger = logging.getLogger("sqla_pgotask.worker")

_IN_HANDLER = "sqla_pgotask.in_handler"
_MAX_MESSAGE = 10_000
_MAX_TRACEBACK = 100_000


class Outcome(str, enum.Enum):
    """What became of one attempt."""

    SUCCEEDED = "succeeded"
    RETRY = "retry"
    FAILED = "failed"
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

    def run(self, task: Task) -> Outcome:
        """Run ``task``'s handler and record the outcome; never raises for handler errors."""
        handler = self.handlers[task.kind]
        task_id, attempt, kind = task.id, task.attempts, task.kind
        max_attempts = task.max_attempts or handler.max_attempts
        session = self.session
        log_extra = {"task_id": task_id, "kind": kind, "attempt": attempt}
        started = time.monotonic()
        try:
            try:
                outcome = self._run_handler(session, handler, task)
            except Exception as exc:
                session.rollback()
                outcome = self._record_failure(
                    session, handler, task_id, attempt, max_attempts, exc
                )
                log_extra["duration"] = time.monotonic() - started
                logger.warning(
                    "task %s (%s) attempt %s failed: %s: %s -> %s",
                    task_id,
                    kind,
                    attempt,
                    type(exc).__name__,
                    exc,
                    outcome.value,
                    extra=log_extra,
                )
                return outcome
        finally:
            session.close()
        log_extra["duration"] = time.monotonic() - started
        if outcome is Outcome.LOST:
            logger.warning(
                "task %s (%s) attempt %s: claim lost, its writes were rolled back",
                task_id,
                kind,
                attempt,
                extra=log_extra,
            )
        elif logger.isEnabledFor(logging.INFO):
            logger.info("task %s (%s) succeeded", task_id, kind, extra=log_extra)
        return outcome

    def _run_handler(self, session: Session, handler: Handler, task: Task) -> Outcome:
        root = session.begin()
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
        completed = session.execute(
            query("complete"),
            {"id": task.id, "attempt": task.attempts, "result": _result_json(result)},
        )
        if completed.rowcount != 1:  # type: ignore[attr-defined]
            root.rollback()
            return Outcome.LOST
        root.commit()
        return Outcome.SUCCEEDED

    def _record_failure(
        self,
        session: Session,
        handler: Handler,
        task_id: int,
        attempt: int,
        max_attempts: int,
        exc: Exception,
    ) -> Outcome:
        final = attempt >= max_attempts or not handler.retryable(exc)
        status = TaskStatus.FAILED if final else TaskStatus.PENDING
        delay = 0.0 if final else handler.retry.delay(attempt)
        with session.begin():
            recorded = session.execute(
                query("fail"),
                {
                    "id": task_id,
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
        return Outcome.FAILED if final else Outcome.RETRY


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
