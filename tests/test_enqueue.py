"""add_many(): bulk enqueue in one statement, in the Session's transaction."""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import pytest
from sqlalchemy import Engine, event, func, make_url, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from sqla_pgotask import (
    Base,
    InvalidPayloadError,
    Scheduler,
    Task,
    TaskFields,
    TaskStatus,
    add_many,
)
from tests.helpers import running, wait_until

WHEN = dt.datetime(2031, 5, 6, tzinfo=dt.timezone.utc)


def _count(session: Session) -> int:
    return session.scalar(select(func.count()).select_from(Task)) or 0


def _rows(session: Session) -> list[tuple[Any, ...]]:
    return [
        tuple(row)
        for row in session.execute(
            select(
                Task.kind,
                Task.queue,
                Task.payload,
                Task.priority,
                Task.run_at,
                Task.max_attempts,
                Task.dedup_key,
            ).order_by(Task.id)
        )
    ]


@contextmanager
def statements(session: Session) -> Iterator[list[str]]:
    """The SQL statements ``session``'s connection sends while the block runs."""
    sent: list[str] = []
    conn = session.connection()

    def record(*args: Any) -> None:
        sent.append(args[2])

    event.listen(conn, "before_cursor_execute", record)
    try:
        yield sent
    finally:
        event.remove(conn, "before_cursor_execute", record)


# -- the Task form (compatibility) -------------------------------------------------------


def test_add_many_inserts_with_the_same_defaults(session: Session) -> None:
    count = add_many(
        session,
        [
            Task(kind="a"),
            Task(
                kind="b",
                payload={"x": [1, 2]},
                queue="emails",
                priority=5,
                run_at=WHEN,
                max_attempts=2,
                dedup_key="k",
            ),
        ],
    )
    assert count == 2
    now = session.scalar(select(func.now()))
    assert _rows(session) == [
        ("a", "default", {}, 0, now, None, None),
        ("b", "emails", {"x": [1, 2]}, 5, WHEN, 2, "k"),
    ]
    a = session.scalars(select(Task).order_by(Task.id)).first()
    assert a is not None and a.status is TaskStatus.PENDING and a.attempts == 0
    assert a.created_at == now and a.finished_at is None
    assert add_many(session, []) == 0


def test_task_objects_are_only_read(session: Session) -> None:
    task = Task(kind="a", payload={"n": 1})
    assert add_many(session, [task]) == 1
    assert task not in session and task.id is None
    assert _rows(session)[0][:3] == ("a", "default", {"n": 1})


def test_a_task_with_columns_add_many_cannot_set_is_refused(session: Session) -> None:
    with statements(session) as sent, pytest.raises(TypeError, match="sets status, attempts"):
        add_many(session, [Task(kind="a"), Task(kind="b", status=TaskStatus.RUNNING, attempts=2)])
    assert sent == []


# -- the kind + payloads form ------------------------------------------------------------


def test_kind_and_payloads_one_task_per_payload(session: Session) -> None:
    count = add_many(session, "resize", ({"image": i} for i in range(3)))
    assert count == 3
    now = session.scalar(select(func.now()))
    assert _rows(session) == [
        ("resize", "default", {"image": i}, 0, now, None, None) for i in range(3)
    ]


def test_kind_and_payloads_with_options_for_all(session: Session) -> None:
    add_many(
        session,
        "report",
        [{"day": 1}, [1, "two"], "three", 4, None, True],
        queue="reports",
        priority=-3,
        run_at=WHEN,
        max_attempts=7,
    )
    payloads = [{"day": 1}, [1, "two"], "three", 4, {}, True]  # None becomes {}
    assert _rows(session) == [("report", "reports", p, -3, WHEN, 7, None) for p in payloads]


def test_return_ids_in_the_order_given(session: Session) -> None:
    ids = add_many(session, "k", [{"i": i} for i in range(50)], return_ids=True)
    assert len(ids) == 50 and ids == sorted(ids)
    stored: dict[int, Any] = dict(
        session.execute(select(Task.id, Task.payload).where(Task.id.in_(ids))).all()
    )
    assert [stored[i] for i in ids] == [{"i": i} for i in range(50)]
    rows_ids = add_many(session, [{"kind": "a"}, Task(kind="b")], return_ids=True)
    kinds: dict[int, str] = dict(
        session.execute(select(Task.id, Task.kind).where(Task.id.in_(rows_ids))).all()
    )
    assert [kinds[i] for i in rows_ids] == ["a", "b"]
    assert add_many(session, "k", [], return_ids=True) == []
    assert add_many(session, [], return_ids=True) == []


