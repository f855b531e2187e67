"""The models: defaults, plain-SQL inserts, payload checks, indexes, flushing with app models."""

from __future__ import annotations

import datetime as dt
import decimal
from typing import Any

import psycopg
import pytest
from sqlalchemy import (
    BigInteger,
    ForeignKey,
    MetaData,
    String,
    event,
    func,
    make_url,
    select,
    text,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    mapped_column,
    relationship,
    sessionmaker,
)
from sqlalchemy.orm.attributes import flag_modified

from sqla_pgotask import InvalidPayloadError, Task, TaskError, TaskStatus
from sqla_pgotask._queries import _DIALECT, query


class AppBase(DeclarativeBase):
    metadata = MetaData()


class Invoice(AppBase):
    """An application's own model with a foreign key to the library's table."""

    __tablename__ = "app_invoice"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    number: Mapped[str] = mapped_column(String(20))
    task_id: Mapped[int | None] = mapped_column(ForeignKey(Task.id))
    task: Mapped[Task | None] = relationship(Task)  # the class, not a string: another registry


@pytest.fixture
def invoice_table(session: Session) -> None:
    AppBase.metadata.create_all(session.connection())


def test_defaults_come_from_the_database(session: Session) -> None:
    task = Task(kind="send_email")
    session.add(task)
    session.flush()
    session.refresh(task)
    now = session.scalar(select(func.now()))
    assert task.queue == "default"
    assert task.payload == {}
    assert task.status is TaskStatus.PENDING
    assert task.priority == 0
    assert task.attempts == 0
    assert task.max_attempts is None
    assert task.run_at == now
    assert task.created_at == now
    assert task.run_at.tzinfo is not None
    assert task.started_at is None and task.finished_at is None
    assert task.locked_by is None and task.lease_expires_at is None
    assert task.result is None


def test_insert_sends_only_the_columns_set_and_fetches_only_the_id(session: Session) -> None:
    sent: list[str] = []

    def record(*args: Any) -> None:
        sent.append(args[2])

    conn = session.connection()
    event.listen(conn, "before_cursor_execute", record)
    try:
        task = Task(kind="k", payload={"a": 1})
        session.add(task)
        session.flush()
    finally:
        event.remove(conn, "before_cursor_execute", record)
    [insert] = sent
    assert insert.startswith("INSERT INTO pgotask_task (kind, payload) VALUES")
    assert insert.endswith("RETURNING pgotask_task.id")
    assert isinstance(task.id, int)
    # Every other column holds its server default, read when first used.
    now = session.scalar(select(func.now()))
    assert task.status is TaskStatus.PENDING
    assert (task.queue, task.priority, task.attempts, task.run_at) == ("default", 0, 0, now)
    assert (task.max_attempts, task.dedup_key, task.locked_by, task.result) == (None,) * 4


def test_explicit_nones_store_nulls(session: Session) -> None:
    task = Task(kind="k", max_attempts=None, dedup_key=None, started_at=None, result=None)
    session.add(task)
    session.flush()
    task.locked_by = "w"
    task.lease_expires_at = dt.datetime(2030, 1, 1, tzinfo=dt.timezone.utc)
    session.flush()
    task.locked_by = None
    task.lease_expires_at = None
    session.flush()
    row = session.execute(
        text(
            "SELECT max_attempts, dedup_key, started_at, locked_by, lease_expires_at, result "
            "FROM pgotask_task WHERE id = :id"
        ),
        {"id": task.id},
    ).one()
    assert tuple(row) == (None,) * 6


def test_comparing_nullable_columns_with_none_is_still_is_null() -> None:
    query = select(Task.id).where(
        Task.max_attempts == None,  # noqa: E711
        Task.dedup_key.is_(None),
        Task.locked_by != None,  # noqa: E711
    )
    sql = str(query.compile())
    assert "max_attempts IS NULL" in sql
    assert "dedup_key IS NULL" in sql
    assert "locked_by IS NOT NULL" in sql


