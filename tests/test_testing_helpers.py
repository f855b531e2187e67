"""``sqla_pgotask.testing``: drain, inline and the assertions, in a rolled-back transaction."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator

import pytest
from sqlalchemy import Connection, Engine, MetaData, String, func, select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from sqla_pgotask import (
    ConstantBackoff,
    Scheduler,
    Snooze,
    Task,
    TaskError,
    TaskStatus,
    UnknownKindError,
    current_attempt,
    pause_queue,
)
from sqla_pgotask.testing import (
    DrainLimitError,
    HandlerFailedError,
    assert_enqueued,
    assert_not_enqueued,
    drain,
    enqueued,
    inline,
)


class AppBase(DeclarativeBase):
    metadata = MetaData()


class Order(AppBase):
    __tablename__ = "testing_helpers_order"

    id: Mapped[int] = mapped_column(primary_key=True)
    receipt: Mapped[str | None] = mapped_column(String(100), default=None)


@pytest.fixture(scope="module")
def app_tables(orm_engine: Engine) -> Iterator[None]:
    AppBase.metadata.create_all(orm_engine)
    yield
    AppBase.metadata.drop_all(orm_engine)


@pytest.fixture
def conn(orm_engine: Engine, app_tables: None) -> Iterator[Connection]:
    """The test's connection, inside a transaction rolled back at the end."""
    with orm_engine.connect() as connection:
        outer = connection.begin()
        try:
            yield connection
        finally:
            if outer.is_active:
                outer.rollback()


@pytest.fixture
def db(conn: Connection) -> Iterator[Session]:
    """The application's Session in the test, joined into the rolled-back transaction."""
    with Session(bind=conn, join_transaction_mode="create_savepoint") as sess:
        yield sess


@pytest.fixture
def scheduler(orm_engine: Engine) -> Scheduler:
    """The application's scheduler, on its own (engine-bound) sessionmaker."""
    return Scheduler(sessionmaker(orm_engine))


def _receipts(scheduler: Scheduler) -> None:
    @scheduler.handler("send_receipt")
    def send_receipt(session: Session, task: Task) -> object:
        order = session.get(Order, task.payload["order_id"])
        assert order is not None
        order.receipt = f"attempt {current_attempt().attempt}"
        return {"sent_to": order.id}


# -- drain ------------------------------------------------------------------------------


def test_drain_runs_in_the_tests_transaction_and_vanishes_with_it(
    scheduler: Scheduler, conn: Connection, db: Session, orm_engine: Engine
) -> None:
    _receipts(scheduler)
    db.add(Order(id=7))
    db.add(Task(kind="send_receipt", payload={"order_id": 7}))
    order = db.get(Order, 7)  # loaded before the drain: expired by it
    assert order is not None and order.receipt is None

    result = drain(scheduler, db)

    assert (len(result), result.succeeded, result.counts) == (1, 1, {"succeeded": 1})
    assert order.receipt == "attempt 1"  # the handler's write, seen by the test
    [task] = result.tasks
    assert task in db  # loaded into the test's Session
    assert (task.status, task.attempts, task.result) == (TaskStatus.SUCCEEDED, 1, {"sent_to": 7})
    assert drain(scheduler, db).attempts == []

    conn.rollback()  # the end of the test
    with orm_engine.connect() as other:
        assert other.scalar(select(func.count()).select_from(Order)) == 0
        assert other.scalar(select(func.count()).select_from(Task)) == 0


def test_drain_on_a_connection_or_the_schedulers_own_sessionmaker(
    orm_engine: Engine, conn: Connection, db: Session
) -> None:
    # An application whose sessionmaker the test fixture binds to its connection.
    app_session = sessionmaker(orm_engine)
    app_session.configure(bind=conn)
    scheduler = Scheduler(app_session)
    _receipts(scheduler)
    db.add_all([Order(id=1), Order(id=2), Task(kind="send_receipt", payload={"order_id": 1})])
    db.commit()  # releases the test Session's savepoint only
    assert drain(scheduler).succeeded == 1
    db.add(Task(kind="send_receipt", payload={"order_id": 2}))
    db.flush()
    assert drain(scheduler, conn).succeeded == 1
    db.expire_all()
    assert [o.receipt for o in db.scalars(select(Order).order_by(Order.id))] == [
        "attempt 1",
        "attempt 1",
    ]


