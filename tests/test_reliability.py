"""Leases, heartbeats, rescue, worker registry, graceful shutdown, timeouts, cancellation."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from typing import Any

import psycopg
import pytest
from sqlalchemy import Engine, create_engine, func, make_url, select, text, update
from sqlalchemy.exc import ProgrammingError
from sqlalchemy.orm import Session, sessionmaker

from sqla_pgotask import (
    RegisteredWorker,
    Scheduler,
    Task,
    TaskCancelledError,
    TaskStatus,
    current_attempt,
)
from sqla_pgotask.engine.claims import PlainClaims
from sqla_pgotask.engine.rows import driver_connection
from sqla_pgotask.errors import WorkerStuckError
from sqla_pgotask.worker import threaded as worker_module
from sqla_pgotask.worker.maintenance import node_id
from sqla_pgotask.worker.threaded import WorkerStats
from tests.helpers import (
    AppBase,
    Ledger,
    add_tasks,
    claim_tasks,
    errors_of,
    get_task,
    ledger_ids,
    running,
    wait_until,
)

FAST = {
    "lease_seconds": 1.2,
    "heartbeat_interval": 0.2,
    "maintenance_interval": 0.3,
    "poll_interval": 0.2,
}


def ledger_scheduler(app: sessionmaker[Session], **settings: float) -> Scheduler:
    scheduler = Scheduler(app, **{**FAST, **settings})  # type: ignore[arg-type]

    @scheduler.handler("ledger", max_attempts=3)
    def write(session: Session, task: Task) -> None:
        session.add(Ledger(task_id=task.id))

    return scheduler


def status_of(app: sessionmaker[Session], task_id: int) -> TaskStatus:
    return get_task(app, task_id).status


def dead_pid() -> int:
    """The pid of a process that has exited."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def register_fake_worker(
    app: sessionmaker[Session], worker_id: str, *, pid: int, node: str, heartbeat_age: float = 0
) -> None:
    with app.begin() as session:
        session.execute(
            text(
                "INSERT INTO pgotask_worker (id, host, pid, node, kinds, concurrency, "
                "last_heartbeat_at) VALUES (:id, 'elsewhere', :pid, :node, '{ledger}', 1, "
                "now() - make_interval(secs => :age))"
            ),
            {"id": worker_id, "pid": pid, "node": node, "age": heartbeat_age},
        )


# -- heartbeats and rescue -------------------------------------------------------


def test_heartbeats_keep_a_long_task_leased(app: sessionmaker[Session]) -> None:
    scheduler = ledger_scheduler(app)

    @scheduler.handler("slow")
    def slow(session: Session, task: Task) -> None:
        time.sleep(3 * FAST["lease_seconds"])
        session.add(Ledger(task_id=task.id))

    (task_id,) = add_tasks(app, Task(kind="slow"))
    with running(scheduler, concurrency=2):
        wait_until(lambda: status_of(app, task_id) is TaskStatus.SUCCEEDED, timeout=20)
    assert get_task(app, task_id).attempts == 1
    assert errors_of(app, task_id) == []


def test_expired_lease_is_rescued_with_the_lost_attempt_recorded(
    app: sessionmaker[Session],
) -> None:
    (task_id,) = add_tasks(app, Task(kind="ledger"))
    # A worker claims it and vanishes without a trace (no registry row, no heartbeat).
    claim_tasks(
        app, worker_id="ghost", kinds={"ledger": 3}, queues=None, limit=1, lease_seconds=0.5
    )
    scheduler = ledger_scheduler(app)
    started = time.monotonic()
    with running(scheduler):
        wait_until(lambda: status_of(app, task_id) is TaskStatus.SUCCEEDED, timeout=20)
    assert time.monotonic() - started < 5
    task = get_task(app, task_id)
    assert task.attempts == 2
    (error,) = errors_of(app, task_id)
    assert error.attempt == 1
    assert error.exception_type == "sqla_pgotask.WorkerLost"
    assert "worker ghost was lost during attempt 1: its lease expired" in error.message
    assert ledger_ids(app) == [task_id]


