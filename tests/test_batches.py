"""Batches: several tasks in one transaction, each handler isolated by a free savepoint."""

from __future__ import annotations

import re
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy import Engine, event, func, select, text, update
from sqlalchemy.orm import Session, sessionmaker

from sqla_pgotask import Scheduler, Task, TaskError, TaskStatus
from sqla_pgotask.context import Outcome
from sqla_pgotask.engine import savepoints as _savepoints
from sqla_pgotask.engine.run import BatchRunner, new_context
from tests.helpers import Ledger, add_tasks, claim_tasks, ledger_ids, running, wait_until

XID = text("SELECT CAST(pg_current_xact_id() AS text)")


def write_ledger(session: Session, task: Task) -> None:
    """Write the task's ledger row, noting the transaction it ran in."""
    session.add(Ledger(task_id=task.id, note=session.execute(XID).scalar_one()))


def notes(session_factory: sessionmaker[Session]) -> dict[int, str]:
    with session_factory() as session:
        return {
            task_id: note for task_id, note in session.execute(select(Ledger.task_id, Ledger.note))
        }


def statuses(session_factory: sessionmaker[Session]) -> list[tuple[TaskStatus, int]]:
    with session_factory() as session:
        rows = session.execute(select(Task.status, Task.attempts).order_by(Task.id))
        return [(status, attempts) for status, attempts in rows]


def test_a_failing_handler_leaves_none_of_its_writes_and_the_others_keep_theirs(
    app: sessionmaker[Session],
) -> None:
    scheduler = Scheduler(app, batch_window=60)
    ids = add_tasks(app, *(Task(kind="k", payload={"n": n}) for n in range(10)))
    with app.begin() as session:  # task 7's insert will hit the primary key
        session.add(Ledger(task_id=ids[7], note="already there"))

    @scheduler.handler("k", max_attempts=3, retry=3600)  # no retry within the test
    def k(session: Session, task: Task) -> None:
        write_ledger(session, task)
        session.flush()
        if task.payload["n"] in (0, 4):  # the first of the batch, and one in the middle
            raise RuntimeError("boom")

    assert scheduler.run_until_idle(batch_size=10) == 10
    written = notes(app)
    succeeded = [i for n, i in enumerate(ids) if n not in (0, 4, 7)]
    assert sorted(written) == sorted([*succeeded, ids[7]])
    assert written[ids[7]] == "already there"
    # After the first task's failure a new transaction began; all the others shared it.
    assert len({written[i] for i in succeeded}) == 1
    rows = statuses(app)
    for n, (status, attempts) in enumerate(rows):
        assert attempts == 1
        assert status is (TaskStatus.PENDING if n in (0, 4, 7) else TaskStatus.SUCCEEDED)
    with app() as session:
        failed = session.execute(
            select(TaskError.task_id, TaskError.exception_type).order_by(TaskError.task_id)
        ).all()
    assert [task_id for task_id, _ in failed] == [ids[0], ids[4], ids[7]]
    assert failed[2][1] == "sqlalchemy.exc.IntegrityError"


def test_tasks_of_a_batch_commit_together_with_one_completion(app: sessionmaker[Session]) -> None:
    scheduler = Scheduler(app, batch_window=60)
    scheduler.handler("k")(write_ledger)
    ids = add_tasks(app, *(Task(kind="k") for _ in range(20)))
    assert scheduler.run_until_idle(batch_size=20) == 20
    written = notes(app)
    assert sorted(written) == ids
    assert len(set(written.values())) == 1