def test_nothing_to_insert_sends_nothing(session: Session) -> None:
    with statements(session) as sent:
        assert add_many(session, "k", []) == 0
        assert add_many(session, []) == 0
        assert add_many(session, iter([])) == 0
    assert sent == []


# -- the mappings form -------------------------------------------------------------------


def test_mappings_each_with_its_own_fields(session: Session) -> None:
    tasks: list[TaskFields] = [
        {"kind": "a"},
        {"kind": "b", "payload": {"x": 1}, "queue": "q", "priority": 2},
        {"kind": "a", "run_at": WHEN, "max_attempts": 3, "dedup_key": "d"},
        {"kind": "c", "payload": None, "queue": None, "priority": None, "run_at": None},
    ]
    assert add_many(session, tasks) == 4
    now = session.scalar(select(func.now()))
    assert _rows(session) == [
        ("a", "default", {}, 0, now, None, None),
        ("b", "q", {"x": 1}, 2, now, None, None),
        ("a", "default", {}, 0, WHEN, 3, "d"),
        ("c", "default", {}, 0, now, None, None),
    ]


def test_mappings_and_tasks_mixed(session: Session) -> None:
    add_many(session, [{"kind": "a", "queue": "q1"}, Task(kind="a", queue="q2"), {"kind": "a"}])
    assert [row[:2] for row in _rows(session)] == [("a", "q1"), ("a", "q2"), ("a", "default")]


def test_any_mapping_will_do(session: Session) -> None:
    class Fields(dict[str, Any]):
        pass

    add_many(session, [Fields(kind="a", payload=[1])])
    assert _rows(session)[0][:3] == ("a", "default", [1])


# -- errors, before anything is sent -----------------------------------------------------


@pytest.mark.parametrize(
    ("tasks", "error", "message"),
    [
        (
            [{"kind": "a"}, {"kind": "b", "prio": 1}],
            TypeError,
            r"task 1 has unknown field\(s\) 'prio'",
        ),
        ([{"kind": "a"}, {"payload": {}}], InvalidPayloadError, "task 1 has no kind"),
        ([{"kind": ""}], InvalidPayloadError, "task 0 has no kind"),
        ([{"kind": "a"}, {"kind": 7}], InvalidPayloadError, "task 1 has no kind .* it has 7"),
        ([{"kind": ["a"]}], InvalidPayloadError, "task 0 has no kind"),
        ([Task(kind="a"), Task()], InvalidPayloadError, "task 1 has no kind"),
        (
            [{"kind": "ok"}, {"kind": "bad", "payload": {"s": {1}}}],
            InvalidPayloadError,
            r"task 1: Task\(kind='bad'\): payload is not JSON-serialisable: .*set",
        ),
        ([{"kind": "nan", "payload": float("nan")}], InvalidPayloadError, "Out of range float"),
        ([("a", {})], TypeError, "takes Task objects or mappings of task fields, not tuple"),
    ],
)
def test_bad_tasks_raise_before_anything_is_sent(
    session: Session, tasks: list[Any], error: type[Exception], message: str
) -> None:
    with statements(session) as sent, pytest.raises(error, match=message):
        add_many(session, tasks)
    assert sent == []
    assert _count(session) == 0


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "message"),
    [
        (
            ("k", [{}, {"d": dt.date(2030, 1, 1)}]),
            {},
            InvalidPayloadError,
            r"task 1: Task\(kind='k'\)",
        ),
        (("k", [float("inf")]), {}, InvalidPayloadError, r"task 0: Task\(kind='k'\)"),
        (("", [{}]), {}, InvalidPayloadError, "the kind must be a non-empty string"),
        (
            ("k", {"one": "payload"}),
            {},
            TypeError,
            "an iterable of payloads, one per task, not a dict",
        ),
        (("k", "abc"), {}, TypeError, "not a str"),
        (("k",), {}, TypeError, "payloads are missing"),
        (([{"kind": "a"}], [{}]), {}, TypeError, "takes no payloads argument"),
        (
            ([{"kind": "a"}],),
            {"queue": "q", "priority": 1},
            TypeError,
            "no queue, priority argument",
        ),
    ],
)
def test_bad_calls_raise_before_anything_is_sent(
    session: Session,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    error: type[Exception],
    message: str,
) -> None:
    with statements(session) as sent, pytest.raises(error, match=message):
        add_many(session, *args, **kwargs)
    assert sent == []
    assert _count(session) == 0


