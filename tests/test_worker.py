"""The worker against a real database: wake-ups, atomic completion, failures, fencing."""

from __future__ import annotations

import datetime as dt
import threading
import time

import pytest
from sqlalchemy import event, func, select, text, update
from sqlalchemy.orm import Session, sessionmaker

from sqla_pgotask import (
    ConstantBackoff,
    NonRetryableError,
    Scheduler,
    SchemaError,
    Task,
    TaskError,
    TaskStatus,
)
from sqla_pgotask.context import Outcome
from sqla_pgotask.engine import settle
from sqla_pgotask.engine.claims import SessionConnection
from sqla_pgotask.engine.run import BatchRunner, new_context
from tests.helpers import (
    Ledger,
    add_tasks,
    claim_tasks,
    errors_of,
    get_task,
    ledger_ids,
    running,
    wait_until,
)

# -- enqueue and wake-up ----------------------------------------------------------


def test_commit_wakes_an_idle_worker_promptly_and_rollback_enqueues_nothing(
    app: sessionmaker[Session],
) -> None:
    # poll_interval is 30 s: only a notification can start the task in time.
    scheduler = Scheduler(app, poll_interval=30)
    started: dict[int, float] = {}

    @scheduler.handler("ping")
    def ping(session: Session, task: Task) -> None:
        started[task.id] = time.monotonic()

    with running(scheduler):
        time.sleep(0.2)  # the worker is idle, waiting
        with app() as session:
            session.add(Task(kind="ping"))
            session.rollback()
        committed = time.monotonic()
        (task_id,) = add_tasks(app, Task(kind="ping"))
        wait_until(lambda: task_id in started, timeout=5)
        # Far below the 30 s poll (typically a few ms; the bound allows for a
        # stall of the shared machine).
        assert started[task_id] - committed < 3.0
        time.sleep(0.2)
    assert list(started) == [task_id]
    with app() as session:
        assert session.scalar(select(func.count()).select_from(Task)) == 1


def test_an_idle_worker_wakes_when_a_delayed_task_or_retry_is_due(
    app: sessionmaker[Session],
) -> None:
    # poll_interval is 30 s: only waking at the task's run_at is on time.
    scheduler = Scheduler(app, poll_interval=30)
    starts: list[float] = []

    @scheduler.handler("later", retry=1.0)
    def later(session: Session, task: Task) -> None:
        starts.append(time.monotonic())
        if task.attempts == 1:
            raise RuntimeError("again in a second")

    with running(scheduler):
        time.sleep(0.2)  # idle
        with app.begin() as session:
            session.execute(
                text("INSERT INTO pgotask_task (kind, run_at) VALUES ('later', now() + '1.5 s')")
            )
        committed = time.monotonic()
        wait_until(lambda: len(starts) == 2, timeout=10)
    # Not before run_at (1.5 s after the transaction began), and not at the next poll.
    assert 1.3 < starts[0] - committed < 3.0
    # The retry, 1 s after the failure, is on time as well.
    assert 0.9 < starts[1] - starts[0] < 2.5


def test_plain_sql_insert_is_processed(app: sessionmaker[Session]) -> None:
    scheduler = Scheduler(app, poll_interval=30)
    seen: list[object] = []

    @scheduler.handler("send_email")
    def send_email(session: Session, task: Task) -> None:
        seen.append(task.payload)

    with running(scheduler):
        with app.begin() as session:
            session.execute(
                text(
                    "INSERT INTO pgotask_task (kind, payload) "
                    """VALUES ('send_email', '{"to": 1}')"""
                )
            )
        wait_until(lambda: bool(seen), timeout=5)
    assert seen == [{"to": 1}]


