"""Retention: workers delete finished tasks past their status's period, in bounded batches."""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterator

import psycopg
import pytest
from sqlalchemy import Engine, func, select, text
from sqlalchemy.orm import Session, sessionmaker

from sqla_pgotask import ConfigurationError, Retention, Scheduler, Task, TaskError, TaskStatus
from sqla_pgotask.worker.connections import dedicated_connection
from sqla_pgotask.worker.pruning import RETENTION_LOCK, apply_retention
from tests.helpers import insert_aged_tasks, running, wait_until

DAY = dt.timedelta(days=1)


@pytest.fixture
def conn(engine: Engine) -> Iterator[psycopg.Connection[tuple[object, ...]]]:
    connection = dedicated_connection(engine)
    yield connection
    connection.close()


def _ids(engine: Engine) -> set[int]:
    with engine.connect() as c:
        return set(c.execute(text("SELECT id FROM pgotask_task")).scalars())


def _error_count(engine: Engine) -> int:
    with Session(engine) as session:
        return int(session.scalar(select(func.count()).select_from(TaskError)) or 0)


def test_defaults_and_validation() -> None:
    retention = Retention()
    assert retention.periods() == {
        TaskStatus.SUCCEEDED: DAY,
        TaskStatus.FAILED: 14 * DAY,
        TaskStatus.CANCELLED: DAY,
    }
    assert Retention(failed=None).periods().keys() == {TaskStatus.SUCCEEDED, TaskStatus.CANCELLED}
    for bad, message in [
        ({"succeeded": 3600}, "Retention.succeeded must be a non-negative datetime.timedelta"),
        ({"failed": -DAY}, "Retention.failed must be a non-negative datetime.timedelta"),
        ({"interval": 0}, "Retention.interval must be a number > 0"),
        ({"max_seconds": True}, "Retention.max_seconds must be a number > 0"),
        ({"batch_size": 0}, "Retention.batch_size must be an integer >= 1"),
    ]:
        with pytest.raises(ConfigurationError, match=message):
            Retention(**bad)  # type: ignore[arg-type]


def test_scheduler_takes_a_retention_or_none(session_factory: sessionmaker[Session]) -> None:
    assert Scheduler(session_factory).settings.retention == Retention()
    assert Scheduler(session_factory, retention=None).settings.retention is None
    with pytest.raises(ConfigurationError, match=r"retention must be a sqla_pgotask\.Retention"):
        Scheduler(session_factory, retention={"succeeded": DAY})  # type: ignore[arg-type]


def test_a_pass_deletes_only_what_is_due_per_status_with_errors(
    engine: Engine, conn: psycopg.Connection[tuple[object, ...]]
) -> None:
    old_ok = insert_aged_tasks(engine, TaskStatus.SUCCEEDED, days_ago=2, count=3, errors=1)
    new_ok = insert_aged_tasks(engine, TaskStatus.SUCCEEDED, days_ago=0.5)
    old_failed = insert_aged_tasks(engine, TaskStatus.FAILED, days_ago=20, errors=2)
    kept_failed = insert_aged_tasks(engine, TaskStatus.FAILED, days_ago=10, errors=1)
    old_cancelled = insert_aged_tasks(engine, TaskStatus.CANCELLED, days_ago=3)
    live = insert_aged_tasks(engine, TaskStatus.PENDING, days_ago=None) + insert_aged_tasks(
        engine, TaskStatus.RUNNING, days_ago=None
    )
    # Pending or running rows with an old finished_at (a retry) are never touched.
    live += insert_aged_tasks(engine, TaskStatus.PENDING, days_ago=30)

    deleted = apply_retention(conn, Retention(batch_size=2))
    assert deleted == len(old_ok + old_failed + old_cancelled)
    assert _ids(engine) == set(new_ok + kept_failed + live)
    assert _error_count(engine) == 1  # only kept_failed's


def test_none_keeps_a_status_forever(
    engine: Engine, conn: psycopg.Connection[tuple[object, ...]]
) -> None:
    failed = insert_aged_tasks(engine, TaskStatus.FAILED, days_ago=400)
    insert_aged_tasks(engine, TaskStatus.SUCCEEDED, days_ago=400)
    assert apply_retention(conn, Retention(failed=None)) == 1
    assert _ids(engine) == set(failed)
    nothing = Retention(succeeded=None, failed=None, cancelled=None)
    assert apply_retention(conn, nothing) is None
    assert _ids(engine) == set(failed)