def test_tasks_of_a_dead_process_on_this_machine_are_rescued_before_their_lease_ends(
    app: sessionmaker[Session],
) -> None:
    (task_id,) = add_tasks(app, Task(kind="ledger"))
    register_fake_worker(app, "crashed", pid=dead_pid(), node=node_id())
    claim_tasks(
        app, worker_id="crashed", kinds={"ledger": 3}, queues=None, limit=1, lease_seconds=3600
    )
    scheduler = ledger_scheduler(app)
    with running(scheduler):
        wait_until(lambda: status_of(app, task_id) is TaskStatus.SUCCEEDED, timeout=10)
    (error,) = errors_of(app, task_id)
    assert "worker crashed was lost during attempt 1: its worker is gone" in error.message
    with app() as session:
        assert session.get(RegisteredWorker, "crashed") is None


def test_silent_worker_elsewhere_is_pruned_and_its_tasks_rescued(
    app: sessionmaker[Session],
) -> None:
    (task_id,) = add_tasks(app, Task(kind="ledger"))
    # Another machine: its pid means nothing here, only its silence counts.
    register_fake_worker(app, "far", pid=1, node="another-node", heartbeat_age=60)
    register_fake_worker(app, "alive", pid=1, node="another-node")
    claim_tasks(app, worker_id="far", kinds={"ledger": 3}, queues=None, limit=1, lease_seconds=3600)
    scheduler = ledger_scheduler(app)
    with running(scheduler):
        wait_until(lambda: status_of(app, task_id) is TaskStatus.SUCCEEDED, timeout=10)
    with app() as session:
        remaining = set(session.scalars(select(RegisteredWorker.id)))
    assert "far" not in remaining and "alive" in remaining


def test_task_lost_on_its_last_attempt_ends_failed(app: sessionmaker[Session]) -> None:
    (task_id,) = add_tasks(app, Task(kind="ledger", max_attempts=2))
    for ghost in ("ghost-1", "ghost-2"):
        claim_tasks(
            app, worker_id=ghost, kinds={"ledger": 3}, queues=None, limit=1, lease_seconds=0.2
        )
        time.sleep(0.3)
        scheduler = ledger_scheduler(app)
        worker_run = threading.Thread(target=scheduler.run, kwargs={"queues": ["none"]})
        worker_run.start()  # serves no queue: it only rescues
        wait_until(lambda: get_task(app, task_id).locked_by is None, timeout=10)
        scheduler.stop()
        worker_run.join()
    task = get_task(app, task_id)
    assert task.status is TaskStatus.FAILED and task.attempts == 2
    assert [e.attempt for e in errors_of(app, task_id)] == [1, 2]
    assert "task is now failed" in errors_of(app, task_id)[1].message


def test_worker_registers_itself_while_running(app: sessionmaker[Session]) -> None:
    scheduler = ledger_scheduler(app)
    with running(scheduler, concurrency=3, queues=["a", "b"]):
        worker = scheduler.running_worker
        assert worker is not None
        with app() as session:
            row = session.get(RegisteredWorker, worker.worker_id)
            assert row is not None
            assert (row.kinds, row.queues, row.concurrency) == (["ledger"], ["a", "b"], 3)
            first_beat = row.last_heartbeat_at
        time.sleep(0.5)
        with app() as session:
            row = session.get(RegisteredWorker, worker.worker_id)
            assert row is not None and row.last_heartbeat_at > first_beat
    with app() as session:
        assert session.scalar(select(func.count()).select_from(RegisteredWorker)) == 0


def test_attempt_taken_over_is_seen_as_lost_by_the_running_handler(
    app: sessionmaker[Session],
) -> None:
    scheduler = ledger_scheduler(app)
    seen: list[bool] = []
    entered = threading.Event()

    @scheduler.handler("watch")
    def watch(session: Session, task: Task) -> None:
        entered.set()
        attempt = current_attempt()
        wait_until(lambda: attempt.lost, timeout=10)
        seen.append(attempt.lost)
        session.add(Ledger(task_id=task.id))
        attempt.check()  # raises ClaimLostError

    (task_id,) = add_tasks(app, Task(kind="watch"))
    with running(scheduler) as stats:
        assert entered.wait(10)
        with app.begin() as session:  # someone else's attempt now
            session.execute(update(Task).values(attempts=Task.attempts + 1))
        wait_until(lambda: bool(seen), timeout=10)
        wait_until(lambda: scheduler.running_worker is not None and not _busy(scheduler))
    assert stats[0].lost == 1
    assert ledger_ids(app) == []
    assert errors_of(app, task_id) == []


