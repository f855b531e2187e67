"""Middleware around each handler attempt, and hooks on each attempt's outcome.

::

    @scheduler.middleware
    def timed(call_next, session, task):
        started = time.monotonic()
        try:
            return call_next(session, task)
        finally:
            metrics.observe(task.kind, time.monotonic() - started)

    @scheduler.on_outcome
    def count(ctx, outcome, error):
        metrics.count(ctx.kind, outcome.value)

A middleware wraps the handler like a decorator that every kind gets: it
runs in the attempt's transaction and :func:`~sqla_pgotask.current_attempt`
context, sees the handler's result and exceptions, and must return what
``call_next`` returned (or raise).  The first registered is the outermost.
Since a middleware runs before the worker commits, it cannot know the
attempt's final outcome (a completion can still lose its claim, a failure
becomes a retry or the end); outcome hooks are called after the commit,
with that outcome.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeAlias

from sqlalchemy.orm import Session

from sqla_pgotask.context import AttemptContext, Outcome
from sqla_pgotask.errors import ConfigurationError
from sqla_pgotask.models import Task

logger = logging.getLogger("sqla_pgotask.worker")

#: What a middleware calls to run the rest of the chain (the next middleware, or the handler).
CallNext: TypeAlias = Callable[[Session, Task], object]
#: ``def middleware(call_next, session, task) -> result``.
Middleware: TypeAlias = Callable[[CallNext, Session, Task], object]
#: ``def hook(ctx, outcome, error)``: ``error`` is what the handler (or a
#: middleware) raised, if it raised; for a timed-out attempt, the
#: :class:`~sqla_pgotask.TaskTimeoutError` recorded.
OutcomeHook: TypeAlias = Callable[[AttemptContext, Outcome, BaseException | None], None]


@dataclass(frozen=True)
class Hooks:
    """The middleware and outcome hooks a worker runs (a snapshot of its Scheduler's)."""

    middleware: tuple[Middleware, ...] = ()
    on_outcome: tuple[OutcomeHook, ...] = ()


NO_HOOKS = Hooks()


def check_callable(fn: object, what: str) -> None:
    """Raise :class:`~sqla_pgotask.ConfigurationError` unless ``fn`` is callable."""
    if not callable(fn):
        raise ConfigurationError(f"{what} must be callable, not {fn!r}")


def compose(middleware: Sequence[Middleware], handler: CallNext) -> CallNext:
    """``handler`` wrapped in ``middleware``, the first one outermost.

    Inside the middleware, the handler's writes are flushed before
    ``call_next`` returns: a middleware sees the flush's exceptions, and what
    it holds around the call (a tracing span, a logging context) is still
    current while the handler's rows are inserted.
    """
    if not middleware:
        return handler
    call: CallNext = functools.partial(_flushed, handler)
    for mw in reversed(middleware):
        call = functools.partial(mw, call)
    return call


def _flushed(handler: CallNext, session: Session, task: Task) -> object:
    result = handler(session, task)
    session.flush()
    return result


def notify(
    hooks: Sequence[OutcomeHook],
    outcomes: Sequence[tuple[AttemptContext, Outcome]],
    errors: dict[int, BaseException],
) -> None:
    """Call every hook for every outcome; a hook's exception is logged, never raised."""
    for ctx, outcome in outcomes:
        error = errors.get(id(ctx))
        for hook in hooks:
            try:
                hook(ctx, outcome, error)
            except Exception:
                logger.exception(
                    "outcome hook %r failed for task %s",
                    hook,
                    ctx.task_id,
                    extra=log_fields(ctx),
                )


def log_fields(ctx: AttemptContext) -> dict[str, object]:
    """The ``extra`` fields of every log record about one attempt."""
    return {"task_id": ctx.task_id, "kind": ctx.kind, "attempt": ctx.attempt, "queue": ctx.queue}
