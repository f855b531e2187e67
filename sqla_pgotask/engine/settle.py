"""Settling attempts: the fenced statements that end or give back a claimed task.

Each function runs one statement of ``sql/tasks.sql`` on a SQLAlchemy
``Connection`` for many attempts at once and returns the ids whose fence
held: the row was still ``running`` in the attempt this worker claimed.  An
id missing means the claim was lost meanwhile (rescued, or taken over), and
nothing was changed for it.  The functions neither begin nor commit: the
caller's transaction decides (the handlers' writes and the completion of
their tasks commit together).  They are plain functions of a ``Connection``,
so every runner drives the same ones: the threaded worker, ``run_until_idle``,
``testing.drain`` and, through ``AsyncConnection.run_sync()``, an asyncio
worker.
"""

from __future__ import annotations

import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection

from sqla_pgotask._queries import query
from sqla_pgotask.context import AttemptContext
from sqla_pgotask.errors import qualified_name
from sqla_pgotask.models import TaskStatus

#: What a task error keeps of an exception's message, and of its traceback.
MAX_MESSAGE = 10_000
MAX_TRACEBACK = 100_000


@dataclass(frozen=True)
class Failure:
    """A failed attempt to record: its error, and whether and when it runs again."""

    ctx: AttemptContext
    error: BaseException
    #: ``True``: the task ends ``failed``; else it runs again after ``delay`` seconds.
    final: bool
    delay: float = 0.0


def failure_params(failures: Sequence[Failure], worker_id: str) -> dict[str, Any]:
    """The parameters of the ``fail`` statement for ``failures``."""
    return fail_params(
        [(f.ctx.task_id, f.ctx.attempt) for f in failures],
        worker_id,
        final=[f.final for f in failures],
        delays=[f.delay for f in failures],
        exception_types=[qualified_name(type(f.error)) for f in failures],
        messages=[str(f.error) for f in failures],
        tracebacks=["".join(traceback.format_exception(f.error)) for f in failures],
    )


def fail_params(
    attempts: Sequence[tuple[int, int]],
    worker_id: str,
    *,
    final: Sequence[bool],
    delays: Sequence[float],
    exception_types: Sequence[str],
    messages: Sequence[str],
    tracebacks: Sequence[str | None],
) -> dict[str, Any]:
    """The parameters of the ``fail`` statement, one element per ``(id, attempt)``."""
    return {
        "ids": [i for i, _ in attempts],
        "attempts": [a for _, a in attempts],
        "statuses": [(TaskStatus.FAILED if f else TaskStatus.PENDING).value for f in final],
        "delays": list(delays),
        "exception_types": list(exception_types),
        "messages": [m[:MAX_MESSAGE] for m in messages],
        "tracebacks": [None if t is None else t[-MAX_TRACEBACK:] for t in tracebacks],
        "worker": worker_id,
    }


def int_array(values: Sequence[int]) -> str:
    """``values`` as a PostgreSQL array literal (``{1,2,3}``), for ``CAST(:x AS bigint[])``.

    psycopg dumps a list element by element in Python, which for the ids
    and attempts of a batch of 100 costs more client time than the rest of
    the statement; one string is one value to send.
    """
    return "{" + ",".join(map(str, map(int, values))) + "}"


def json_array(values: Sequence[str | None]) -> str | None:
    """JSON texts (or ``None``) as an array literal for ``CAST(:x AS jsonb[])``.

    ``None`` if every element is ``None``: ``unnest`` pads a NULL array with
    NULLs, as many as its longest argument has elements.
    """
    if all(v is None for v in values):
        return None
    return "{" + ",".join("NULL" if v is None else _quoted(v) for v in values) + "}"


def _quoted(element: str) -> str:
    """An array element in double quotes, its backslashes and quotes escaped."""
    return '"' + element.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _fenced(
    conn: Connection, name: str, contexts: Sequence[AttemptContext], **arrays: Any
) -> set[int]:
    params = {
        "ids": int_array([c.task_id for c in contexts]),
        "attempts": int_array([c.attempt for c in contexts]),
        **arrays,
    }
    return set(conn.execute(query(name), params).scalars())


def complete(conn: Connection, done: Sequence[tuple[AttemptContext, str | None]]) -> set[int]:
    """Mark attempts ``succeeded``, each with its result (JSON text or ``None``).

    The fence also requires that no cancellation was requested: a task whose
    cancellation came after its handler's last check is not completed (the
    caller rolls its writes back).
    """
    if not done:
        return set()
    return _fenced(conn, "complete", [c for c, _ in done], results=json_array([r for _, r in done]))


def record_failures(conn: Connection, failures: Sequence[Failure], worker_id: str) -> set[int]:
    """Record failed attempts (one ``TaskError`` each): retried after their delay, or failed."""
    if not failures:
        return set()
    return set(conn.execute(query("fail"), failure_params(failures, worker_id)).scalars())


def snooze(conn: Connection, snoozed: Sequence[tuple[AttemptContext, float]]) -> set[int]:
    """Attempts whose handler raised ``Snooze``: pending after their delay, attempt refunded."""
    if not snoozed:
        return set()
    return _fenced(conn, "snooze", [c for c, _ in snoozed], delays=[d for _, d in snoozed])


def finish_cancelled(conn: Connection, contexts: Sequence[AttemptContext]) -> set[int]:
    """Attempts cancelled (requested, or by their own handler): the tasks end ``cancelled``."""
    if not contexts:
        return set()
    return _fenced(conn, "finish_cancelled", contexts)


def release(conn: Connection, claimed: Sequence[tuple[int, int]]) -> int:
    """Give back claimed ``(id, attempt)`` pairs that never started: pending, attempt refunded."""
    if not claimed:
        return 0
    result = conn.execute(
        query("release"),
        {"ids": [i for i, _ in claimed], "attempts": [a for _, a in claimed]},
    )
    return int(result.rowcount)


def release_interrupted(
    conn: Connection, contexts: Sequence[AttemptContext], worker_id: str
) -> None:
    """Attempts still running when the shutdown grace ran out: given back now, the attempt used."""
    if contexts:
        conn.execute(
            query("release_interrupted"),
            {
                "ids": [c.task_id for c in contexts],
                "attempts": [c.attempt for c in contexts],
                "worker": worker_id,
            },
        )
