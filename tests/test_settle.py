"""The engine's settle functions: fenced statements on a plain SQLAlchemy Connection."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from sqla_pgotask import Task, TaskError, TaskStatus
from sqla_pgotask.context import AttemptContext
from sqla_pgotask.engine import settle
from sqla_pgotask.engine.claims import PlainClaims, SessionConnection
from sqla_pgotask.engine.rows import Claimed

#: JSON texts that an array literal must carry through unchanged.
AWKWARD_RESULTS = [
    '{"quote": "a\\"b", "backslash": "c\\\\d"}',
    '"NULL"',
    '""',
    '{"braces": "{}", "comma": "x,y", "space": " "}',
    '["caf\u00e9", "\u2603", null]',
    None,
]


def _claim(session: Session, n: int) -> Claimed:
    session.add_all([Task(kind="k", payload={"n": i}) for i in range(n)])
    session.flush()
    conns = SessionConnection(lambda: Session(bind=session.connection()))  # type: ignore[arg-type]
    return PlainClaims(conns, worker_id="w", kinds={"k": 3}, queues=None, lease_seconds=60).claim(n)


def _contexts(tasks: Claimed) -> list[AttemptContext]:
    return [
        AttemptContext(
            task_id=t.id,
            kind=t.kind,
            attempt=t.attempts,
            max_attempts=3,
            timeout=None,
            queue=t.queue,
        )
        for t in tasks
    ]


def test_complete_stores_each_result_and_holds_the_fence(session: Session) -> None:
    tasks = _claim(session, len(AWKWARD_RESULTS) + 1)
    contexts = _contexts(tasks)
    stale = contexts[-1]
    stale_attempt = AttemptContext(
        task_id=stale.task_id,
        kind="k",
        attempt=stale.attempt + 1,
        max_attempts=3,
        timeout=None,
        queue="default",
    )
    done = [*zip(contexts[:-1], AWKWARD_RESULTS, strict=True), (stale_attempt, None)]
    completed = settle.complete(session.connection(), done)
    assert completed == {c.task_id for c in contexts[:-1]}  # not the one of another attempt
    rows: dict[int, object] = dict(
        session.execute(select(Task.id, Task.result).where(Task.status == "succeeded")).all()
    )
    assert [rows[c.task_id] for c in contexts[:-1]] == [
        None if r is None else json.loads(r) for r in AWKWARD_RESULTS
    ]


@pytest.mark.parametrize("final", [False, True])
def test_failures_snoozes_cancels_and_releases(session: Session, final: bool) -> None:
    failed, snoozed, cancelled, released = _contexts(_claim(session, 4))
    conn = session.connection()
    error = ValueError('bad "input" \\ here')
    assert settle.record_failures(
        conn, [settle.Failure(failed, error, final=final, delay=30.0)], "w"
    ) == {failed.task_id}
    assert settle.snooze(conn, [(snoozed, 60.0)]) == {snoozed.task_id}
    assert settle.finish_cancelled(conn, [cancelled]) == {cancelled.task_id}
    assert settle.release(conn, [(released.task_id, released.attempt)]) == 1
    # Each fence holds once: the same attempt again changes nothing.
    assert settle.finish_cancelled(conn, [cancelled]) == set()
    assert settle.release(conn, [(released.task_id, released.attempt)]) == 0
    session.expire_all()
    status = {t.id: (t.status, t.attempts) for t in session.scalars(select(Task))}
    assert status == {
        failed.task_id: (TaskStatus.FAILED if final else TaskStatus.PENDING, 1),
        snoozed.task_id: (TaskStatus.PENDING, 0),
        cancelled.task_id: (TaskStatus.CANCELLED, 1),
        released.task_id: (TaskStatus.PENDING, 0),
    }
    (recorded,) = session.scalars(select(TaskError))
    assert (recorded.task_id, recorded.exception_type, recorded.message) == (
        failed.task_id,
        "ValueError",
        str(error),
    )


def test_array_literals() -> None:
    assert settle.int_array([1, 22, 333]) == "{1,22,333}"
    assert settle.int_array([]) == "{}"
    assert settle.json_array([None, None]) is None
    assert settle.json_array(['"a\\"b"', None]) == '{"\\"a\\\\\\"b\\"",NULL}'