def test_many_tasks_with_concurrency_each_run_once(app: sessionmaker[Session]) -> None:
    scheduler = Scheduler(app, concurrency=4, poll_interval=0.2)

    @scheduler.handler("ledger")
    def write(session: Session, task: Task) -> None:
        session.add(Ledger(task_id=task.id))

    ids = add_tasks(app, *(Task(kind="ledger") for _ in range(300)))
    with running(scheduler) as stats:
        wait_until(lambda: len(ledger_ids(app)) == 300, timeout=60)
    assert ledger_ids(app) == sorted(ids)
    assert stats[0].succeeded == 300 and stats[0].total == 300
    with app() as session:
        statuses = session.execute(
            select(Task.status, Task.attempts, func.count()).group_by(Task.status, Task.attempts)
        ).all()
    assert statuses == [(TaskStatus.SUCCEEDED, 1, 300)]


# -- handler and completion are one transaction ----------------------------------


def test_handler_writes_and_success_commit_together(app: sessionmaker[Session]) -> None:
    scheduler = Scheduler(app)

    @scheduler.handler("ledger")
    def write(session: Session, task: Task) -> dict[str, int]:
        session.add(Ledger(task_id=task.id, note="done"))
        assert task in session  # the handler sees its task as a persistent object
        return {"wrote": task.id}

    (task_id,) = add_tasks(app, Task(kind="ledger"))
    assert scheduler.run_until_idle() == 1
    task = get_task(app, task_id)
    assert task.status is TaskStatus.SUCCEEDED
    assert task.result == {"wrote": task_id}
    assert task.attempts == 1
    assert task.started_at is not None and task.finished_at is not None
    assert task.finished_at >= task.started_at
    assert task.locked_by is None and task.lease_expires_at is None
    assert ledger_ids(app) == [task_id]
    assert errors_of(app, task_id) == []


def test_raising_handler_leaves_no_writes_records_error_and_retries_later(
    app: sessionmaker[Session],
) -> None:
    scheduler = Scheduler(app)

    @scheduler.handler("bad", max_attempts=3)
    def bad(session: Session, task: Task) -> None:
        session.add(Ledger(task_id=task.id))
        session.flush()  # the write reached the database ...
        raise ValueError(f"broken payload {task.payload}")  # ... and is rolled back

    (task_id,) = add_tasks(app, Task(kind="bad", payload={"x": 1}))
    assert scheduler.run_until_idle() == 1
    with app() as session:
        db_now = session.scalar(select(func.now()))
    task = get_task(app, task_id)
    assert task.status is TaskStatus.PENDING
    assert task.attempts == 1
    assert db_now is not None and task.run_at > db_now  # backoff: a later run_at
    assert task.locked_by is None and task.finished_at is None
    assert ledger_ids(app) == []
    (error,) = errors_of(app, task_id)
    assert error.attempt == 1
    assert error.exception_type == "ValueError"
    assert error.message == "broken payload {'x': 1}"
    assert error.traceback is not None
    assert "raise ValueError" in error.traceback and "Traceback" in error.traceback
    assert error.worker is not None and ":" in error.worker

    # The retry is not due yet; make it due twice: the third attempt is the last.
    assert scheduler.run_until_idle() == 0
    for expected_status in (TaskStatus.PENDING, TaskStatus.FAILED):
        with app.begin() as session:
            session.execute(update(Task).where(Task.id == task_id).values(run_at=func.now()))
        assert scheduler.run_until_idle() == 1
        assert get_task(app, task_id).status is expected_status
    task = get_task(app, task_id)
    assert task.attempts == 3 and task.finished_at is not None
    assert [e.attempt for e in errors_of(app, task_id)] == [1, 2, 3]
    assert ledger_ids(app) == []
    assert scheduler.run_until_idle() == 0


def test_task_max_attempts_overrides_the_handler(app: sessionmaker[Session]) -> None:
    scheduler = Scheduler(app)

    @scheduler.handler("bad", max_attempts=5, retry=0)
    def bad(session: Session, task: Task) -> None:
        raise RuntimeError("no")

    (task_id,) = add_tasks(app, Task(kind="bad", max_attempts=2))
    assert scheduler.run_until_idle() == 2  # retry=0: due again at once
    assert get_task(app, task_id).status is TaskStatus.FAILED
    assert len(errors_of(app, task_id)) == 2


class PaymentDeclined(Exception):
    pass


class Invalid(NonRetryableError):
    pass


