"""Exceptions raised by sqla_pgotask, and the ones handlers may raise."""

from __future__ import annotations


class PgotaskError(Exception):
    """Base class of every error raised by sqla_pgotask itself."""


class InvalidTaskError(PgotaskError, ValueError):
    """A task field holds a value the table cannot store or a worker could not run."""


class InvalidPayloadError(InvalidTaskError):
    """A task's payload cannot be stored as JSON."""


class UnknownKindError(PgotaskError, LookupError):
    """A task kind has no handler registered on the scheduler."""


class ConfigurationError(PgotaskError, ValueError):
    """A handler or scheduler was set up with invalid arguments."""


class SchemaError(PgotaskError):
    """The database schema is missing or not at the revision this version expects."""


class WorkerStuckError(PgotaskError):
    """Every handler thread of a worker is held by a handler far past its ``timeout``.

    Python cannot interrupt a thread, so such a worker can run nothing more:
    it gives back the tasks it had claimed, unregisters, and
    ``Scheduler.run()`` raises this (``pgotask worker`` exits with code 1, and
    the supervisor or service manager starts a fresh process).
    """


class HandlerTransactionError(PgotaskError):
    """A handler tried to end the transaction the worker commits for it."""


class NonRetryableError(Exception):
    """Raise (or subclass) this in a handler to fail the task without further attempts."""


class UnrunnableTaskError(NonRetryableError):
    """A claimed task that no handler can be given: it fails at once, without running.

    Its row cannot be read (a payload nested too deeply to decode, say,
    written by plain SQL), or it has no attempt left.  Only that task fails:
    the others claimed with it run as usual.
    """


class Snooze(Exception):  # noqa: N818 (a request, not an error)
    """Raise in a handler to run the task again later without using an attempt.

    ``raise Snooze(30)``: the attempt's writes are rolled back, the task goes
    back to ``pending`` with ``run_at`` 30 seconds from now (the database's
    clock), and its attempt count is given back; no ``TaskError`` is written.
    For "not yet" conditions: a resource not ready, a rate limit elsewhere.
    """

    def __init__(self, seconds: float) -> None:
        if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not seconds >= 0:
            raise ValueError(f"Snooze needs a number of seconds >= 0, not {seconds!r}")
        super().__init__(f"snoozed for {seconds:g} s")
        self.seconds = float(seconds)


class TaskCancelledError(Exception):
    """Raised by ``current_attempt().check()`` once cancellation was requested.

    A handler may also raise it itself to cancel its own task.
    """


class TaskTimeoutError(Exception):
    """The attempt ran past its handler's ``timeout``."""


class ClaimLostError(Exception):
    """The worker no longer owns the attempt: another worker took the task over."""


def qualified_name(cls: type[BaseException]) -> str:
    """``module.QualName`` of an exception type (``QualName`` alone for builtins)."""
    module = cls.__module__
    return cls.__qualname__ if module == "builtins" else f"{module}.{cls.__qualname__}"