def test_a_failing_handler_raises_with_its_exception_and_the_failure_is_recorded(
    scheduler: Scheduler, db: Session
) -> None:
    @scheduler.handler("explode", max_attempts=3)
    def explode(session: Session, task: Task) -> None:
        session.add(Order(id=99))  # rolled back with the attempt
        raise ValueError("boom")

    task = Task(kind="explode")
    db.add(task)
    with pytest.raises(HandlerFailedError) as info:
        drain(scheduler, db)

    assert isinstance(info.value.__cause__, ValueError)
    assert info.value.error is info.value.__cause__
    assert f"task {task.id} (explode) attempt 1 of 3 raised ValueError: boom" in str(info.value)
    assert "it will be retried" in str(info.value)
    assert info.value.result.retried == 1
    assert (task.status, task.attempts) == (TaskStatus.PENDING, 1)  # retried after a backoff
    error = db.scalars(select(TaskError).where(TaskError.task_id == task.id)).one()
    assert (error.exception_type, error.message) == ("ValueError", "boom")
    assert "raise ValueError" in (error.traceback or "")
    assert db.get(Order, 99) is None


def test_retries_run_with_include_future_until_the_task_fails(
    scheduler: Scheduler, db: Session
) -> None:
    @scheduler.handler("flaky", max_attempts=3, retry=ConstantBackoff(3600))
    def flaky(session: Session, task: Task) -> None:
        raise RuntimeError(f"attempt {current_attempt().attempt}")

    task = Task(kind="flaky")
    db.add(task)
    once = drain(scheduler, db, raise_on_failure=False)
    assert (once.retried, task.status) == (1, TaskStatus.PENDING)  # the retry is an hour away

    result = drain(scheduler, db, raise_on_failure=False, include_future=True)

    assert [(a.attempt, a.outcome) for a in result.attempts] == [(2, "retry"), (3, "failed")]
    assert [str(a.error) for a in result.errors] == ["attempt 2", "attempt 3"]
    assert (result.retried, result.failed) == (1, 1)
    assert (task.status, task.attempts) == (TaskStatus.FAILED, 3)
    assert len(db.scalars(select(TaskError).where(TaskError.task_id == task.id)).all()) == 3


def test_a_retry_that_succeeds(scheduler: Scheduler, db: Session) -> None:
    @scheduler.handler("second_time_lucky", retry=ConstantBackoff(60))
    def lucky(session: Session, task: Task) -> str:
        if current_attempt().attempt == 1:
            raise ConnectionError("try again")
        return "done"

    db.add(Task(kind="second_time_lucky"))
    result = drain(scheduler, db, include_future=True, raise_on_failure=False)
    assert [a.outcome for a in result.attempts] == ["retry", "succeeded"]
    assert isinstance(result.attempts[0].error, ConnectionError)
    assert result.tasks[0].result == "done"


def test_include_future_runs_later_tasks_in_run_at_order(scheduler: Scheduler, db: Session) -> None:
    ran: list[str] = []

    @scheduler.handler("later")
    def later(session: Session, task: Task) -> None:
        ran.append(task.payload["name"])

    now = db.scalar(select(func.now()))
    assert now is not None
    db.add_all(
        [
            Task(kind="later", payload={"name": "in an hour"}, run_at=now + dt.timedelta(hours=1)),
            Task(
                kind="later", payload={"name": "in a minute"}, run_at=now + dt.timedelta(minutes=1)
            ),
            Task(kind="later", payload={"name": "now"}),
        ]
    )
    assert drain(scheduler, db).succeeded == 1
    assert ran == ["now"]
    assert drain(scheduler, db, include_future=True).succeeded == 2
    assert ran == ["now", "in a minute", "in an hour"]


def test_filters_by_kind_and_queue_and_skips_paused_queues(
    scheduler: Scheduler, db: Session
) -> None:
    ran: list[int] = []

    @scheduler.handler("a")
    def a(session: Session, task: Task) -> None:
        ran.append(task.id)

    @scheduler.handler("b")
    def b(session: Session, task: Task) -> None:
        ran.append(task.id)

    ta, tb, tq = Task(kind="a"), Task(kind="b"), Task(kind="a", queue="slow")
    db.add_all([ta, tb, tq])
    db.flush()
    assert drain(scheduler, db, kinds=["b"]).succeeded == 1
    assert ran == [tb.id]
    assert drain(scheduler, db, queues=["default"]).succeeded == 1
    assert ran == [tb.id, ta.id]
    pause_queue(db, "slow")
    assert drain(scheduler, db).succeeded == 0
    with pytest.raises(UnknownKindError, match="'nope'"):
        drain(scheduler, db, kinds=["nope"])


