"""add_many: many tasks in one statement, in the application's transaction."""

from __future__ import annotations

import datetime as dt
import threading

import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from sqla_pgotask import InvalidPayloadError, Scheduler, Task, TaskStatus, add_many
from tests.test_worker import running, wait_until


def test_add_many_inserts_with_the_same_defaults(session: Session) -> None:
    when = dt.datetime(2031, 5, 6, tzinfo=dt.timezone.utc)
    count = add_many(
        session,
        [
            Task(kind="a"),
            Task(
                kind="b",
                payload={"x": [1, 2]},
                queue="emails",
                priority=5,
                run_at=when,
                max_attempts=2,
                dedup_key="k",
            ),
        ],
    )
    assert count == 2
    now = session.scalar(select(func.now()))
    a, b = session.scalars(select(Task).order_by(Task.id)).all()
    assert (a.kind, a.queue, a.payload, a.priority, a.run_at, a.max_attempts, a.dedup_key) == (
        "a",
        "default",
        {},
        0,
        now,
        None,
        None,
    )
    assert (b.queue, b.payload, b.priority, b.run_at, b.max_attempts, b.dedup_key) == (
        "emails",
        {"x": [1, 2]},
        5,
        when,
        2,
        "k",
    )
    assert a.status is TaskStatus.PENDING and a.attempts == 0
    assert add_many(session, []) == 0


def test_add_many_checks_payloads_before_inserting_anything(session: Session) -> None:
    with pytest.raises(InvalidPayloadError, match=r"Task\(kind='bad'\): payload is not JSON"):
        add_many(session, [Task(kind="ok"), Task(kind="bad", payload={"s": {1}})])
    assert session.scalar(select(func.count()).select_from(Task)) == 0
    with pytest.raises(TypeError, match="takes Task objects"):
        add_many(session, [{"kind": "x"}])  # type: ignore[list-item]


def test_add_many_respects_the_dedup_index(session: Session) -> None:
    session.add(Task(kind="k", dedup_key="d"))
    session.flush()
    with pytest.raises(IntegrityError, match="uq_pgotask_task_dedup"), session.begin_nested():
        add_many(session, [Task(kind="k", dedup_key="d")])


def test_add_many_is_transactional_and_wakes_workers_once(
    engine: Engine, session_factory: sessionmaker[Session]
) -> None:
    scheduler = Scheduler(session_factory, poll_interval=30, concurrency=4)
    ran: list[int] = []
    lock = threading.Lock()

    @scheduler.handler("n")
    def n(session: Session, task: Task) -> None:
        with lock:
            ran.append(task.payload["i"])

    with session_factory() as session:
        add_many(session, [Task(kind="n", payload={"i": -1})])
        session.rollback()
    with running(scheduler):
        with session_factory.begin() as session:
            add_many(session, [Task(kind="n", payload={"i": i}) for i in range(500)])
        wait_until(lambda: len(ran) == 500, timeout=30)
    assert sorted(ran) == list(range(500))
