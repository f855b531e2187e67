"""Queues paused and resumed fleet-wide, from Python, plain SQL and the CLI."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import Engine, select, text
from sqlalchemy.orm import Session, sessionmaker

from sqla_pgotask import (
    ConfigurationError,
    Scheduler,
    Task,
    TaskStatus,
    pause_queue,
    paused_queues,
    resume_queue,
)
from tests.helpers import add_tasks, get_task, running, wait_until
from tests.helpers.apps.ledger import create_ledger
from tests.helpers.processes import pgotask_worker, run_pgotask


def _scheduler(session_factory: sessionmaker[Session], **kwargs: float) -> Scheduler:
    scheduler = Scheduler(session_factory, **kwargs)  # type: ignore[arg-type]

    @scheduler.handler("job")
    def job(session: Session, task: Task) -> None:
        pass

    return scheduler


def _statuses(session_factory: sessionmaker[Session]) -> dict[str, list[str]]:
    with session_factory() as session:
        rows = session.execute(select(Task.queue, Task.status).order_by(Task.id)).all()
    found: dict[str, list[str]] = {}
    for queue, status in rows:
        found.setdefault(queue, []).append(status.value)
    return found


def test_a_paused_queue_is_skipped_until_resumed(session_factory: sessionmaker[Session]) -> None:
    add_tasks(session_factory, Task(kind="job", queue="emails"), Task(kind="job", queue="default"))
    with session_factory.begin() as session:
        paused_at = pause_queue(session, "emails")
    with session_factory.begin() as session:
        assert pause_queue(session, "emails") == paused_at  # pausing again keeps the time
        assert paused_queues(session) == {"emails": paused_at}

    # A worker that starts later (another process, another host) skips it too.
    scheduler = _scheduler(session_factory)
    assert scheduler.run_until_idle() == 1
    assert _statuses(session_factory) == {"emails": ["pending"], "default": ["succeeded"]}
    # Tasks can still be added to it.
    add_tasks(session_factory, Task(kind="job", queue="emails"))

    with session_factory.begin() as session:
        assert resume_queue(session, "emails") is True
        assert resume_queue(session, "emails") is False
        assert paused_queues(session) == {}
    assert scheduler.run_until_idle() == 2
    assert _statuses(session_factory)["emails"] == ["succeeded", "succeeded"]


def test_a_pause_rolled_back_never_happened(session_factory: sessionmaker[Session]) -> None:
    with session_factory() as session:
        pause_queue(session, "emails")
        session.rollback()
        assert paused_queues(session) == {}


def test_running_workers_stop_claiming_at_commit_and_wake_on_resume(
    session_factory: sessionmaker[Session],
) -> None:
    # A long poll: only the resume notification can wake the worker promptly.
    scheduler = _scheduler(session_factory, poll_interval=30.0)
    with running(scheduler):
        with session_factory.begin() as session:
            pause_queue(session, "default")
        (first,) = add_tasks(session_factory, Task(kind="job"))
        time.sleep(1.0)
        assert get_task(session_factory, first).status is TaskStatus.PENDING
        resumed = time.monotonic()
        with session_factory.begin() as session:
            resume_queue(session, "default")
        wait_until(lambda: get_task(session_factory, first).status is TaskStatus.SUCCEEDED, 5.0)
        assert time.monotonic() - resumed < 5.0


def test_running_tasks_finish_when_their_queue_is_paused(
    session_factory: sessionmaker[Session],
) -> None:
    started = threading.Event()
    release = threading.Event()
    scheduler = Scheduler(session_factory, poll_interval=0.2)

    @scheduler.handler("slow")
    def slow(session: Session, task: Task) -> None:
        started.set()
        assert release.wait(10)

    with running(scheduler):
        (task_id,) = add_tasks(session_factory, Task(kind="slow"))
        assert started.wait(10)
        with session_factory.begin() as session:
            pause_queue(session, "default")
        (waiting,) = add_tasks(session_factory, Task(kind="slow"))
        release.set()
        wait_until(lambda: get_task(session_factory, task_id).status is TaskStatus.SUCCEEDED)
        time.sleep(0.5)
        assert get_task(session_factory, waiting).status is TaskStatus.PENDING


def test_plain_sql_pause_and_resume(engine: Engine, session_factory: sessionmaker[Session]) -> None:
    with engine.begin() as conn:
        conn.execute(text("SELECT pgotask_pause_queue('reports')"))
    with session_factory() as session:
        assert list(paused_queues(session)) == ["reports"]
    with engine.begin() as conn:
        assert conn.execute(text("SELECT pgotask_resume_queue('reports')")).scalar() is True
        assert conn.execute(text("SELECT pgotask_resume_queue('reports')")).scalar() is None


@pytest.mark.parametrize("bad", ["", None, 3])
def test_queue_names_are_checked(session: Session, bad: object) -> None:
    with pytest.raises(ConfigurationError, match="a queue name must be a non-empty string"):
        pause_queue(session, bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="a queue name must be a non-empty string"):
        resume_queue(session, bad)  # type: ignore[arg-type]


# -- pgotask queue ------------------------------------------------------------------


def test_cli_pause_list_resume(database_url: str, session_factory: sessionmaker[Session]) -> None:
    done = run_pgotask(["queue", "list"], database_url)
    assert (done.returncode, done.stdout.strip()) == (0, "no queue is paused"), done.stderr

    done = run_pgotask(["queue", "pause", "emails"], database_url)
    assert (done.returncode, done.stdout.strip()) == (0, "queue 'emails' paused"), done.stderr
    done = run_pgotask(["queue", "pause", "emails", "--json"], database_url)
    assert json.loads(done.stdout) == {"queue": "emails", "paused": True, "changed": False}
    with session_factory() as session:
        assert list(paused_queues(session)) == ["emails"]

    done = run_pgotask(["queue", "list", "--json"], database_url)
    assert list(json.loads(done.stdout)) == ["emails"]
    done = run_pgotask(["queue", "list"], database_url)
    assert done.stdout.startswith("emails\tpaused since ")

    done = run_pgotask(["queue", "resume", "emails", "--json"], database_url)
    assert json.loads(done.stdout) == {"queue": "emails", "paused": False, "changed": True}
    done = run_pgotask(["queue", "resume", "emails"], database_url)
    assert done.stdout.strip() == "queue 'emails' resumed (it was not paused already)"
    with session_factory() as session:
        assert paused_queues(session) == {}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["queue"], "the following arguments are required: ACTION"),
        (["queue", "pause"], "the following arguments are required: name"),
        (["queue", "pause", ""], "a queue name must not be empty"),
        (["queue", "stop", "emails"], "invalid choice: 'stop'"),
    ],
)
def test_cli_queue_bad_arguments(args: list[str], message: str, closed_port_url: str) -> None:
    done = run_pgotask(args, closed_port_url)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr


def test_cli_queue_database_unreachable_or_unmigrated(
    closed_port_url: str, empty_database_url: str
) -> None:
    done = run_pgotask(["queue", "pause", "emails"], closed_port_url, timeout=30)
    assert done.returncode == 3, done.stderr
    assert "cannot use the database" in done.stderr
    done = run_pgotask(["queue", "list"], empty_database_url)
    assert done.returncode == 4, done.stderr
    assert "sqla_pgotask tables are not installed" in done.stderr


# -- per-queue concurrency --------------------------------------------------------


def test_per_queue_concurrency_is_checked(session_factory: sessionmaker[Session]) -> None:
    for bad, message in [
        ({}, "queues must name at least one queue"),
        ({"": 1}, "queues must be non-empty queue names"),
        ({"a": 0}, "the concurrency of queue 'a' must be an integer >= 1, not 0"),
        ({"a": True}, "the concurrency of queue 'a' must be an integer >= 1, not True"),
    ]:
        with pytest.raises(ConfigurationError, match=message):
            Scheduler(session_factory, queues=bad)  # type: ignore[arg-type]
    scheduler = Scheduler(session_factory, queues={"a": 2, "b": 1})
    assert scheduler.settings.queues == ("a", "b")


def test_each_queue_gets_its_own_threads(session_factory: sessionmaker[Session]) -> None:
    scheduler = Scheduler(session_factory, poll_interval=0.2)
    release = threading.Event()
    lock = threading.Lock()
    running_slow: list[int] = []
    most_slow = [0]

    @scheduler.handler("slow")
    def slow(session: Session, task: Task) -> None:
        with lock:
            running_slow.append(task.id)
            most_slow[0] = max(most_slow[0], len(running_slow))
        release.wait(10)
        with lock:
            running_slow.remove(task.id)

    @scheduler.handler("fast")
    def fast(session: Session, task: Task) -> None:
        pass

    with running(scheduler, queues={"bulk": 1, "urgent": 2}) as stats:
        workers = scheduler.running_workers
        assert [w.settings.queues for w in workers] == [("bulk",), ("urgent",)]
        assert [w.settings.concurrency for w in workers] == [1, 2]
        for worker in workers[1:]:
            assert worker.listener.wait_connected(10)
        slow_ids = add_tasks(session_factory, *(Task(kind="slow", queue="bulk") for _ in range(3)))
        wait_until(lambda: len(running_slow) == 1)
        # The bulk queue's only thread is busy: urgent tasks run on their own threads.
        fast_ids = add_tasks(
            session_factory, *(Task(kind="fast", queue="urgent") for _ in range(20))
        )
        wait_until(
            lambda: all(
                get_task(session_factory, i).status is TaskStatus.SUCCEEDED for i in fast_ids
            )
        )
        assert len(running_slow) == 1
        release.set()
        wait_until(
            lambda: all(
                get_task(session_factory, i).status is TaskStatus.SUCCEEDED for i in slow_ids
            )
        )
    assert most_slow[0] == 1
    assert stats[0].succeeded == 23  # the sum over both queues' workers


def test_cli_worker_with_per_queue_concurrency(
    database_url: str, engine: Engine, tmp_path: Path
) -> None:
    create_ledger(engine)
    with pgotask_worker(
        database_url, tmp_path, "--queue", "default=2", "--queue", "other"
    ) as worker:
        worker.wait_for_log("queues=['other'] concurrency=2")  # --queue Q: the default, 2
        worker.wait_for_log("queues=['default'] concurrency=2")
        with Session(engine) as session:
            session.add_all([Task(kind="ledger", queue=q) for q in ("default", "other")])
            session.commit()
        wait_until(lambda: len(_ledger(engine)) == 2, 20)
        worker.send(signal.SIGTERM)
        assert worker.wait(30) == 0


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("emails=0", "the concurrency of queue 'emails' must be at least 1, got 0"),
        ("emails=-2", "the concurrency of queue 'emails' must be at least 1, got -2"),
        ("emails=", "expected NAME=N with a number N, got 'emails='"),
        ("=3", "expected NAME or NAME=N"),
    ],
)
def test_cli_worker_bad_queue_concurrency(value: str, message: str) -> None:
    done = run_pgotask(["worker", "tests.helpers.apps.ledger:scheduler", f"--queue={value}"], None)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr


def _ledger(engine: Engine) -> list[int]:
    with engine.connect() as conn:
        return list(conn.execute(text("SELECT task_id FROM ledger")).scalars())