def _busy(scheduler: Scheduler) -> bool:
    worker = scheduler.running_worker
    return worker is not None and bool(worker._attempts())


# -- graceful shutdown -----------------------------------------------------------


def test_shutdown_grace_then_running_tasks_are_given_back_at_once(
    app: sessionmaker[Session],
) -> None:
    scheduler = ledger_scheduler(app, shutdown_grace=0.5, lease_seconds=60, heartbeat_interval=1)
    entered = threading.Event()
    release = threading.Event()

    @scheduler.handler("stuck")
    def stuck(session: Session, task: Task) -> None:
        session.add(Ledger(task_id=task.id))
        session.flush()
        entered.set()
        release.wait(20)

    (task_id,) = add_tasks(app, Task(kind="stuck"))
    with running(scheduler) as stats:
        assert entered.wait(10)
        stopped_at = time.monotonic()
    assert time.monotonic() - stopped_at < 5  # not the 60 s lease
    assert stats[0].interrupted == 1
    task = get_task(app, task_id)
    assert task.status is TaskStatus.PENDING and task.locked_by is None
    (error,) = errors_of(app, task_id)
    assert error.exception_type == "sqla_pgotask.WorkerShutdown"
    release.set()  # the handler ends: its completion no longer matches, its write is undone
    wait_until(lambda: not any(t.name == "pgotask-handler-0" for t in threading.enumerate()))
    assert ledger_ids(app) == []
    assert get_task(app, task_id).status is TaskStatus.PENDING


# -- timeouts --------------------------------------------------------------------


def test_sql_past_the_timeout_is_cut_off_by_the_server(app: sessionmaker[Session]) -> None:
    scheduler = Scheduler(app)

    @scheduler.handler("sleepy_sql", timeout=0.5, max_attempts=1)
    def sleepy_sql(session: Session, task: Task) -> None:
        session.execute(text("SELECT pg_sleep(5)"))

    (task_id,) = add_tasks(app, Task(kind="sleepy_sql"))
    started = time.monotonic()
    scheduler.run_until_idle()
    assert time.monotonic() - started < 3
    (error,) = errors_of(app, task_id)
    assert error.exception_type == "sqla_pgotask.errors.TaskTimeoutError"
    assert error.message == f"task {task_id} (sleepy_sql) timed out after 0.5 s"
    assert error.traceback is not None and "statement timeout" in error.traceback
    assert status_of(app, task_id) is TaskStatus.FAILED


def test_python_overrun_fails_the_attempt_and_is_retried(app: sessionmaker[Session]) -> None:
    scheduler = Scheduler(app)

    @scheduler.handler("slow_py", timeout=0.2, retry=0)
    def slow_py(session: Session, task: Task) -> None:
        session.add(Ledger(task_id=task.id))
        if task.attempts == 1:
            time.sleep(0.4)  # overruns: its write must not commit

    (task_id,) = add_tasks(app, Task(kind="slow_py"))
    assert scheduler.run_until_idle() == 2
    task = get_task(app, task_id)
    assert task.status is TaskStatus.SUCCEEDED and task.attempts == 2
    (error,) = errors_of(app, task_id)
    assert error.exception_type == "sqla_pgotask.errors.TaskTimeoutError"
    assert ledger_ids(app) == [task_id]


def test_cooperative_check_stops_a_loop_at_the_timeout(app: sessionmaker[Session]) -> None:
    scheduler = Scheduler(app)
    steps: list[int] = []

    @scheduler.handler("loop", timeout=0.3, max_attempts=1)
    def loop(session: Session, task: Task) -> None:
        attempt = current_attempt()
        assert attempt.time_left() is not None
        while True:
            attempt.check()
            steps.append(1)
            time.sleep(0.02)

    (task_id,) = add_tasks(app, Task(kind="loop"))
    scheduler.run_until_idle()
    assert 5 < len(steps) < 40
    assert errors_of(app, task_id)[0].exception_type == "sqla_pgotask.errors.TaskTimeoutError"


def test_current_attempt_outside_a_handler() -> None:
    with pytest.raises(LookupError, match="only available inside a task handler"):
        current_attempt()


# -- cancellation ----------------------------------------------------------------