def test_non_retryable_exceptions_fail_at_once(app: sessionmaker[Session]) -> None:
    scheduler = Scheduler(app)

    @scheduler.handler("charge", non_retryable=(PaymentDeclined,), retry=0)
    def charge(session: Session, task: Task) -> None:
        if task.payload["n"] == 1:
            raise PaymentDeclined("card declined")
        if task.payload["n"] == 2:
            raise Invalid("bad input")
        raise ConnectionError("try again")

    a, b, c = add_tasks(app, *(Task(kind="charge", payload={"n": n}) for n in (1, 2, 3)))
    scheduler.run_until_idle()
    assert get_task(app, a).status is TaskStatus.FAILED
    assert get_task(app, a).attempts == 1
    assert get_task(app, b).status is TaskStatus.FAILED
    assert errors_of(app, b)[0].exception_type == "tests.test_worker.Invalid"
    assert get_task(app, c).status is TaskStatus.FAILED  # retried until max_attempts
    assert get_task(app, c).attempts == 5


def test_constant_and_callable_backoff(app: sessionmaker[Session]) -> None:
    scheduler = Scheduler(app)
    asked: list[int] = []

    def backoff(attempt: int) -> float:
        asked.append(attempt)
        return 3600.0

    @scheduler.handler("const", retry=ConstantBackoff(120))
    def const(session: Session, task: Task) -> None:
        raise RuntimeError

    @scheduler.handler("func", retry=backoff)
    def func_(session: Session, task: Task) -> None:
        raise RuntimeError

    a, b = add_tasks(app, Task(kind="const"), Task(kind="func"))
    with app() as session:
        before = session.scalar(select(func.now()))
    assert before is not None
    scheduler.run_until_idle()
    delay_a = get_task(app, a).run_at - before
    delay_b = get_task(app, b).run_at - before
    assert dt.timedelta(seconds=120) <= delay_a < dt.timedelta(seconds=130)
    assert dt.timedelta(seconds=3600) <= delay_b < dt.timedelta(seconds=3610)
    assert asked == [1]


# A handler first in its transaction owns it (no savepoint); a later one runs
# in a savepoint: ending the transaction is caught in both places.
AFTER_A_WRITE = pytest.mark.parametrize("after_a_write", [False, True], ids=["first", "later"])


def _writer_first(scheduler: Scheduler) -> tuple[Task, ...]:
    @scheduler.handler("writer")
    def writer(session: Session, task: Task) -> None:
        session.add(Ledger(task_id=task.id, note="kept"))

    return (Task(kind="writer", priority=1),)


@AFTER_A_WRITE
def test_handler_may_not_commit(app: sessionmaker[Session], after_a_write: bool) -> None:
    scheduler = Scheduler(app)

    @scheduler.handler("committer", max_attempts=1)
    def committer(session: Session, task: Task) -> None:
        session.add(Ledger(task_id=task.id))
        session.commit()

    before = _writer_first(scheduler) if after_a_write else ()
    *kept, task_id = add_tasks(app, *before, Task(kind="committer"))
    scheduler.run_until_idle()
    assert get_task(app, task_id).status is TaskStatus.FAILED
    (error,) = errors_of(app, task_id)
    assert error.exception_type == "sqla_pgotask.errors.HandlerTransactionError"
    assert "must not call session.commit()" in error.message
    assert ledger_ids(app) == kept


def test_a_handler_that_does_not_use_its_session_begins_no_transaction(
    app: sessionmaker[Session],
) -> None:
    """Its Session holds the task yet begins nothing; the application's commit listeners run."""
    scheduler = Scheduler(app)
    seen: list[tuple[bool, bool]] = []
    handler_sessions: list[Session] = []
    begun: list[Session] = []  # by any of the application's Sessions (claims use one too)
    committed: list[Session] = []

    @scheduler.handler("idle")
    def idle(session: Session, task: Task) -> None:
        handler_sessions.append(session)
        seen.append((task in session, session.in_transaction()))

    (task_id,) = add_tasks(app, Task(kind="idle"))
    # (The fixture's sessionmaker is this test's alone: its listeners go with it.)
    event.listen(app, "after_begin", lambda session, *_: begun.append(session))
    assert scheduler.run_until_idle() == 1
    assert seen == [(True, False)]
    assert handler_sessions[0] not in begun

    event.listen(app, "after_commit", committed.append)
    (again,) = add_tasks(app, Task(kind="idle"))
    assert scheduler.run_until_idle() == 1
    assert handler_sessions[1] in committed  # observed: the worker commits the handler's Session
    assert get_task(app, task_id).status is get_task(app, again).status is TaskStatus.SUCCEEDED