def test_plain_sql_insert_of_kind_alone_is_a_valid_task(session: Session) -> None:
    session.execute(text("INSERT INTO pgotask_task (kind) VALUES ('report')"))
    session.execute(
        text("""INSERT INTO pgotask_task (kind, payload) VALUES ('send_email', '{"to": 1}')""")
    )
    tasks = session.scalars(select(Task).order_by(Task.id)).all()
    assert [(t.kind, t.payload, t.status, t.queue) for t in tasks] == [
        ("report", {}, TaskStatus.PENDING, "default"),
        ("send_email", {"to": 1}, TaskStatus.PENDING, "default"),
    ]


def test_all_options(session: Session) -> None:
    when = dt.datetime(2030, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)
    task = Task(
        kind="k",
        payload=[1, "two", {"three": None}],
        queue="emails",
        priority=7,
        run_at=when,
        max_attempts=3,
        dedup_key="user-1",
    )
    session.add(task)
    session.flush()
    session.expire_all()
    loaded = session.get(Task, task.id)
    assert loaded is not None
    assert loaded.payload == [1, "two", {"three": None}]
    assert (loaded.queue, loaded.priority, loaded.run_at, loaded.max_attempts) == (
        "emails",
        7,
        when,
        3,
    )


@pytest.mark.parametrize(
    "payload",
    [
        {"when": dt.datetime(2020, 1, 1)},
        {"amount": decimal.Decimal("1.5")},
        {1: object()},
        float("nan"),
    ],
)
def test_non_json_payload_fails_when_the_task_is_made_naming_the_kind(payload: object) -> None:
    with pytest.raises(
        InvalidPayloadError, match=r"Task\(kind='charge_card'\): payload is not JSON"
    ):
        Task(kind="charge_card", payload=payload)


def test_deeply_nested_payload_fails_when_the_task_is_made() -> None:
    payload: list[Any] = []
    for _ in range(100_000):
        payload = [payload]
    with pytest.raises(InvalidPayloadError, match=r"Task\(kind='deep'\): payload is nested too"):
        Task(kind="deep", payload=payload)


def test_payload_mutated_in_place_to_non_json_fails_at_flush(session: Session) -> None:
    task = Task(kind="k", payload={"a": 1})
    session.add(task)
    session.flush()
    task.payload["a"] = {1, 2}
    flag_modified(task, "payload")
    with pytest.raises(InvalidPayloadError, match="kind='k'"):
        session.flush()


def test_update_leaving_the_payload_alone_neither_loads_nor_checks_it(session: Session) -> None:
    task = Task(kind="k", payload={"a": 1})
    session.add(task)
    session.flush()
    session.refresh(task)
    session.expire(task, ["payload"])
    task.priority = 3
    sent: list[str] = []

    def record(*args: Any) -> None:
        sent.append(args[2])

    conn = session.connection()
    event.listen(conn, "before_cursor_execute", record)
    try:
        session.flush()
    finally:
        event.remove(conn, "before_cursor_execute", record)
    assert [statement.split()[0] for statement in sent] == ["UPDATE"]
    assert task.priority == 3 and task.payload == {"a": 1}


def test_status_outside_the_enum_is_refused_by_the_database(session: Session) -> None:
    with pytest.raises(IntegrityError, match="ck_pgotask_task_status"):
        session.execute(text("INSERT INTO pgotask_task (kind, status) VALUES ('k', 'bogus')"))


def test_max_attempts_must_be_positive(session: Session) -> None:
    with pytest.raises(IntegrityError, match="max_attempts_positive"):
        session.execute(text("INSERT INTO pgotask_task (kind, max_attempts) VALUES ('k', 0)"))


def test_dedup_key_unique_while_pending_or_running(session: Session) -> None:
    first = Task(kind="k", dedup_key="d")
    other_kind = Task(kind="other", dedup_key="d")  # another kind: its own key
    session.add_all([first, other_kind])
    session.flush()
    duplicate = Task(kind="k", dedup_key="d")
    session.add(duplicate)
    session.flush()  # no error: a no-op, stored as a cancelled duplicate
    assert (first.status, other_kind.status) == (TaskStatus.PENDING, TaskStatus.PENDING)
    assert duplicate.status is TaskStatus.CANCELLED
    assert duplicate.duplicate_of == first.id
    assert first.duplicate_of is None
    # The index still holds against anything that bypasses the insert trigger.
    with pytest.raises(IntegrityError, match="uq_pgotask_task_dedup"), session.begin_nested():
        session.execute(
            text("UPDATE pgotask_task SET status = 'pending' WHERE id = :id"),
            {"id": duplicate.id},
        )
    # Once finished, the key is free again.
    session.execute(text("UPDATE pgotask_task SET status = 'succeeded' WHERE kind = 'k'"))
    again = Task(kind="k", dedup_key="d")
    session.add(again)
    session.flush()
    assert again.status is TaskStatus.PENDING


