"""What a task may hold: checked when a ``Task`` is made, and by the table for plain SQL."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, func, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from sqla_pgotask import InvalidPayloadError, Task, TaskError, TaskStatus, add_many
from sqla_pgotask.errors import InvalidTaskError
from sqla_pgotask.migrate import upgrade

UTC = dt.timezone.utc


class _AppBase(DeclarativeBase):
    pass


class Order(_AppBase):
    __tablename__ = "validation_orders"
    id: Mapped[int] = mapped_column(primary_key=True)


BAD_TASKS: list[tuple[dict[str, Any], type[Exception], str]] = [
    ({"kind": ""}, InvalidTaskError, r"Task.kind must be a non-empty string"),
    ({"kind": None}, InvalidTaskError, r"Task.kind must be a non-empty string"),
    ({"kind": "k" * 201}, InvalidTaskError, r"Task.kind is 201 characters long; at most 200"),
    ({"kind": "a\x00b"}, InvalidTaskError, r"Task.kind must not contain NUL"),
    ({"kind": "k", "queue": ""}, InvalidTaskError, r"Task.queue must be a non-empty string"),
    ({"kind": "k", "queue": "q" * 8000}, InvalidTaskError, r"Task.queue is 8,000 characters"),
    ({"kind": "k", "queue": "\ud800"}, InvalidTaskError, r"Task.queue is not valid Unicode"),
    ({"kind": "k", "priority": 1.5}, InvalidTaskError, r"Task.priority must be an integer, not"),
    ({"kind": "k", "priority": True}, InvalidTaskError, r"Task.priority must be an integer"),
    ({"kind": "k", "priority": 2**31}, InvalidTaskError, r"Task.priority must be between"),
    ({"kind": "k", "max_attempts": 0}, InvalidTaskError, r"Task.max_attempts must be between 1"),
    ({"kind": "k", "max_attempts": 2.0}, InvalidTaskError, r"Task.max_attempts must be an int"),
    (
        {"kind": "k", "run_at": dt.datetime(2030, 1, 1)},
        InvalidTaskError,
        r"Task.run_at must be timezone-aware .* not the naive 2030-01-01T00:00:00",
    ),
    (
        {"kind": "k", "run_at": dt.datetime.min.replace(tzinfo=UTC)},
        InvalidTaskError,
        r"Task.run_at must be between 1970-01-01 and 9000-01-01, not 0001-01-01",
    ),
    (
        {"kind": "k", "run_at": dt.datetime.max.replace(tzinfo=UTC)},
        InvalidTaskError,
        r"Task.run_at must be between",
    ),
    ({"kind": "k", "run_at": "tomorrow"}, InvalidTaskError, r"Task.run_at must be a datetime"),
    ({"kind": "k", "dedup_key": "d" * 1001}, InvalidTaskError, r"dedup_key is 1,001 bytes"),
    ({"kind": "k", "dedup_key": 7}, InvalidTaskError, r"Task.dedup_key must be a string"),
    ({"kind": "k", "payload": {"a": "\x00"}}, InvalidPayloadError, r"a NUL character \(\\u0000\)"),
    ({"kind": "k", "payload": ["\ud800"]}, InvalidPayloadError, r"a lone surrogate \(\\ud800\)"),
    ({"kind": "k", "payload": {"\udc00": 1}}, InvalidPayloadError, r"a lone surrogate"),
    ({"kind": "k", "payload": {"a": {1}}}, InvalidPayloadError, r"not JSON-serialisable"),
]


@pytest.mark.parametrize(("fields", "error", "message"), BAD_TASKS)
def test_a_bad_task_is_refused_where_it_is_made(
    fields: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        Task(**fields)


@pytest.mark.parametrize(("fields", "error", "message"), BAD_TASKS)
def test_add_many_refuses_the_same_before_sending_anything(
    session: Session, fields: dict[str, Any], error: type[Exception], message: str
) -> None:
    # The same error type, naming the task's position in the call.
    before = session.scalar(select(func.count()).select_from(Task))
    with pytest.raises(error, match=r"add_many\(\): task 1"):
        add_many(session, [{"kind": "ok"}, fields])
    assert session.scalar(select(func.count()).select_from(Task)) == before


def test_a_refused_task_leaves_the_applications_transaction_usable(engine: Engine) -> None:
    _AppBase.metadata.create_all(engine)
    with Session(engine) as session:
        session.add(Order(id=1))
        session.flush()
        with pytest.raises(InvalidTaskError):
            session.add(Task(kind="k", priority=1.5))
        with pytest.raises(InvalidPayloadError):
            session.add(Task(kind="k", payload={"text": "\x00"}))
        task = Task(kind="k")
        with pytest.raises(InvalidTaskError):
            task.queue = ""
        session.add(task)
        session.commit()
    with Session(engine) as session:
        assert session.scalars(select(Order.id)).all() == [1]
        assert [(t.kind, t.queue) for t in session.scalars(select(Task))] == [("k", "default")]


def test_good_values_pass_unchanged(session: Session) -> None:
    pair = "\U0001f600"  # outside the BMP: a surrogate pair in JSON, which jsonb stores
    when = dt.datetime(2031, 1, 1, tzinfo=dt.timezone(dt.timedelta(hours=-5)))
    task = Task(
        kind="k" * 200,
        queue="é" * 200,
        priority=-(2**31),
        max_attempts=2**31 - 1,
        run_at=when,
        dedup_key="d" * 1000,
        payload={"smile": pair, "escaped": "\\u0000", "é": "ü"},
    )
    session.add(task)
    session.add(Task(kind="sql-run-at", run_at=func.now() + dt.timedelta(hours=1)))
    session.flush()
    session.expire_all()
    loaded = session.get(Task, task.id)
    assert loaded is not None
    assert loaded.payload == {"smile": pair, "escaped": "\\u0000", "é": "ü"}
    assert loaded.run_at == when


@pytest.mark.parametrize("payload", [[1, 2, 3], "text", 7, True])
def test_any_json_value_is_a_payload_and_none_means_the_default(
    session: Session, payload: object
) -> None:
    task, empty = Task(kind="k", payload=payload), Task(kind="k", payload=None)
    session.add_all([task, empty])
    session.flush()
    session.expire_all()
    assert session.get(Task, task.id).payload == payload  # type: ignore[union-attr]
    assert session.get(Task, empty.id).payload == {}  # type: ignore[union-attr]


# -- the table refuses the same from plain SQL ---------------------------------------------


@pytest.mark.parametrize(
    ("columns", "values", "constraint"),
    [
        ("kind", "''", "ck_pgotask_task_kind_valid"),
        ("kind, queue", "'k', ''", "ck_pgotask_task_queue_valid"),
        ("kind, queue", "'k', repeat('q', 8000)", "ck_pgotask_task_queue_valid"),
        ("kind, run_at", "'k', 'infinity'", "ck_pgotask_task_run_at_in_range"),
        ("kind, run_at", "'k', '-infinity'", "ck_pgotask_task_run_at_in_range"),
        ("kind, run_at", "'k', '4713-01-01 BC'", "ck_pgotask_task_run_at_in_range"),
        ("kind, run_at", "'k', '1969-12-31 23:59:59+00'", "ck_pgotask_task_run_at_in_range"),
        ("kind, created_at", "'k', '0044-03-15 BC'", "ck_pgotask_task_timestamps_in_range"),
        ("kind, slot", "'k', 'infinity'", "ck_pgotask_task_timestamps_in_range"),
        ("kind, status", "'k', 'running'", "ck_pgotask_task_running_has_lease"),
        (
            "kind, status, locked_by",
            "'k', 'running', 'w'",
            "ck_pgotask_task_running_has_lease",
        ),
        (
            "kind, attempts, max_attempts",
            "'k', 3, 3",
            "ck_pgotask_task_pending_has_an_attempt_left",
        ),
        (
            "kind, attempts, max_attempts",
            "'k', 5, 3",
            "ck_pgotask_task_pending_has_an_attempt_left",
        ),
    ],
)
def test_plain_sql_cannot_write_a_row_no_worker_could_use(
    session: Session, columns: str, values: str, constraint: str
) -> None:
    with pytest.raises(IntegrityError, match=constraint), session.begin_nested():
        session.execute(text(f"INSERT INTO pgotask_task ({columns}) VALUES ({values})"))


def test_a_running_task_cannot_lose_its_lease(session: Session) -> None:
    session.execute(
        text(
            "INSERT INTO pgotask_task (kind, status, attempts, locked_by, lease_expires_at) "
            "VALUES ('k', 'running', 1, 'w', now())"
        )
    )
    with pytest.raises(IntegrityError, match="running_has_lease"), session.begin_nested():
        session.execute(text("UPDATE pgotask_task SET lease_expires_at = NULL"))


def test_the_upgrade_repairs_rows_that_break_the_new_rules(empty_database_url: str) -> None:
    engine = create_engine(empty_database_url)
    try:
        upgrade(engine, revision="sqla_pgotask_0004")
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO pgotask_task (kind, run_at) VALUES ('never', 'infinity'), "
                    "('ancient', '4713-01-01 BC'), ('fine', now())"
                )
            )
            conn.execute(
                text(
                    "INSERT INTO pgotask_task (kind, attempts, max_attempts) VALUES ('spent', 3, 3)"
                )
            )
            conn.execute(
                text(
                    "INSERT INTO pgotask_task (kind, status, attempts, run_at, finished_at) "
                    "VALUES ('done', 'succeeded', 1, 'infinity', '0001-01-01 BC')"
                )
            )
            conn.execute(
                text(
                    "INSERT INTO pgotask_task (kind, status, attempts) "
                    "VALUES ('lost', 'running', 1)"
                )
            )
        upgrade(engine)
        with Session(engine) as session:
            tasks = {t.kind: t for t in session.scalars(select(Task))}
            errors = {e.task.kind: e.message for e in session.scalars(select(TaskError))}
            broken = session.scalar(
                text("SELECT count(*) FROM pg_constraint WHERE NOT convalidated")
            )
        assert {kind: t.status for kind, t in tasks.items()} == {
            "never": TaskStatus.FAILED,
            "ancient": TaskStatus.FAILED,
            "fine": TaskStatus.PENDING,
            "spent": TaskStatus.FAILED,
            "done": TaskStatus.SUCCEEDED,
            "lost": TaskStatus.RUNNING,
        }
        assert "run_at infinity is not between" in errors["never"]
        assert "run_at 4713-01-01" in errors["ancient"]
        assert "no attempt left (3 of 3 used)" in errors["spent"]
        assert set(errors) == {"never", "ancient", "spent"}
        assert tasks["done"].finished_at is None and tasks["done"].run_at is not None
        lost = tasks["lost"]
        assert lost.locked_by == "unknown" and lost.lease_expires_at is not None  # rescued soon
        assert broken == 0
    finally:
        engine.dispose()