def test_handler_may_use_savepoints(app: sessionmaker[Session]) -> None:
    scheduler = Scheduler(app)

    @scheduler.handler("nested")
    def nested(session: Session, task: Task) -> None:
        with session.begin_nested():
            session.add(Ledger(task_id=task.id, note="kept"))
        savepoint = session.begin_nested()
        session.add(Ledger(task_id=task.id + 1000, note="undone"))
        session.flush()
        savepoint.rollback()

    (task_id,) = add_tasks(app, Task(kind="nested"))
    scheduler.run_until_idle()
    assert get_task(app, task_id).status is TaskStatus.SUCCEEDED
    assert ledger_ids(app) == [task_id]


def test_the_task_is_in_the_handlers_session_with_its_errors(
    app: sessionmaker[Session],
) -> None:
    """Claimed rows skip the ORM's loading, yet the task is a persistent object of the Session."""
    scheduler = Scheduler(app)
    seen: list[tuple[bool, list[str], int]] = []

    @scheduler.handler("twice", max_attempts=2, retry=0)
    def twice(session: Session, task: Task) -> None:
        same = session.get(Task, task.id) is task  # no second copy of the row
        seen.append((same and task in session, [e.message for e in task.errors], task.attempts))
        if task.attempts == 1:
            raise ValueError("first attempt")
        task.result = None  # a change to the task itself is flushed with the rest
        session.refresh(task)

    (task_id,) = add_tasks(app, Task(kind="twice", payload={"n": 1}))
    assert scheduler.run_until_idle() == 2
    assert seen == [(True, [], 1), (True, ["first attempt"], 2)]
    assert get_task(app, task_id).status is TaskStatus.SUCCEEDED


@AFTER_A_WRITE
def test_handler_that_rolls_back_fails_the_task(
    app: sessionmaker[Session], after_a_write: bool
) -> None:
    scheduler = Scheduler(app)

    @scheduler.handler("rollbacker", max_attempts=1)
    def rollbacker(session: Session, task: Task) -> None:
        session.add(Ledger(task_id=task.id))
        session.flush()
        session.rollback()
        session.add(Ledger(task_id=task.id + 1))

    before = _writer_first(scheduler) if after_a_write else ()
    *kept, task_id = add_tasks(app, *before, Task(kind="rollbacker"))
    scheduler.run_until_idle()
    assert get_task(app, task_id).status is TaskStatus.FAILED
    (error,) = errors_of(app, task_id)
    assert error.exception_type == "sqla_pgotask.errors.HandlerTransactionError"
    assert ledger_ids(app) == kept


def test_handler_database_error_fails_the_attempt(app: sessionmaker[Session]) -> None:
    scheduler = Scheduler(app)

    @scheduler.handler("dup", max_attempts=1)
    def dup(session: Session, task: Task) -> None:
        session.add(Ledger(task_id=1))  # collides with the row added below; found at flush

    with app.begin() as session:
        session.add(Ledger(task_id=1))
    (task_id,) = add_tasks(app, Task(kind="dup"))
    scheduler.run_until_idle()
    (error,) = errors_of(app, task_id)
    assert error.exception_type == "sqlalchemy.exc.IntegrityError"
    assert get_task(app, task_id).status is TaskStatus.FAILED


def test_result_that_is_not_json_is_not_stored(app: sessionmaker[Session]) -> None:
    scheduler = Scheduler(app)

    @scheduler.handler("obj")
    def obj(session: Session, task: Task) -> object:
        return object()

    (task_id,) = add_tasks(app, Task(kind="obj"))
    scheduler.run_until_idle()
    task = get_task(app, task_id)
    assert task.status is TaskStatus.SUCCEEDED
    assert task.result is None