@pytest.fixture
def traced(engine: Engine) -> Iterator[Callable[[], list[str]]]:
    """A libpq protocol trace of every connection the engine opens from now on.

    Calling the fixture's value ends the traces and returns them, one per connection.
    """
    with tempfile.TemporaryDirectory() as tmp:
        paths: list[Path] = []
        traced: list[tuple[psycopg.Connection[Any], Any]] = []

        def trace(dbapi_connection: psycopg.Connection[Any], record: object) -> None:
            paths.append(Path(tmp) / f"trace{len(paths)}")
            f = paths[-1].open("w")
            traced.append((dbapi_connection, f))
            dbapi_connection.pgconn.trace(f.fileno())
            dbapi_connection.pgconn.set_trace_flags(psycopg.pq.Trace.SUPPRESS_TIMESTAMPS)

        def end() -> list[str]:
            for dbapi_connection, f in traced:
                if not dbapi_connection.closed:
                    dbapi_connection.pgconn.untrace()  # flushes libpq's buffer
                f.close()
            traced.clear()
            return [path.read_text() for path in paths]

        engine.dispose()
        event.listen(engine, "connect", trace)
        try:
            yield end
        finally:
            event.remove(engine, "connect", trace)
            end()
            engine.dispose()


@pytest.mark.parametrize("send", ["separate", "pipelined"])
def test_task_savepoints_are_taken_only_for_sql_and_never_released(
    app: sessionmaker[Session],
    engine: Engine,
    traced: Callable[[], list[str]],
    monkeypatch: pytest.MonkeyPatch,
    send: str,
) -> None:
    monkeypatch.setattr(_savepoints.LazySavepoints, "send", send)
    scheduler = Scheduler(app, batch_window=60)

    @scheduler.handler("sql")
    def sql(session: Session, task: Task) -> None:
        session.execute(text("SELECT 1")).scalar_one()

    @scheduler.handler("nosql")
    def nosql(session: Session, task: Task) -> None:
        pass

    @scheduler.handler("nested")
    def nested(session: Session, task: Task) -> None:
        with session.begin_nested():  # the handler's own savepoint: released as usual
            session.execute(text("SELECT 2")).scalar_one()

    kinds = ["sql", "nosql", "sql", "nosql", "sql", "nested", "sql"]
    add_tasks(app, *(Task(kind=kind) for kind in kinds))
    claimed = claim_tasks(
        app,
        worker_id="w",
        kinds={kind: 5 for kind in kinds},
        queues=None,
        limit=len(kinds),
        lease_seconds=60,
    )
    runner = BatchRunner(app, engine, scheduler.handlers, "w")
    items = [(t, new_context(t, scheduler.handlers[t.kind])) for t in claimed]
    assert runner.run_all(items) == [Outcome.SUCCEEDED] * len(kinds)
    (trace,) = [t for t in traced() if '"SAVEPOINT ' in t]  # the batch's connection
    # From the batch's BEGIN on (task savepoint names are unique: never prepared).
    batch = trace[trace.rindex('\tQuery\t "BEGIN', 0, trace.index('"SAVEPOINT ')) :]
    sent = re.findall(r'^F\t\d+\t(?:Parse\t "[^"]*"|Query\t) "([^"]*)"', batch, re.MULTILINE)
    savepoints = [s for s in sent if s.startswith("SAVEPOINT")]
    releases = [s for s in sent if s.startswith("RELEASE")]
    # The first task needs none; tasks without SQL take none; the other three one
    # each; the nested handler one of ours and its own; only its own is released.
    assert len(savepoints) == 5, sent
    assert len(releases) == 1, sent
    # Round trips (a Sync, or a simple Query): BEGIN; one per handler statement;
    # the task savepoints, unless they ride along with the next statement; the
    # nested handler's own SAVEPOINT and RELEASE; the completion; COMMIT.
    round_trips = batch.count("\tSync") + batch.count("\tQuery\t")
    statements = kinds.count("sql") + kinds.count("nested")
    task_savepoints = 0 if send == "pipelined" else 4
    assert round_trips == 1 + statements + task_savepoints + 2 + 1 + 1, batch


def test_savepoints_per_transaction_are_bounded(app: sessionmaker[Session]) -> None:
    scheduler = Scheduler(app, batch_window=60)
    scheduler.handler("k")(write_ledger)
    add_tasks(app, *(Task(kind="k") for _ in range(60)))
    assert scheduler.run_until_idle(batch_size=100) == 60
    per_transaction: dict[str, int] = {}
    for xid in notes(app).values():
        per_transaction[xid] = per_transaction.get(xid, 0) + 1
    # The first task of a transaction needs no savepoint; 48 more may take one.
    assert sorted(per_transaction.values()) == [11, 49]


