"""Handlers: the functions that run tasks, and their per-kind settings."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from sqlalchemy.orm import Session

from sqla_pgotask.config.limits import RateLimit, RateLimitSpec, as_rate_limit, check_max_running
from sqla_pgotask.config.retry import RetrySpec, RetryStrategy, as_strategy
from sqla_pgotask.errors import ConfigurationError, NonRetryableError
from sqla_pgotask.models import Task

#: ``def handler(session, task) -> result``: the result, if JSON-serialisable,
#: is stored in ``Task.result``.
HandlerFunc = Callable[[Session, Task], object]

DEFAULT_MAX_ATTEMPTS = 5


@dataclass(frozen=True, eq=False)
class Handler:
    """A registered handler: the function and how its tasks are retried.

    Calling it calls the function, so handlers stay testable as plain functions.
    """

    kind: str
    func: HandlerFunc
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    retry: RetryStrategy = field(default_factory=lambda: as_strategy(None))
    queue: str = "default"
    non_retryable: tuple[type[BaseException], ...] = ()
    #: Seconds an attempt may take; ``None`` for no limit.
    timeout: float | None = None
    #: Whether its tasks may share a transaction with others (see ``Scheduler``'s
    #: ``batch_size``); ``False`` runs each in a transaction of its own.
    batch: bool = True
    #: Fleet-wide: at most this many tasks of the kind running at once (see
    #: ``docs/limits.md``); ``None`` for no limit.
    max_running: int | None = None
    #: Fleet-wide: at most ``count`` starts of the kind per ``per`` seconds.
    rate_limit: RateLimit | None = None

    def __call__(self, session: Session, task: Task) -> object:
        return self.func(session, task)

    def task(
        self,
        payload: Any = None,
        *,
        queue: str | None = None,
        priority: int | None = None,
        run_at: dt.datetime | None = None,
        max_attempts: int | None = None,
        dedup_key: str | None = None,
        on_duplicate: Literal["ignore", "replace"] | None = None,
    ) -> Task:
        """A new ``Task`` of this handler's kind, in its queue, to ``session.add()``."""
        values: dict[str, Any] = {"kind": self.kind, "queue": queue or self.queue}
        if payload is not None:
            values["payload"] = payload
        if priority is not None:
            values["priority"] = priority
        if run_at is not None:
            values["run_at"] = run_at
        if max_attempts is not None:
            values["max_attempts"] = max_attempts
        if dedup_key is not None:
            values["dedup_key"] = dedup_key
        if on_duplicate is not None:
            values["on_duplicate"] = on_duplicate
        return Task(**values)

    def retryable(self, exc: BaseException) -> bool:
        """Whether a failed attempt that raised ``exc`` may be tried again."""
        return not isinstance(exc, (NonRetryableError, *self.non_retryable))


def make_handler(
    kind: str,
    func: HandlerFunc,
    *,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    retry: RetrySpec = None,
    queue: str = "default",
    non_retryable: tuple[type[BaseException], ...] | type[BaseException] = (),
    timeout: float | None = None,
    batch: bool = True,
    max_running: int | None = None,
    rate_limit: RateLimitSpec = None,
) -> Handler:
    """Validate the decorator's arguments and build the :class:`Handler`."""
    if not isinstance(kind, str) or not kind:
        raise ConfigurationError(f"handler kind must be a non-empty string, not {kind!r}")
    if not callable(func):
        raise ConfigurationError(f"handler for {kind!r} must be callable, not {func!r}")
    if isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 1:
        raise ConfigurationError(
            f"handler {kind!r}: max_attempts must be an integer >= 1, not {max_attempts!r}"
        )
    if not isinstance(queue, str) or not queue:
        raise ConfigurationError(f"handler {kind!r}: queue must be a non-empty string")
    if timeout is not None and (
        isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0
    ):
        raise ConfigurationError(
            f"handler {kind!r}: timeout must be a number of seconds > 0, not {timeout!r}"
        )
    if not isinstance(batch, bool):
        raise ConfigurationError(f"handler {kind!r}: batch must be True or False, not {batch!r}")
    if isinstance(non_retryable, type):
        non_retryable = (non_retryable,)
    for exc_type in non_retryable:
        if not (isinstance(exc_type, type) and issubclass(exc_type, BaseException)):
            raise ConfigurationError(
                f"handler {kind!r}: non_retryable must list exception types, not {exc_type!r}"
            )
    return Handler(
        kind=kind,
        func=func,
        max_attempts=max_attempts,
        retry=as_strategy(retry),
        queue=queue,
        non_retryable=tuple(non_retryable),
        timeout=None if timeout is None else float(timeout),
        batch=batch,
        max_running=check_max_running(max_running, f"handler {kind!r}"),
        rate_limit=as_rate_limit(rate_limit, f"handler {kind!r}"),
    )