# -- fencing ---------------------------------------------------------------------


def test_stale_worker_cannot_complete_and_its_writes_roll_back(
    app: sessionmaker[Session],
) -> None:
    scheduler = Scheduler(app)

    @scheduler.handler("ledger")
    def write(session: Session, task: Task) -> None:
        session.add(Ledger(task_id=task.id))

    @scheduler.handler("bad")
    def bad(session: Session, task: Task) -> None:
        raise RuntimeError("late failure")

    add_tasks(app, Task(kind="ledger"), Task(kind="bad"))
    claimed = claim_tasks(
        app, worker_id="old", kinds={"ledger": 5, "bad": 5}, queues=None, limit=10, lease_seconds=60
    )
    assert [t.attempts for t in claimed] == [1, 1]
    # Another worker took the tasks over (as after a lease expiry): attempt 2 is theirs.
    with app.begin() as session:
        session.execute(
            update(Task)
            .values(attempts=Task.attempts + 1, locked_by="new")
            .execution_options(synchronize_session=False)
        )
    runner = BatchRunner(app, app.kw["bind"], scheduler.handlers, "old")
    items = [(task, new_context(task, scheduler.handlers[task.kind])) for task in claimed]
    assert runner.run_all(items) == [Outcome.LOST, Outcome.LOST]
    assert ledger_ids(app) == []
    with app() as session:
        rows = session.execute(select(Task.status, Task.attempts, Task.locked_by)).all()
        assert session.scalar(select(func.count()).select_from(TaskError)) == 0
    assert rows == [(TaskStatus.RUNNING, 2, "new")] * 2


def test_finished_task_cannot_be_completed_again(app: sessionmaker[Session]) -> None:
    scheduler = Scheduler(app)

    @scheduler.handler("ledger")
    def write(session: Session, task: Task) -> None:
        session.add(Ledger(task_id=task.id, note="again"))

    add_tasks(app, Task(kind="ledger"))
    (task,) = claim_tasks(
        app, worker_id="w", kinds={"ledger": 5}, queues=None, limit=1, lease_seconds=60
    )
    with app.begin() as session:
        session.execute(update(Task).values(status="cancelled"))
    runner = BatchRunner(app, app.kw["bind"], scheduler.handlers, "w")
    assert runner.run_all([(task, new_context(task, scheduler.handlers["ledger"]))]) == [
        Outcome.LOST
    ]
    assert ledger_ids(app) == []


# -- claiming --------------------------------------------------------------------


def test_worker_claims_only_its_kinds_and_queues(app: sessionmaker[Session]) -> None:
    scheduler = Scheduler(app)
    ran: list[str] = []

    @scheduler.handler("a")
    def a(session: Session, task: Task) -> None:
        ran.append(task.queue)

    add_tasks(
        app,
        Task(kind="a", queue="emails"),
        Task(kind="a"),
        Task(kind="b"),
        Task(kind="b", queue="emails"),
    )
    assert scheduler.run_until_idle(queues=["emails"]) == 1
    assert scheduler.run_until_idle() == 1
    assert sorted(ran) == ["default", "emails"]
    with app() as session:
        b_tasks = session.execute(
            select(Task.status, Task.attempts, Task.locked_by).where(Task.kind == "b")
        ).all()
    assert b_tasks == [(TaskStatus.PENDING, 0, None)] * 2


def test_priority_then_run_at_order_and_future_tasks_wait(app: sessionmaker[Session]) -> None:
    scheduler = Scheduler(app)
    order: list[str] = []

    @scheduler.handler("k")
    def k(session: Session, task: Task) -> None:
        order.append(task.payload["name"])

    now = dt.datetime.now(dt.timezone.utc)
    add_tasks(
        app,
        Task(kind="k", payload={"name": "old-low"}, run_at=now - dt.timedelta(minutes=2)),
        Task(kind="k", payload={"name": "high"}, priority=10),
        Task(kind="k", payload={"name": "new-low"}, run_at=now - dt.timedelta(minutes=1)),
        Task(kind="k", payload={"name": "future"}, run_at=now + dt.timedelta(hours=1)),
    )
    assert scheduler.run_until_idle(batch_size=1) == 3
    assert order == ["high", "old-low", "new-low"]