def test_cancel_a_pending_task(app: sessionmaker[Session]) -> None:
    scheduler = ledger_scheduler(app)
    a, b = add_tasks(app, Task(kind="ledger"), Task(kind="ledger"))
    with app.begin() as session:
        assert scheduler.cancel(session, a) is TaskStatus.CANCELLED
    with app.begin() as session:  # by plain SQL
        session.execute(
            text("UPDATE pgotask_task SET cancel_requested_at = now() WHERE id = :id"), {"id": b}
        )
    assert scheduler.run_until_idle() == 0
    for task_id in (a, b):
        task = get_task(app, task_id)
        assert task.status is TaskStatus.CANCELLED and task.finished_at is not None
        assert task.attempts == 0
    with app.begin() as session:  # already finished: nothing to cancel
        assert scheduler.cancel(session, a) is None
        assert scheduler.cancel(session, 999_999) is None


def test_cancel_rolls_back_with_the_transaction(app: sessionmaker[Session]) -> None:
    scheduler = ledger_scheduler(app)
    (task_id,) = add_tasks(app, Task(kind="ledger"))
    with app() as session:
        scheduler.cancel(session, task_id)
        session.rollback()
    assert scheduler.run_until_idle() == 1
    assert status_of(app, task_id) is TaskStatus.SUCCEEDED


@pytest.mark.parametrize("how", ["python", "sql"])
def test_cancel_a_running_task_across_connections(app: sessionmaker[Session], how: str) -> None:
    scheduler = ledger_scheduler(app, heartbeat_interval=5, lease_seconds=60)
    entered = threading.Event()
    noticed: list[float] = []

    @scheduler.handler("long")
    def long(session: Session, task: Task) -> None:
        session.add(Ledger(task_id=task.id))
        session.flush()
        entered.set()
        attempt = current_attempt()
        while True:
            if attempt.cancel_requested:
                noticed.append(time.monotonic())
            attempt.check()
            time.sleep(0.01)

    (task_id,) = add_tasks(app, Task(kind="long"))
    with running(scheduler) as stats:
        assert entered.wait(10)
        requested = time.monotonic()
        with app.begin() as session:
            if how == "python":
                assert scheduler.cancel(session, task_id) is TaskStatus.RUNNING
            else:
                session.execute(text("SELECT pgotask_cancel(:id)"), {"id": task_id})
        wait_until(lambda: status_of(app, task_id) is TaskStatus.CANCELLED, timeout=10)
    # NOTIFY, not the 5 s heartbeat, told the worker (typically within a few
    # ms; the bound allows for a stall of the shared machine).
    assert noticed and noticed[0] - requested < 2.5
    assert stats[0].cancelled == 1
    assert ledger_ids(app) == []
    assert errors_of(app, task_id) == []


def test_a_cancel_notification_from_a_role_without_rights_cancels_nothing(
    app: sessionmaker[Session], engine: Engine, database_url: str
) -> None:
    # Any role that can connect may NOTIFY any channel: the worker acts on
    # the row (cancel_requested_at), which takes the right to update it.
    scheduler = ledger_scheduler(app, heartbeat_interval=5, lease_seconds=60)
    entered, release = threading.Event(), threading.Event()

    @scheduler.handler("long")
    def long(session: Session, task: Task) -> None:
        session.add(Ledger(task_id=task.id))
        entered.set()
        while not release.is_set():
            current_attempt().check()
            time.sleep(0.01)

    role = f"pgotask_nobody_{os.getpid()}"
    with engine.connect() as conn:
        conn.execute(text(f'DROP ROLE IF EXISTS "{role}"'))
        conn.execute(text(f'CREATE ROLE "{role}" LOGIN'))
        conn.commit()
    nobody = create_engine(make_url(database_url).set(username=role))
    try:
        (task_id,) = add_tasks(app, Task(kind="long"))
        with running(scheduler) as stats:
            assert entered.wait(10)
            with nobody.connect() as conn:
                with pytest.raises(ProgrammingError, match="permission denied"):
                    conn.execute(text("SELECT pgotask_cancel(:id)"), {"id": task_id})
                conn.rollback()
                conn.execute(text(f"NOTIFY pgotask_cancel, '{task_id}'"))
                conn.commit()
            worker = scheduler.running_worker
            assert worker is not None
            time.sleep(1.0)  # the listener confirms in milliseconds
            assert worker._in_flight[task_id].cancel_requested is False
            release.set()
            wait_until(lambda: status_of(app, task_id) is TaskStatus.SUCCEEDED, timeout=10)
        assert stats[0].cancelled == 0 and stats[0].succeeded == 1
        assert ledger_ids(app) == [task_id]
    finally:
        release.set()
        nobody.dispose()
        with engine.connect() as conn:
            conn.execute(text(f'DROP ROLE IF EXISTS "{role}"'))
            conn.commit()