def test_one_worker_of_the_fleet_at_a_time(
    engine: Engine, conn: psycopg.Connection[tuple[object, ...]]
) -> None:
    old = insert_aged_tasks(engine, TaskStatus.SUCCEEDED, days_ago=2)
    other = dedicated_connection(engine)
    try:
        # Another worker's batch, in its transaction.
        with other.transaction():
            other.execute("SELECT pg_advisory_xact_lock(%s)", (RETENTION_LOCK,))
            assert apply_retention(conn, Retention()) is None
        # A worker of an older version, which held a session lock for its pass.
        other.execute("SELECT pg_advisory_lock(%s)", (RETENTION_LOCK,))
        assert apply_retention(conn, Retention()) is None
        assert _ids(engine) == set(old)
        other.execute("SELECT pg_advisory_unlock(%s)", (RETENTION_LOCK,))
    finally:
        other.close()
    assert apply_retention(conn, Retention()) == 1
    # Nothing is left locked, on this connection or any other.
    with engine.connect() as c:
        held = c.execute(text("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"))
        assert held.scalar_one() == 0
    assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE


def test_a_pass_is_bounded_in_time_and_the_next_one_goes_on(
    engine: Engine, conn: psycopg.Connection[tuple[object, ...]]
) -> None:
    insert_aged_tasks(engine, TaskStatus.SUCCEEDED, days_ago=2, count=50)
    quick = Retention(batch_size=5, max_seconds=1e-9)
    assert apply_retention(conn, quick) == 5  # one batch, then the time was up
    assert len(_ids(engine)) == 45
    assert apply_retention(conn, Retention(batch_size=5)) == 45


def test_rows_locked_by_someone_else_wait_for_the_next_pass(
    engine: Engine, conn: psycopg.Connection[tuple[object, ...]]
) -> None:
    locked, free = insert_aged_tasks(engine, TaskStatus.SUCCEEDED, days_ago=2, count=2)
    with engine.connect() as other:
        other.execute(text("SELECT 1 FROM pgotask_task WHERE id = :id FOR UPDATE"), {"id": locked})
        assert apply_retention(conn, Retention()) == 1
        other.rollback()
    assert apply_retention(conn, Retention()) == 1
    assert _ids(engine) == set()
    assert free not in _ids(engine)


def test_workers_apply_retention_in_their_maintenance_loop(
    engine: Engine, session_factory: sessionmaker[Session], caplog: pytest.LogCaptureFixture
) -> None:
    old = insert_aged_tasks(engine, TaskStatus.SUCCEEDED, days_ago=0.01, count=3)  # ~15 minutes ago
    kept = insert_aged_tasks(engine, TaskStatus.FAILED, days_ago=0.01)
    retention = Retention(succeeded=dt.timedelta(minutes=5), interval=0.2)
    scheduler = Scheduler(session_factory, retention=retention, maintenance_interval=0.2)

    @scheduler.handler("k")
    def handle(session: Session, task: Task) -> None:
        pass

    with caplog.at_level(logging.INFO, logger="sqla_pgotask"), running(scheduler):
        wait_until(lambda: not set(old) & _ids(engine), timeout=10)
    assert _ids(engine) == set(kept)
    assert "retention: deleted 3 finished tasks" in caplog.text


def test_a_failing_pass_does_not_stop_the_heartbeats(
    engine: Engine, session_factory: sessionmaker[Session], caplog: pytest.LogCaptureFixture
) -> None:
    # An application table whose foreign key forbids deleting tasks.
    with engine.begin() as c:
        c.execute(text("CREATE TABLE app_ref (task_id bigint REFERENCES pgotask_task (id))"))
    (old,) = insert_aged_tasks(engine, TaskStatus.SUCCEEDED, days_ago=2)
    with engine.begin() as c:
        c.execute(text("INSERT INTO app_ref VALUES (:id)"), {"id": old})
    scheduler = Scheduler(
        session_factory,
        retention=Retention(interval=0.1),
        lease_seconds=3,
        maintenance_interval=0.2,
    )

    @scheduler.handler("k")
    def handle(session: Session, task: Task) -> None:
        pass

    with caplog.at_level(logging.WARNING, logger="sqla_pgotask"), running(scheduler):
        wait_until(lambda: caplog.text.count("retention pass failed") >= 2, timeout=10)
        with session_factory.begin() as session:
            session.add(Task(kind="k"))
        wait_until(lambda: _status_count(session_factory, TaskStatus.SUCCEEDED) == 2, timeout=10)
    assert "heartbeat connection failed" not in caplog.text


def _status_count(session_factory: sessionmaker[Session], status: TaskStatus) -> int:
    with session_factory() as session:
        return int(
            session.scalar(select(func.count()).select_from(Task).where(Task.status == status)) or 0
        )