def test_release_gives_back_unstarted_tasks_without_using_an_attempt(
    app: sessionmaker[Session],
) -> None:
    add_tasks(app, *(Task(kind="k") for _ in range(3)))
    claimed = claim_tasks(
        app, worker_id="w", kinds={"k": 5}, queues=None, limit=3, lease_seconds=60
    )
    with SessionConnection(app).connection() as (conn, _):
        assert settle.release(conn, [(t.id, t.attempts) for t in claimed]) == 3
    with app() as session:
        rows = session.execute(
            select(Task.status, Task.attempts, Task.locked_by, Task.started_at)
        ).all()
    assert rows == [(TaskStatus.PENDING, 0, None, None)] * 3


def test_stop_lets_the_running_handler_finish(app: sessionmaker[Session]) -> None:
    scheduler = Scheduler(app, concurrency=1)
    entered = threading.Event()

    @scheduler.handler("slow")
    def slow(session: Session, task: Task) -> None:
        entered.set()
        time.sleep(0.5)
        session.add(Ledger(task_id=task.id))

    (task_id,) = add_tasks(app, Task(kind="slow"))
    with running(scheduler) as stats:
        assert entered.wait(10)
    assert stats[0].succeeded == 1
    assert get_task(app, task_id).status is TaskStatus.SUCCEEDED
    assert ledger_ids(app) == [task_id]


def test_run_until_idle_max_tasks(app: sessionmaker[Session]) -> None:
    scheduler = Scheduler(app)

    @scheduler.handler("k")
    def k(session: Session, task: Task) -> None:
        pass

    add_tasks(app, *(Task(kind="k") for _ in range(5)))
    assert scheduler.run_until_idle(max_tasks=2) == 2
    assert scheduler.run_until_idle() == 3


# -- schema ----------------------------------------------------------------------


def test_unmigrated_database_is_refused_at_start(empty_database_url: str) -> None:
    from sqlalchemy import create_engine

    engine = create_engine(empty_database_url)
    try:
        scheduler = Scheduler(sessionmaker(engine))

        @scheduler.handler("k")
        def k(session: Session, task: Task) -> None:
            pass

        with pytest.raises(SchemaError, match="alembic upgrade heads"):
            scheduler.run()
        with pytest.raises(SchemaError, match="alembic upgrade heads"):
            scheduler.run_until_idle()
    finally:
        engine.dispose()


def test_stop_while_run_is_starting_is_not_lost(
    app: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    scheduler = Scheduler(app, poll_interval=30)
    scheduler.handler("k")(lambda session, task: None)
    checking, proceed = threading.Event(), threading.Event()
    real_check = scheduler.check_schema

    def slow_check() -> None:
        checking.set()
        proceed.wait(10)
        real_check()

    monkeypatch.setattr(scheduler, "check_schema", slow_check)
    thread = threading.Thread(target=scheduler.run)
    thread.start()
    assert checking.wait(10)
    scheduler.stop()  # no worker yet: remembered
    proceed.set()
    thread.join(10)
    assert not thread.is_alive()
    scheduler.stop()  # nothing runs: a no-op


def test_interrupted_run_until_idle_gives_back_the_rest_of_its_batch(
    app: sessionmaker[Session],
) -> None:
    scheduler = Scheduler(app)

    @scheduler.handler("k")
    def k(session: Session, task: Task) -> None:
        raise KeyboardInterrupt

    add_tasks(app, *(Task(kind="k") for _ in range(3)))
    with pytest.raises(KeyboardInterrupt):
        scheduler.run_until_idle(batch_size=3)
    with app() as session:
        rows = session.execute(select(Task.status, Task.attempts).order_by(Task.id)).all()
    # Nothing committed: the interrupted one and the others are given back, attempts refunded.
    assert rows == [(TaskStatus.PENDING, 0)] * 3