def test_handler_can_cancel_its_own_task(app: sessionmaker[Session]) -> None:
    scheduler = Scheduler(app)

    @scheduler.handler("self_cancel")
    def self_cancel(session: Session, task: Task) -> None:
        session.add(Ledger(task_id=task.id))
        raise TaskCancelledError("not needed any more")

    (task_id,) = add_tasks(app, Task(kind="self_cancel"))
    scheduler.run_until_idle()
    task = get_task(app, task_id)
    assert task.status is TaskStatus.CANCELLED and task.cancel_requested_at is not None
    assert ledger_ids(app) == []


def test_cancel_requested_after_the_last_check_still_wins(app: sessionmaker[Session]) -> None:
    scheduler = Scheduler(app)

    @scheduler.handler("racy")
    def racy(session: Session, task: Task) -> None:
        session.add(Ledger(task_id=task.id))
        # Cancellation committed by someone else just before the completion.
        with app.begin() as other:
            other.execute(text("SELECT pgotask_cancel(:id)"), {"id": task.id})

    (task_id,) = add_tasks(app, Task(kind="racy"))
    scheduler.run_until_idle()
    assert status_of(app, task_id) is TaskStatus.CANCELLED
    assert ledger_ids(app) == []


# -- outages ---------------------------------------------------------------------


def test_application_exhausting_the_pool_does_not_deadlock_the_worker(
    database_url: str, engine: Engine
) -> None:
    from sqlalchemy import create_engine

    AppBase.metadata.create_all(engine)
    small = create_engine(database_url, pool_size=2, max_overflow=0, pool_timeout=0.5)
    try:
        app = sessionmaker(small)
        scheduler = ledger_scheduler(app, lease_seconds=1.2)

        @scheduler.handler("slow")
        def slow(session: Session, task: Task) -> None:
            time.sleep(2.5)  # longer than the lease: only heartbeats keep it
            session.add(Ledger(task_id=task.id))

        other = sessionmaker(engine)  # enqueue through another pool
        with running(scheduler, concurrency=1):
            (slow_id,) = add_tasks(other, Task(kind="slow"))
            wait_until(lambda: get_task(other, slow_id).status is TaskStatus.RUNNING)
            # The application takes the one remaining connection and holds it.
            held = small.connect()
            held.execute(text("SELECT 1"))
            (quick_id,) = add_tasks(other, Task(kind="ledger"))
            time.sleep(3)
            assert get_task(other, slow_id).status is TaskStatus.SUCCEEDED
            assert get_task(other, slow_id).attempts == 1  # never rescued
            held.close()
            wait_until(lambda: get_task(other, quick_id).status is TaskStatus.SUCCEEDED)
        assert errors_of(other, slow_id) == []
    finally:
        small.dispose()


def test_a_row_locked_by_the_application_does_not_hold_up_other_heartbeats(
    app: sessionmaker[Session],
) -> None:
    scheduler = ledger_scheduler(app)

    @scheduler.handler("slow")
    def slow(session: Session, task: Task) -> None:
        time.sleep(3.0)
        session.add(Ledger(task_id=task.id))

    a, b = add_tasks(app, Task(kind="slow"), Task(kind="slow"))
    with running(scheduler, concurrency=2):
        wait_until(lambda: all(status_of(app, t) is TaskStatus.RUNNING for t in (a, b)))
        with app.begin() as session:  # e.g. an uncommitted cancel, held for a while
            session.execute(select(Task).where(Task.id == b).with_for_update())
            time.sleep(2 * FAST["lease_seconds"])
        wait_until(lambda: status_of(app, a) is TaskStatus.SUCCEEDED, timeout=10)
    assert get_task(app, a).attempts == 1  # its lease never lapsed
    assert errors_of(app, a) == []