def test_fleet_wide_limits_hold_in_a_drain_and_are_never_waited_for(
    scheduler: Scheduler, db: Session
) -> None:
    @scheduler.handler("one_at_a_time", max_running=1)
    def one_at_a_time(session: Session, task: Task) -> None:
        pass

    @scheduler.handler("free")
    def free(session: Session, task: Task) -> None:
        pass

    elsewhere = Task(
        kind="one_at_a_time",
        status=TaskStatus.RUNNING,
        attempts=1,
        locked_by="another-worker",
        lease_expires_at=dt.datetime.now(dt.timezone.utc) + dt.timedelta(minutes=5),
    )
    held, other = Task(kind="one_at_a_time"), Task(kind="free")
    db.add_all([elsewhere, held, other])
    db.flush()
    result = drain(scheduler, db)
    assert [a.task_id for a in result.attempts] == [other.id]  # the limit is full
    assert held.status is TaskStatus.PENDING
    db.execute(
        text(
            "UPDATE pgotask_task SET status = 'succeeded', locked_by = NULL, "
            "lease_expires_at = NULL WHERE id = :id"
        ),
        {"id": elsewhere.id},
    )
    assert [a.task_id for a in drain(scheduler, db).attempts] == [held.id]  # room again


def test_a_task_without_a_handler_is_a_clear_error(scheduler: Scheduler, db: Session) -> None:
    _receipts(scheduler)
    db.add(Task(kind="sned_receipt"))
    with pytest.raises(UnknownKindError, match=r"kind 'sned_receipt'.*registered: send_receipt"):
        drain(scheduler, db)


def test_the_drain_is_bounded(scheduler: Scheduler, db: Session) -> None:
    @scheduler.handler("forever")
    def forever(session: Session, task: Task) -> None:
        session.add(Task(kind="forever"))

    @scheduler.handler("sleepy")
    def sleepy(session: Session, task: Task) -> None:
        raise Snooze(10)

    db.add(Task(kind="forever"))
    with pytest.raises(DrainLimitError, match="1 of kind 'forever'") as info:
        drain(scheduler, db, max_tasks=5)
    assert info.value.result.succeeded == 5

    db.add(Task(kind="sleepy"))
    assert drain(scheduler, db, kinds=["sleepy"]).snoozed == 1  # then it is not due
    with pytest.raises(DrainLimitError, match="snooze"):
        drain(scheduler, db, kinds=["sleepy"], include_future=True, max_tasks=4)


# -- assertions --------------------------------------------------------------------------


def test_assert_enqueued_matches_a_subset_of_the_payload(db: Session) -> None:
    db.add(Task(kind="email", payload={"to": "a@example.com", "opts": {"cc": 1, "bcc": 2}}))
    db.add(Task(kind="email", payload={"to": "b@example.com"}, queue="bulk"))
    db.add(Task(kind="sms", payload={"to": "a@example.com"}))

    [task] = assert_enqueued(db, kind="email", payload={"opts": {"cc": 1}})
    assert task.payload["to"] == "a@example.com"
    assert len(assert_enqueued(db, kind="email", count=2)) == 2
    assert_enqueued(db, payload={"to": "a@example.com"}, count=2)  # any kind
    assert_enqueued(db, kind="email", queue="bulk", payload={"to": "b@example.com"}, exact=True)
    assert_not_enqueued(db, kind="email", payload={"to": "a@example.com"}, exact=True)
    assert_not_enqueued(db, kind="push")
    assert enqueued(db, "email", queue="default") == [task]


def test_assert_enqueued_failure_lists_what_was_enqueued(db: Session) -> None:
    db.add(Task(kind="email", payload={"to": "a@example.com"}))
    with pytest.raises(AssertionError) as info:
        assert_enqueued(db, kind="email", payload={"to": "b@example.com"})
    message = str(info.value)
    assert message.startswith(
        "expected at least 1 task of kind 'email' with payload containing "
        "{'to': 'b@example.com'} with status pending, found 0; the tasks visible (any status):"
    )
    assert "kind='email' queue='default' status=pending attempts=0" in message
    assert "payload={'to': 'a@example.com'}" in message

    with pytest.raises(AssertionError, match=r"expected exactly 2 tasks of kind 'email'.*found 1"):
        assert_enqueued(db, kind="email", count=2)
    with pytest.raises(AssertionError, match=r"expected no task of kind 'email'.*found 1:\n  task"):
        assert_not_enqueued(db, kind="email")