def test_timeouts_and_unbatched_handlers_run_alone(app: sessionmaker[Session]) -> None:
    scheduler = Scheduler(app, batch_window=60)
    scheduler.handler("n")(write_ledger)
    scheduler.handler("alone", batch=False)(write_ledger)
    scheduler.handler("timed", timeout=30)(write_ledger)
    kinds = ["n", "n", "alone", "n", "timed", "n"]
    ids = add_tasks(app, *(Task(kind=kind) for kind in kinds))
    assert scheduler.run_until_idle(batch_size=10) == len(kinds)
    xid = notes(app)
    assert xid[ids[0]] == xid[ids[1]]
    others = [xid[i] for i in ids[1:]]
    assert len(set(others)) == 5  # n+n | alone | n | timed | n


def test_a_claim_lost_at_the_last_moment_rolls_the_batch_back(
    app: sessionmaker[Session], engine: Engine
) -> None:
    scheduler = Scheduler(app)
    taken = threading.Event()

    @scheduler.handler("k")
    def k(session: Session, task: Task) -> None:
        write_ledger(session, task)
        if not taken.is_set():  # another worker takes the first task over meanwhile
            taken.set()
            with engine.begin() as conn:
                conn.execute(
                    update(Task)
                    .where(Task.id == first_id)
                    .values(attempts=Task.attempts + 1, locked_by="other")
                )

    ids = add_tasks(app, *(Task(kind="k") for _ in range(3)))
    first_id = ids[0]
    claimed = claim_tasks(
        app, worker_id="w", kinds={"k": 5}, queues=None, limit=3, lease_seconds=60
    )
    items = [(t, new_context(t, scheduler.handlers["k"])) for t in claimed]
    runner = BatchRunner(app, engine, scheduler.handlers, "w")
    assert runner.run_all(items) == [Outcome.LOST, Outcome.RELEASED, Outcome.RELEASED]
    assert ledger_ids(app) == []
    assert statuses(app) == [
        (TaskStatus.RUNNING, 2),
        (TaskStatus.PENDING, 0),
        (TaskStatus.PENDING, 0),
    ]
    with app() as session:
        assert session.scalar(select(func.count()).select_from(TaskError)) == 0


def test_stop_gives_back_the_unstarted_rest_of_a_batch(app: sessionmaker[Session]) -> None:
    scheduler = Scheduler(app, concurrency=1, batch_window=60, poll_interval=0.1)
    started = threading.Event()
    calls: list[int] = []

    @scheduler.handler("k")
    def k(session: Session, task: Task) -> None:
        calls.append(task.id)
        if len(calls) == 2:  # the first ran alone; the rest were claimed together
            started.set()
        time.sleep(0.3)
        write_ledger(session, task)

    ids = add_tasks(app, *(Task(kind="k") for _ in range(10)))
    with running(scheduler) as stats:
        wait_until(started.is_set)
        scheduler.stop()
    assert ledger_ids(app) == ids[: len(ledger_ids(app))]
    done = len(ledger_ids(app))
    assert done == len(calls) == 2
    rows = statuses(app)
    assert rows[:done] == [(TaskStatus.SUCCEEDED, 1)] * done
    assert rows[done:] == [(TaskStatus.PENDING, 0)] * (10 - done)
    assert stats[0].succeeded == done


def test_a_worker_drains_many_tasks_in_batches_exactly_once(app: sessionmaker[Session]) -> None:
    scheduler = Scheduler(app, concurrency=3, poll_interval=0.1)
    scheduler.handler("k")(write_ledger)
    ids = add_tasks(app, *(Task(kind="k") for _ in range(600)))
    with running(scheduler) as stats:
        wait_until(lambda: len(ledger_ids(app)) == 600, timeout=60)
    assert ledger_ids(app) == ids
    assert stats[0].succeeded == 600
    # Batched: far fewer transactions than tasks.
    assert len(set(notes(app).values())) < 300