def test_claim_query_uses_the_partial_index(session: Session) -> None:
    session.execute(
        text(
            "INSERT INTO pgotask_task (kind, status) "
            "SELECT 'k', CASE WHEN g % 50 = 0 THEN 'pending' ELSE 'succeeded' END "
            "FROM generate_series(1, 5000) g"
        )
    )
    session.execute(text("ANALYZE pgotask_task"))
    plan = "\n".join(
        session.scalars(
            text(
                "EXPLAIN SELECT id FROM pgotask_task WHERE status = 'pending' "
                "AND run_at <= now() AND kind = ANY('{k}') "
                "ORDER BY priority DESC, run_at, id LIMIT 10 FOR UPDATE SKIP LOCKED"
            )
        )
    )
    assert "ix_pgotask_task_claim" in plan, plan


@pytest.mark.parametrize("plan_mode", ["force_custom_plan", "force_generic_plan"])
@pytest.mark.parametrize("paused", [False, True])
def test_real_claim_statements_walk_the_claim_index(
    session: Session, plan_mode: str, paused: bool
) -> None:
    # Most tasks in one queue (the usual case): a filter on queue must not
    # make the planner believe almost nothing matches, read every pending
    # task and sort them.  Checked for the custom plans of the first
    # executions and for the generic plan a prepared statement may switch to.
    session.execute(
        text(
            "INSERT INTO pgotask_task (kind, status) "
            "SELECT 'k', CASE WHEN g % 2 = 0 THEN 'pending' ELSE 'succeeded' END "
            "FROM generate_series(1, 20000) g"
        )
    )
    if paused:
        session.execute(text("SELECT pgotask_pause_queue('other')"))
    session.execute(text("ANALYZE pgotask_task"))
    session.execute(text("ANALYZE pgotask_queue"))
    session.execute(text(f"SET LOCAL plan_cache_mode = {plan_mode}"))
    params = {
        "kinds": ["k"],
        "max_attempts": [3],
        "limit": 10,
        "worker": "w",
        "lease_seconds": 30.0,
        "excluded_queues": [],
        "queues": ["default"],
    }
    driver = session.connection().connection.driver_connection
    assert isinstance(driver, psycopg.Connection)
    for name in ("claim", "claim_in_queues"):
        statement = str(query(name).compile(dialect=_DIALECT))
        rows = driver.execute("EXPLAIN " + statement, params, prepare=True).fetchall()
        plan = "\n".join(str(row[0]) for row in rows)
        assert "ix_pgotask_task_claim" in plan, f"{name}:\n{plan}"
        assert "Sort" not in plan, f"{name}:\n{plan}"


@pytest.mark.parametrize("plan_mode", ["force_custom_plan", "force_generic_plan"])
def test_fenced_statements_look_their_rows_up_by_primary_key(
    session: Session, plan_mode: str
) -> None:
    # Statistics taken before a drain count no running task; then 900 are
    # running.  The fence must not make the planner hash every running task
    # (ix_pgotask_task_lease) to settle 100 of them.
    session.execute(
        text("INSERT INTO pgotask_task (kind) SELECT 'k' FROM generate_series(1, 20000)")
    )
    session.execute(text("ANALYZE pgotask_task"))
    session.execute(
        text(
            "UPDATE pgotask_task SET status = 'running', attempts = 1, locked_by = 'w', "
            "lease_expires_at = now() + interval '1 minute' WHERE id <= 900"
        )
    )
    session.execute(text(f"SET LOCAL plan_cache_mode = {plan_mode}"))
    ids = "{" + ",".join(str(i) for i in range(1, 101)) + "}"
    attempts = "{" + ",".join("1" for _ in range(100)) + "}"
    params = {
        "ids": ids,
        "attempts": attempts,
        "results": None,
        "delays": "{" + ",".join("0" for _ in range(100)) + "}",
        "statuses": "{" + ",".join("pending" for _ in range(100)) + "}",
        "exception_types": None,
        "messages": None,
        "tracebacks": None,
        "worker": "w",
    }
    driver = session.connection().connection.driver_connection
    assert isinstance(driver, psycopg.Connection)
    fenced = ("complete", "finish_cancelled", "snooze", "fail", "release_interrupted", "release")
    for name in fenced:
        statement = str(query(name).compile(dialect=_DIALECT))
        rows = driver.execute("EXPLAIN " + statement, params, prepare=True).fetchall()
        plan = "\n".join(str(row[0]) for row in rows)
        assert "pk_pgotask_task" in plan, f"{name}:\n{plan}"
        assert "ix_pgotask_task_lease" not in plan, f"{name}:\n{plan}"