def test_assertions_see_the_tasks_as_they_are_now(scheduler: Scheduler, db: Session) -> None:
    _receipts(scheduler)
    db.add(Order(id=3))
    assert_not_enqueued(db)
    with pytest.raises(AssertionError, match="no task is enqueued at all"):
        assert_enqueued(db)
    task = Task(kind="send_receipt", payload={"order_id": 3})
    db.add(task)  # not flushed yet: the assertions flush
    assert_enqueued(db, kind="send_receipt", payload={"order_id": 3})
    # Ran on the same connection behind the Session's back: still seen as it is now.
    drain(scheduler, db.connection())
    assert_not_enqueued(db, kind="send_receipt")
    assert_enqueued(db, kind="send_receipt", status=TaskStatus.SUCCEEDED)
    assert_enqueued(db, kind="send_receipt", status=None, count=1)
    assert_enqueued(db, status=["failed", "succeeded"], count=1)
    assert task.status is TaskStatus.SUCCEEDED


# -- inline -----------------------------------------------------------------------------


def test_inline_runs_tasks_at_each_commit_including_those_handlers_enqueue(
    scheduler: Scheduler, db: Session
) -> None:
    _receipts(scheduler)

    @scheduler.handler("checkout")
    def checkout(session: Session, task: Task) -> None:
        session.add(Order(id=task.payload["order_id"]))
        session.add(Task(kind="send_receipt", payload=task.payload))

    with inline(scheduler, db) as ran:
        db.add(Task(kind="checkout", payload={"order_id": 5}))
        db.flush()
        assert_enqueued(db, kind="checkout")  # a flush runs nothing: not committed yet
        db.commit()
        assert [t.kind for t in ran.tasks] == ["checkout", "send_receipt"]
        order = db.get(Order, 5)
        assert order is not None and order.receipt == "attempt 1"

        with db.begin_nested():  # a savepoint is not a commit
            db.add(Task(kind="checkout", payload={"order_id": 6}))
        assert_enqueued(db, kind="checkout", payload={"order_id": 6})
        db.rollback()  # never committed: never runs
        assert_not_enqueued(db, kind="checkout", status=None, payload={"order_id": 6})
        assert ran.succeeded == 2

    db.add(Task(kind="checkout", payload={"order_id": 8}))
    db.commit()  # after the block: nothing runs
    assert_enqueued(db, kind="checkout", payload={"order_id": 8})


def test_inline_raises_a_handler_failure_from_commit(scheduler: Scheduler, db: Session) -> None:
    @scheduler.handler("explode")
    def explode(session: Session, task: Task) -> None:
        raise KeyError("missing")

    with inline(scheduler, db):
        db.add(Task(kind="explode"))
        with pytest.raises(HandlerFailedError, match="raised KeyError") as info:
            db.commit()
        assert isinstance(info.value.__cause__, KeyError)
        # The commit happened and the Session goes on.
        [task] = assert_enqueued(db, kind="explode")
        assert task.attempts == 1
        assert db.scalar(text("SELECT 1")) == 1

    with inline(scheduler, db, raise_on_failure=False) as ran:
        db.add(Task(kind="explode"))
        db.commit()
    assert ran.retried == 1


def test_inline_with_a_session_on_an_engine(database_url: str) -> None:
    # A test suite that commits (its own database): the tasks run in their own transactions.
    from sqlalchemy import create_engine

    engine = create_engine(database_url)
    try:
        scheduler = Scheduler(sessionmaker(engine))
        seen: list[int] = []

        @scheduler.handler("k")
        def k(session: Session, task: Task) -> None:
            seen.append(task.id)

        with Session(engine) as sess, inline(scheduler, sess) as ran:
            task = Task(kind="k")
            sess.add(task)
            sess.commit()
            assert seen == [task.id] and ran.succeeded == 1
            assert task.status is TaskStatus.SUCCEEDED
    finally:
        engine.dispose()
