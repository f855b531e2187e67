"""What a running handler can ask about its own attempt.

::

    from sqla_pgotask import current_attempt

    @scheduler.handler("export", timeout=300)
    def export(session, task):
        for chunk in chunks(task.payload):
            current_attempt().check()   # raises if cancelled, timed out or lost
            write(session, chunk)

Python code cannot be interrupted from outside safely, so long-running
handlers should call :meth:`AttemptContext.check` between steps; their SQL is
bounded by the server (see the ``timeout`` option of ``handler``).
"""

from __future__ import annotations

import contextvars
import enum
import time
from dataclasses import dataclass, field

from sqla_pgotask.errors import ClaimLostError, TaskCancelledError, TaskTimeoutError


class Outcome(str, enum.Enum):
    """What became of one attempt, once the worker's transaction committed."""

    SUCCEEDED = "succeeded"
    #: Failed; pending again after its backoff.
    RETRY = "retry"
    #: Failed, and no attempt is left (or the error is not retryable).
    FAILED = "failed"
    CANCELLED = "cancelled"
    #: The claim was lost (the task is no longer ours): nothing was written.
    LOST = "lost"
    #: Given back without consuming an attempt: its batch had to be rolled
    #: back because another task's claim was lost at the last moment.
    RELEASED = "released"
    #: The handler raised :class:`~sqla_pgotask.Snooze`: pending again, later,
    #: without using an attempt.
    SNOOZED = "snoozed"


@dataclass(eq=False)
class AttemptContext:
    """One attempt of one task, as seen by the worker running it."""

    task_id: int
    kind: str
    attempt: int
    #: The attempts the task may use (its own setting, else its handler's).
    max_attempts: int = 1
    #: The handler's ``timeout`` in seconds, if it has one.
    timeout: float | None = None
    #: The task's queue.
    queue: str = "default"
    #: ``time.monotonic()`` when the handler started (``None`` while queued).
    started: float | None = None
    #: ``time.monotonic()`` when the handler returned or raised.
    ended: float | None = None
    # Set by other threads (listener, heartbeat), read by the handler's:
    # plain attributes are enough under the GIL, and cheaper than Events.
    _cancel_requested: bool = field(default=False, repr=False)
    _lost: bool = field(default=False, repr=False)

    def begin(self) -> None:
        """Start the clock: the handler is about to be called."""
        self.started = time.monotonic()

    def end(self) -> None:
        """Stop the clock: the handler returned or raised."""
        self.ended = time.monotonic()

    @property
    def duration(self) -> float | None:
        """Seconds the handler (with its middleware) took; ``None`` if it never ran."""
        if self.started is None or self.ended is None:
            return None
        return self.ended - self.started

    @property
    def deadline(self) -> float | None:
        """``time.monotonic()`` after which the attempt has timed out, if it can."""
        if self.timeout is None or self.started is None:
            return None
        return self.started + self.timeout

    @property
    def cancel_requested(self) -> bool:
        """Whether cancellation of the task was requested."""
        return self._cancel_requested

    @property
    def lost(self) -> bool:
        """Whether the worker no longer owns this attempt (its claim was taken over)."""
        return self._lost

    @property
    def timed_out(self) -> bool:
        """Whether the attempt ran past its handler's ``timeout``."""
        deadline = self.deadline
        return deadline is not None and time.monotonic() > deadline

    def time_left(self) -> float | None:
        """Seconds until the timeout (negative once past it), or ``None`` without a timeout."""
        deadline = self.deadline
        return None if deadline is None else deadline - time.monotonic()

    def check(self) -> None:
        """Raise if the attempt should stop: cancelled, timed out, or no longer ours."""
        if self._lost:
            raise ClaimLostError(f"task {self.task_id} attempt {self.attempt} is no longer ours")
        if self._cancel_requested:
            raise TaskCancelledError(f"task {self.task_id} was cancelled")
        if self.timed_out:
            raise TaskTimeoutError(self.timeout_message())

    def timeout_message(self) -> str:
        """The error message of a timed-out attempt."""
        return f"task {self.task_id} ({self.kind}) timed out after {self.timeout:g} s"

    def request_cancel(self) -> None:
        """Mark the attempt cancelled (the worker calls this)."""
        self._cancel_requested = True

    def mark_lost(self) -> None:
        """Mark the attempt lost (the worker calls this)."""
        self._lost = True


_current: contextvars.ContextVar[AttemptContext | None] = contextvars.ContextVar(
    "sqla_pgotask_attempt", default=None
)


def current_attempt() -> AttemptContext:
    """The attempt the calling handler is running; raises ``LookupError`` outside a handler."""
    ctx = _current.get()
    if ctx is None:
        raise LookupError("current_attempt() is only available inside a task handler")
    return ctx


def set_current(ctx: AttemptContext | None) -> contextvars.Token[AttemptContext | None]:
    """Make ``ctx`` the current attempt (the worker calls this)."""
    return _current.set(ctx)


def reset_current(token: contextvars.Token[AttemptContext | None]) -> None:
    """Undo :func:`set_current`."""
    _current.reset(token)