def test_committed_tasks_wake_workers_once_per_queue(
    database_url: str, session_factory: sessionmaker[Session]
) -> None:
    dsn = make_url(database_url).set(drivername="postgresql").render_as_string(False)
    with psycopg.connect(dsn, autocommit=True) as listener:
        listener.execute("LISTEN pgotask")
        with session_factory() as session:
            session.add_all([Task(kind="k", queue=q) for q in ("a", "b", "a")])
            session.add(Task(kind="k"))
            session.flush()
            assert list(listener.notifies(timeout=0.2)) == []  # not before the commit
            session.commit()
        assert sorted(n.payload for n in listener.notifies(timeout=0.5)) == ["a", "b", "default"]
        with session_factory() as session:
            session.add(Task(kind="k", queue="c"))
            session.flush()
            session.rollback()
        assert list(listener.notifies(timeout=0.2)) == []


def test_rollback_leaves_no_task(session: Session) -> None:
    with session.begin_nested() as savepoint:
        session.add(Task(kind="k"))
        session.flush()
        savepoint.rollback()
    assert session.scalar(select(func.count()).select_from(Task)) == 0


def test_app_model_with_foreign_key_flushes_in_one_session(
    session: Session, invoice_table: None
) -> None:
    task = Task(kind="email_invoice", payload={"n": "A-1"})
    invoice = Invoice(id=1, number="A-1", task=task)
    session.add(invoice)  # the task is flushed first, through the relationship
    session.flush()
    assert invoice.task_id == task.id
    # and with an explicit id, the unit of work still orders the inserts
    task2 = Task(kind="email_invoice")
    session.add_all([Invoice(id=2, number="A-2", task=task2), task2])
    session.flush()
    assert session.scalar(select(Invoice.task_id).where(Invoice.id == 2)) == task2.id


def test_errors_relationship_ordered_and_cascaded(session: Session) -> None:
    task = Task(kind="k")
    session.add(task)
    session.flush()
    for attempt in (2, 1):
        session.add(TaskError(task_id=task.id, attempt=attempt, exception_type="ValueError"))
    session.flush()
    session.expire_all()
    assert [e.attempt for e in task.errors] == [1, 2]
    assert task.errors[0].task is task
    session.execute(text("DELETE FROM pgotask_task WHERE id = :id"), {"id": task.id})
    assert session.scalar(select(func.count()).select_from(TaskError)) == 0


def test_errors_are_added_as_rows_not_through_the_collection(session: Session) -> None:
    task = Task(kind="k")
    error = TaskError(task=task, attempt=1, exception_type="ValueError")
    session.add(error)  # the task comes along, and is inserted first
    session.flush()
    assert error.task_id == task.id
    with pytest.raises(TypeError, match=r"Task.errors is read-only .* TaskError\(task=task"):
        task.errors.append(TaskError(attempt=2, exception_type="KeyError"))
    with pytest.raises(TypeError, match="read-only"):
        task.errors.remove(error)
    session.delete(task)
    session.flush()
    assert session.scalar(select(func.count()).select_from(TaskError)) == 0


def test_repr() -> None:
    assert "kind='k'" in repr(Task(kind="k"))
    assert str(TaskStatus.PENDING) == "pending"
