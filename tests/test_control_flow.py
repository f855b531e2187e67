"""What a handler can decide about its own task: snooze, cancel itself, fail without retry."""

from __future__ import annotations

import datetime as dt

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session, sessionmaker

from sqla_pgotask import (
    NonRetryableError,
    Scheduler,
    Snooze,
    Task,
    TaskCancelledError,
    TaskError,
    TaskStatus,
)
from tests.helpers import Ledger, add_tasks, get_task, ledger_ids, running, wait_until


def _errors(session_factory: sessionmaker[Session]) -> int:
    with session_factory() as session:
        return int(session.scalar(select(func.count()).select_from(TaskError)) or 0)


def _db_now(session_factory: sessionmaker[Session]) -> dt.datetime:
    with session_factory() as session:
        return session.scalar(select(func.now()))  # type: ignore[return-value]


@pytest.mark.parametrize("batch_size", [1, 10])
def test_snooze_reschedules_without_using_an_attempt_and_drops_the_writes(
    app: sessionmaker[Session], batch_size: int
) -> None:
    scheduler = Scheduler(app)
    calls: list[int] = []

    @scheduler.handler("wait", max_attempts=1)
    def wait(session: Session, task: Task) -> None:
        calls.append(task.attempts)
        session.add(Ledger(task_id=task.id, note="snoozing"))
        if len(calls) < 3:
            raise Snooze(60)

    @scheduler.handler("ok")
    def ok(session: Session, task: Task) -> None:
        session.add(Ledger(task_id=task.id, note="ok"))

    # The snoozing task shares its batch with others, which keep their writes.
    ok_before, snoozer, ok_after = add_tasks(
        app, Task(kind="ok"), Task(kind="wait"), Task(kind="ok")
    )
    before = _db_now(app)
    assert scheduler.run_until_idle(batch_size=batch_size) == 3
    task = get_task(app, snoozer)
    assert (task.status, task.attempts, task.started_at, task.locked_by) == (
        TaskStatus.PENDING,
        0,
        None,
        None,
    )
    assert task.run_at >= before + dt.timedelta(seconds=59)
    assert ledger_ids(app) == [ok_before, ok_after]
    assert _errors(app) == 0

    # Snoozed twice, it still has its only attempt when it finally runs.
    for _ in range(2):
        with app.begin() as session:
            session.execute(
                text("UPDATE pgotask_task SET run_at = now() WHERE id = :id"), {"id": snoozer}
            )
        scheduler.run_until_idle(batch_size=batch_size)
    task = get_task(app, snoozer)
    assert (task.status, task.attempts) == (TaskStatus.SUCCEEDED, 1)
    assert calls == [1, 1, 1]
    assert snoozer in ledger_ids(app)


def test_snooze_counts_in_worker_stats(app: sessionmaker[Session]) -> None:
    scheduler = Scheduler(app, poll_interval=0.2)

    @scheduler.handler("wait")
    def wait(session: Session, task: Task) -> None:
        raise Snooze(3600)

    (task_id,) = add_tasks(app, Task(kind="wait"))
    later = _db_now(app) + dt.timedelta(minutes=50)
    with running(scheduler) as stats:
        wait_until(lambda: get_task(app, task_id).run_at > later)
    task = get_task(app, task_id)
    assert (task.status, task.attempts, task.locked_by) == (TaskStatus.PENDING, 0, None)
    assert stats[0].snoozed == 1
    assert stats[0].total == 1


def test_snooze_needs_a_non_negative_delay() -> None:
    for bad in (-1, float("nan"), "5", True):
        with pytest.raises(ValueError, match="Snooze needs a number of seconds >= 0"):
            Snooze(bad)  # type: ignore[arg-type]
    assert Snooze(0).seconds == 0.0


def test_a_handler_cancels_its_own_task(app: sessionmaker[Session]) -> None:
    scheduler = Scheduler(app)

    @scheduler.handler("obsolete")
    def obsolete(session: Session, task: Task) -> None:
        session.add(Ledger(task_id=task.id))
        raise TaskCancelledError("superseded")

    (task_id,) = add_tasks(app, Task(kind="obsolete"))
    scheduler.run_until_idle()
    task = get_task(app, task_id)
    assert task.status is TaskStatus.CANCELLED
    assert task.finished_at is not None
    assert ledger_ids(app) == []
    assert _errors(app) == 0


def test_a_handler_fails_its_task_without_retry(app: sessionmaker[Session]) -> None:
    scheduler = Scheduler(app)

    @scheduler.handler("bad", max_attempts=5)
    def bad(session: Session, task: Task) -> None:
        raise NonRetryableError("payload can never work")

    (task_id,) = add_tasks(app, Task(kind="bad"))
    scheduler.run_until_idle()
    task = get_task(app, task_id)
    assert (task.status, task.attempts) == (TaskStatus.FAILED, 1)
    assert _errors(app) == 1
