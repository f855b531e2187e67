"""A claimed row that no handler can be given fails alone, at once, and costs no other task.

Plain SQL can store what Python cannot read: a payload nested thousands of
levels deep is valid ``jsonb`` but beyond Python's JSON decoder, and a task
whose ``max_attempts`` is left to the handler may already have used more
attempts than the handler allows.  Such a task ends ``failed`` with a
``TaskError`` that says why; the tasks claimed with it run as usual, with
their first attempt.  Every way of running tasks is held to it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest
from sqlalchemy import Engine, select, text
from sqlalchemy.orm import Session, sessionmaker

from sqla_pgotask import Scheduler, Task, TaskError, TaskStatus
from sqla_pgotask.testing import drain
from tests.helpers import wait_until

DEEP = 5_000  # levels: fine for jsonb, past Python's recursion limit
UNRUNNABLE = "sqla_pgotask.errors.UnrunnableTaskError"


def _run_worker(scheduler: Scheduler, done: Callable[[], bool]) -> None:
    thread = threading.Thread(target=scheduler.run)
    thread.start()
    try:
        wait_until(done, 20, message="every task to end")
    finally:
        scheduler.stop()
        thread.join(30)


def _finished(session_factory: sessionmaker[Session]) -> Callable[[], bool]:
    def done() -> bool:
        with session_factory() as session:
            left = session.scalar(
                text("SELECT count(*) FROM pgotask_task WHERE status IN ('pending', 'running')")
            )
        return bool(left == 0)

    return done


RUNNERS = ["worker", "worker-limited", "run_until_idle", "run_until_idle-limited", "drain"]


@pytest.fixture(params=RUNNERS)
def run_all(
    request: pytest.FixtureRequest, engine: Engine, session_factory: sessionmaker[Session]
) -> Callable[[Scheduler], None]:
    how: str = request.param

    def run(scheduler: Scheduler) -> None:
        if how.startswith("worker"):
            _run_worker(scheduler, _finished(session_factory))
        elif how.startswith("run_until_idle"):
            scheduler.run_until_idle(batch_size=10)
        else:
            with engine.begin() as conn:
                drain(scheduler, conn, raise_on_failure=False)

    run.limited = how.endswith("-limited")  # type: ignore[attr-defined]
    return run


def _scheduler(session_factory: sessionmaker[Session], limited: bool, ran: list[int]) -> Scheduler:
    scheduler = Scheduler(session_factory, concurrency=2, poll_interval=0.2, lease_seconds=30)

    @scheduler.handler("k", max_attempts=3, max_running=10 if limited else None)
    def k(session: Session, task: Task) -> None:
        ran.append(task.id)

    return scheduler


def test_an_unreadable_or_spent_task_fails_alone_at_once(
    session_factory: sessionmaker[Session], run_all: Callable[[Scheduler], None]
) -> None:
    statements = [
        "INSERT INTO pgotask_task (kind) SELECT 'k' FROM generate_series(1, 3)",
        "INSERT INTO pgotask_task (kind, payload) "
        "VALUES ('k', CAST(repeat('[', :n) || repeat(']', :n) AS jsonb))",
        "INSERT INTO pgotask_task (kind, trace_context) "
        "VALUES ('k', CAST(repeat('{\"a\":', :n) || '1' || repeat('}', :n) AS jsonb))",
        "INSERT INTO pgotask_task (kind, attempts) VALUES ('k', 3)",
        "INSERT INTO pgotask_task (kind) SELECT 'k' FROM generate_series(1, 3)",
    ]
    with session_factory.begin() as session:
        for statement in statements:
            session.execute(text(statement), {"n": DEEP})
    ran: list[int] = []
    run_all(_scheduler(session_factory, run_all.limited, ran))  # type: ignore[attr-defined]

    with session_factory() as session:
        tasks = session.execute(select(Task.id, Task.status, Task.attempts).order_by(Task.id)).all()
        errors = {
            e.task_id: (e.attempt, e.exception_type, e.message)
            for e in session.scalars(select(TaskError))
        }
    innocents = [t.id for t in tasks if t.id not in (4, 5, 6)]
    assert sorted(ran) == innocents  # each ran once
    assert [(t.id, t.status, t.attempts) for t in tasks if t.id in innocents] == [
        (i, TaskStatus.SUCCEEDED, 1) for i in innocents
    ]
    assert [(t.status, t.attempts) for t in tasks if t.id in (4, 5, 6)] == [
        (TaskStatus.FAILED, 1),
        (TaskStatus.FAILED, 1),
        (TaskStatus.FAILED, 4),
    ]
    assert set(errors) == {4, 5, 6}
    assert errors[4][:2] == (1, UNRUNNABLE)
    assert errors[4][2].startswith("the task cannot run: its payload cannot be decoded: Recursion")
    assert errors[5][2].startswith("the task cannot run: its trace_context cannot be decoded")
    assert errors[6] == (4, UNRUNNABLE, "the task cannot run: it has no attempt left (3 of 3 used)")