# -- claims whose reply was lost -------------------------------------------------


def test_a_claim_whose_reply_was_lost_gives_its_tasks_back_at_once(
    app: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The claim commits, then the connection dies before its reply is read
    # (as in an immediate restart): the rows are 'running' under this
    # worker's id.  They must run within moments, not after the 60 s lease.
    real = PlainClaims.claim_on
    lost: list[int] = []

    def reply_lost(self: PlainClaims, connection: Any, limit: int) -> Any:
        claimed = real(self, connection, limit)
        if not lost and claimed:
            lost.extend(task.id for task in claimed)
            driver_connection(connection).close()
            raise psycopg.OperationalError("server closed the connection unexpectedly")
        return claimed

    monkeypatch.setattr(PlainClaims, "claim_on", reply_lost)
    scheduler = ledger_scheduler(app, lease_seconds=60, maintenance_interval=60)
    ids = add_tasks(app, *(Task(kind="ledger") for _ in range(5)))
    started = time.monotonic()
    with running(scheduler) as stats:
        wait_until(lambda: sorted(ledger_ids(app)) == sorted(ids), timeout=20)
    assert lost, "the claim never took the tasks"
    assert time.monotonic() - started < 20
    for task_id in ids:
        task = get_task(app, task_id)
        assert (task.status, task.attempts) == (TaskStatus.SUCCEEDED, 1)  # attempt refunded
        assert errors_of(app, task_id) == []
    assert stats[0].succeeded == 5


# -- handlers stuck past their timeout ------------------------------------------


def test_stuck_handler_threads_are_not_claimed_for_and_all_stuck_stops_the_worker(
    app: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(worker_module, "STUCK_MARGIN", 0.3)
    scheduler = ledger_scheduler(app, concurrency=2, heartbeat_interval=0.1)
    release = threading.Event()

    @scheduler.handler("stuck", timeout=0.2)
    def stuck(session: Session, task: Task) -> None:
        release.wait(60)  # never calls current_attempt().check(): Python cannot stop it

    def registry() -> list[tuple[int, object]]:
        with app() as session:
            rows = session.execute(
                select(RegisteredWorker.stuck_slots, RegisteredWorker.all_stuck_since)
            ).all()
            return [tuple(row) for row in rows]  # type: ignore[misc]

    outcome: list[BaseException | WorkerStats] = []

    def run() -> None:
        try:
            outcome.append(scheduler.run())
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run)
    try:
        (first,) = add_tasks(app, Task(kind="stuck"))
        thread.start()
        wait_until(lambda: registry() == [(1, None)], timeout=10)
        # One slot left: other tasks still run.
        quick = add_tasks(app, *(Task(kind="ledger") for _ in range(3)))
        wait_until(lambda: sorted(ledger_ids(app)) == sorted(quick), timeout=10)
        add_tasks(app, Task(kind="stuck"))
        wait_until(lambda: bool(outcome), timeout=20)
        [error] = outcome
        assert isinstance(error, WorkerStuckError), error
        assert "every handler thread (2) is stuck" in str(error)
        assert registry() == []  # unregistered
        # The stuck attempts' leases were not extended: another worker rescues them.
        with app() as session:
            expired = session.scalar(
                select(func.coalesce(Task.lease_expires_at < func.now(), True)).where(
                    Task.id == first
                )
            )
            assert expired
    finally:
        release.set()
        thread.join(30)
        # The abandoned handler threads end now: let them give their
        # connections back before the engine is disposed.
        for stuck_thread in threading.enumerate():
            if stuck_thread.name.startswith("pgotask-handler-"):
                stuck_thread.join(30)


def test_a_worker_whose_threads_cannot_start_leaves_no_registry_row(
    app: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    scheduler = ledger_scheduler(app, concurrency=3)
    real_start = threading.Thread.start

    def start(self: threading.Thread) -> None:
        if self.name == "pgotask-handler-2":
            raise RuntimeError("can't start new thread")
        real_start(self)

    monkeypatch.setattr(threading.Thread, "start", start)
    with pytest.raises(RuntimeError, match="can't start new thread"):
        scheduler.run()
    with app() as session:
        assert session.scalars(select(RegisteredWorker.id)).all() == []
    assert not [t for t in threading.enumerate() if t.name.startswith("pgotask-")]