def test_deeply_nested_payload_is_refused(session: Session) -> None:
    payload: list[Any] = []
    for _ in range(100_000):
        payload = [payload]
    with pytest.raises(InvalidPayloadError, match=r"task 0: Task\(kind='deep'\)"):
        add_many(session, "deep", [payload])


def test_add_many_duplicates_are_no_ops(session: Session) -> None:
    first = Task(kind="k", dedup_key="d")
    session.add(first)
    session.flush()
    add_many(session, [Task(kind="k", dedup_key="d")])
    add_many(session, [{"kind": "k", "dedup_key": "e"}, {"kind": "k", "dedup_key": "e"}])
    live = session.execute(
        text("SELECT kind, dedup_key FROM pgotask_task WHERE status = 'pending' ORDER BY id")
    ).all()
    assert [tuple(row) for row in live] == [("k", "d"), ("k", "e")]
    assert _count(session) == 4


def test_database_errors_come_from_the_database(session: Session) -> None:
    # A unique index, which only the database can check.
    session.execute(text("CREATE UNIQUE INDEX one_k_per_queue ON pgotask_task (queue)"))
    with pytest.raises(IntegrityError, match="one_k_per_queue"), session.begin_nested():
        add_many(session, "k", [{}, {}])


def test_uses_the_bind_of_the_task_mapper(orm_engine: Engine) -> None:
    # A Session without a default bind, binding the library's models to one
    # engine, as a multi-database application would.
    with orm_engine.connect() as conn:
        outer = conn.begin()
        with Session(binds={Base: conn}) as session:
            assert add_many(session, "k", [{}, {}]) == 2
            assert _count(session) == 2
        outer.rollback()


# -- transactions and wake-ups -----------------------------------------------------------


def _listener(database_url: str) -> psycopg.Connection[tuple[Any, ...]]:
    dsn = make_url(database_url).set(drivername="postgresql").render_as_string(False)
    conn = psycopg.connect(dsn, autocommit=True)
    conn.execute("LISTEN pgotask")
    return conn


def _notified(conn: psycopg.Connection[tuple[Any, ...]], wait: float = 0.5) -> list[str]:
    return sorted(n.payload for n in conn.notifies(timeout=wait))


def test_rollback_leaves_no_task_and_wakes_no_one(
    database_url: str, session_factory: sessionmaker[Session]
) -> None:
    listener = _listener(database_url)
    try:
        with session_factory() as session:
            add_many(session, "k", [{"i": i} for i in range(100)], queue="q")
            add_many(session, [{"kind": "k"}, Task(kind="k")])
            assert _count(session) == 102  # visible inside the transaction
            session.rollback()
            assert _count(session) == 0
        assert _notified(listener) == []
    finally:
        listener.close()


def test_commit_notifies_once_per_distinct_queue(
    database_url: str, session_factory: sessionmaker[Session]
) -> None:
    listener = _listener(database_url)
    try:
        with session_factory() as session:
            add_many(session, [{"kind": "k", "queue": q} for q in ["a", "b", "a", None] * 250])
            add_many(session, "k", [{}] * 300, queue="c")
            assert _notified(listener, 0.2) == []  # nothing before the commit
            session.commit()
        # One notification per distinct queue and statement: both statements
        # named different queues, and PostgreSQL folds duplicates in a transaction.
        assert _notified(listener) == ["a", "b", "c", "default"]
        with session_factory() as session:
            assert session.scalar(text("SELECT count(*) FROM pgotask_task")) == 1300
    finally:
        listener.close()


def test_add_many_is_transactional_and_wakes_workers(
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
            add_many(session, "n", [{"i": i} for i in range(250)])
            add_many(session, [{"kind": "n", "payload": {"i": i}} for i in range(250, 500)])
        wait_until(lambda: len(ran) == 500, timeout=30)
    assert sorted(ran) == list(range(500))
