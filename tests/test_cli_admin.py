"""The operator commands (stats, list, show, retry, cancel, check, enqueue) and sqla_pgotask.admin.

Each command runs as a real ``pgotask`` process against a real database;
the Python API is called directly.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import re
from typing import Any

import psycopg
import pytest
from sqlalchemy import create_engine, func, make_url, select, text
from sqlalchemy.orm import Session, sessionmaker

from sqla_pgotask import Scheduler, Task, TaskError, TaskStatus
from sqla_pgotask.admin import (
    TaskFilter,
    cancel_tasks,
    get_task,
    health,
    list_tasks,
    queue_stats,
    retry_tasks,
)
from sqla_pgotask.cli.admin import ProgressBar
from sqla_pgotask.models import RegisteredWorker
from tests.helpers import add_tasks
from tests.helpers import get_task as stored_task  # get_task here: the admin function
from tests.helpers.processes import run_pgotask

AGO = dt.timedelta(minutes=10)


def _failed(kind: str = "job", **kwargs: Any) -> Task:
    return Task(
        kind=kind,
        status=TaskStatus.FAILED,
        attempts=3,
        max_attempts=3,
        finished_at=func.now(),
        **kwargs,
    )


def _running(kind: str = "job", *, lease_expired: dt.timedelta | None = None) -> Task:
    lease = (
        func.now() + dt.timedelta(minutes=1)
        if lease_expired is None
        else func.now() - lease_expired
    )
    return Task(
        kind=kind,
        status=TaskStatus.RUNNING,
        attempts=1,
        started_at=func.now(),
        locked_by="w1",
        lease_expires_at=lease,
    )


def _worker(
    session_factory: sessionmaker[Session],
    *,
    heartbeat_ago: dt.timedelta,
    name: str = "host:1:abc",
    kinds: list[str] | None = None,
    queues: list[str] | None = None,
) -> None:
    with session_factory.begin() as session:
        session.add(
            RegisteredWorker(
                id=name,
                host="host",
                pid=1,
                node="n",
                kinds=["job"] if kinds is None else kinds,
                queues=queues,
                concurrency=1,
                last_heartbeat_at=func.now() - heartbeat_ago,
            )
        )


def _json(done: Any) -> Any:
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


# -- stats ---------------------------------------------------------------------------


def test_queue_stats_counts_per_queue_and_kind(session_factory: sessionmaker[Session]) -> None:
    add_tasks(
        session_factory,
        Task(kind="a", run_at=func.now() - dt.timedelta(minutes=2)),
        Task(kind="a", run_at=func.now() + dt.timedelta(hours=1)),
        Task(kind="b", queue="q"),
        _running("a"),
        _failed("a"),
        Task(kind="a", status=TaskStatus.SUCCEEDED, finished_at=func.now()),
        Task(kind="a", status=TaskStatus.SUCCEEDED, finished_at=func.now() - AGO),
    )
    with session_factory() as session:
        stats = queue_stats(session)
    rows = {(r.queue, r.kind): r for r in stats.rows}
    assert set(rows) == {("default", "a"), ("q", "b")}
    a = rows["default", "a"]
    assert (a.due, a.scheduled, a.running, a.succeeded, a.failed, a.cancelled) == (1, 1, 1, 2, 1, 0)
    assert a.oldest_due_seconds is not None and 110 < a.oldest_due_seconds < 300
    assert a.finished_recently == 2  # one failed, one succeeded in the last 5 minutes
    assert stats.throughput_per_minute == pytest.approx(2 / 5)
    assert rows["q", "b"].due == 1


def test_cli_stats(database_url: str, session_factory: sessionmaker[Session]) -> None:
    add_tasks(session_factory, Task(kind="a"), _failed("b", queue="q"))
    found = _json(run_pgotask(["stats", "--json"], database_url))
    assert found["window_seconds"] == 300
    assert found["throughput_per_minute"] == pytest.approx(1 / 5)
    assert [(r["queue"], r["kind"], r["due"], r["failed"]) for r in found["rows"]] == [
        ("default", "a", 1, 0),
        ("q", "b", 0, 1),
    ]
    assert set(found["rows"][0]) == {
        "queue",
        "kind",
        "due",
        "scheduled",
        "running",
        "succeeded",
        "failed",
        "cancelled",
        "oldest_due_seconds",
        "finished_last_window",
    }
    done = run_pgotask(["stats"], database_url)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0].split() == [
        "QUEUE",
        "KIND",
        "DUE",
        "LATER",
        "RUNNING",
        "SUCCEEDED",
        "FAILED",
        "CANCELLED",
        "OLDEST",
        "DUE",
    ]
    assert "throughput: 0.2 tasks/min (last 5 min)" in done.stdout


# -- list and show --------------------------------------------------------------------


def test_list_tasks_filters(session_factory: sessionmaker[Session]) -> None:
    old, new_failed, other = add_tasks(
        session_factory,
        Task(kind="a", created_at=func.now() - dt.timedelta(days=2)),
        _failed("a"),
        Task(kind="b", queue="q"),
    )
    with session_factory() as session:
        assert [t.id for t in list_tasks(session)] == [other, new_failed, old]
        assert [t.id for t in list_tasks(session, limit=1)] == [other]
        assert [t.id for t in list_tasks(session, TaskFilter(statuses=["failed"]))] == [new_failed]
        assert [t.id for t in list_tasks(session, TaskFilter(kinds=["a"]))] == [new_failed, old]
        assert [t.id for t in list_tasks(session, TaskFilter(queues=["q"]))] == [other]
        older = TaskFilter(older_than=dt.timedelta(days=1))
        assert [t.id for t in list_tasks(session, older)] == [old]
    with pytest.raises(ValueError, match="unknown"):
        TaskFilter(statuses=["unknown"])


def test_cli_list(database_url: str, session_factory: sessionmaker[Session]) -> None:
    first, second = add_tasks(session_factory, Task(kind="a", payload={"x": 1}), _failed("b"))
    found = _json(run_pgotask(["list", "--json"], database_url))
    assert [t["id"] for t in found] == [second, first]
    assert found[1]["payload"] == {"x": 1} and found[1]["status"] == "pending"
    found = _json(
        run_pgotask(["list", "--json", "--status", "failed", "--kind", "b"], database_url)
    )
    assert [t["id"] for t in found] == [second]
    found = _json(run_pgotask(["list", "--json", "--older-than", "1h"], database_url))
    assert found == []
    done = run_pgotask(["list", "--limit", "1"], database_url)
    assert done.returncode == 0, done.stderr
    header, row = done.stdout.splitlines()
    assert header.split() == ["ID", "KIND", "QUEUE", "STATUS", "ATTEMPTS", "RUN_AT", "FINISHED_AT"]
    assert row.split()[:5] == [str(second), "b", "default", "failed", "3/3"]
    done = run_pgotask(["list", "--queue", "nowhere"], database_url)
    assert done.stdout == "no matching tasks\n"


def test_cli_show(database_url: str, session_factory: sessionmaker[Session]) -> None:
    (task_id,) = add_tasks(session_factory, _failed("a", payload={"to": "x@example.com"}))
    with session_factory.begin() as session:
        for attempt in (1, 2):
            session.add(
                TaskError(
                    task_id=task_id,
                    attempt=attempt,
                    exception_type="ValueError",
                    message=f"bad {attempt}",
                    traceback=f'Traceback (most recent call last):\n  File "h.py", line {attempt}',
                    worker="w1",
                )
            )
    with session_factory() as session:
        task = get_task(session, task_id)
        assert task is not None and [e.attempt for e in task.errors] == [1, 2]
        assert get_task(session, task_id + 100) is None

    done = run_pgotask(["show", str(task_id)], database_url)
    assert done.returncode == 0, done.stderr
    assert "status:              failed" in done.stdout
    assert '    "to": "x@example.com"' in done.stdout
    assert "errors: 2" in done.stdout
    assert "attempt 2 at " in done.stdout and "on w1: ValueError: bad 2" in done.stdout
    assert '      File "h.py", line 2' in done.stdout

    shown = _json(run_pgotask(["show", str(task_id), "--json"], database_url))
    assert shown["payload"] == {"to": "x@example.com"} and shown["attempts"] == 3
    assert [e["message"] for e in shown["errors"]] == ["bad 1", "bad 2"]
    assert shown["errors"][0]["traceback"].startswith("Traceback")

    done = run_pgotask(["show", str(task_id + 100)], database_url)
    assert done.returncode == 1
    assert f"pgotask: error: no task with id {task_id + 100}" in done.stderr


# -- retry ---------------------------------------------------------------------------


def test_retry_revives_failed_tasks_with_one_more_attempt(
    session_factory: sessionmaker[Session],
) -> None:
    failed, pending, running, succeeded = add_tasks(
        session_factory,
        _failed("job"),
        Task(kind="job"),
        _running("job"),
        Task(kind="job", status=TaskStatus.SUCCEEDED, finished_at=func.now()),
    )
    result = retry_tasks(session_factory, ids=[failed, pending, running, succeeded, 999])
    assert result.retried == [failed]
    assert result.not_retryable == [pending, running, succeeded, 999]
    task = stored_task(session_factory, failed)
    assert (task.status, task.attempts, task.max_attempts, task.finished_at) == (
        TaskStatus.PENDING,
        3,
        4,
        None,
    )
    assert stored_task(session_factory, running).status is TaskStatus.RUNNING

    # It can actually run again, once.
    scheduler = Scheduler(session_factory)
    calls: list[int] = []

    @scheduler.handler("job")
    def job(session: Session, task: Task) -> None:
        calls.append(task.id)
        raise RuntimeError("still broken")

    assert scheduler.run_until_idle() == 2  # the pending one and the retried one
    again = stored_task(session_factory, failed)
    assert (again.status, again.attempts) == (TaskStatus.FAILED, 4)
    # --attempts N: N more.
    retry_tasks(session_factory, ids=[failed], extra_attempts=3)
    assert stored_task(session_factory, failed).max_attempts == 7


def test_retry_skips_a_task_whose_dedup_key_is_live(session_factory: sessionmaker[Session]) -> None:
    twin_live, blocked, older, newer = add_tasks(
        session_factory,
        Task(kind="job", dedup_key="k1"),
        _failed("job", dedup_key="k1"),
        _failed("job", dedup_key="k2"),
        _failed("job", dedup_key="k2"),
    )
    result = retry_tasks(session_factory, TaskFilter(statuses=["failed"]))
    # k1 has a live twin; of the two k2 tasks only the newest comes back.
    assert result.retried == [newer]
    assert sorted(result.skipped_duplicates) == [blocked, older]
    assert stored_task(session_factory, blocked).status is TaskStatus.FAILED
    assert stored_task(session_factory, twin_live).status is TaskStatus.PENDING


def test_retry_in_batches_with_progress(session_factory: sessionmaker[Session]) -> None:
    ids = add_tasks(
        session_factory, *(_failed("a") for _ in range(7)), _failed("b"), Task(kind="a")
    )
    seen: list[tuple[int, int]] = []
    result = retry_tasks(
        session_factory,
        TaskFilter(kinds=["a"]),
        batch_size=3,
        progress=lambda done, total: seen.append((done, total)),
    )
    assert result.retried == ids[:7]
    assert seen == [(3, 7), (6, 7), (7, 7)]
    assert stored_task(session_factory, ids[7]).status is TaskStatus.FAILED
    with pytest.raises(ValueError, match="either ids or a TaskFilter"):
        retry_tasks(session_factory)
    with pytest.raises(ValueError, match="extra_attempts"):
        retry_tasks(session_factory, ids=[1], extra_attempts=0)


def test_cli_retry(database_url: str, session_factory: sessionmaker[Session]) -> None:
    failed_a, failed_b, cancelled, pending = add_tasks(
        session_factory,
        _failed("a"),
        _failed("b", queue="q"),
        Task(kind="a", status=TaskStatus.CANCELLED, finished_at=func.now()),
        Task(kind="a"),
    )
    found = _json(run_pgotask(["retry", "--failed", "--queue", "q", "--json"], database_url))
    assert found == {
        "retried": 1,
        "retried_ids": [failed_b],
        "skipped_duplicates": [],
        "not_retryable": [],
    }
    done = run_pgotask(["retry", "--failed", "--cancelled", "--batch-size", "1"], database_url)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "retried 2 tasks (each gets 1 more attempt(s))\n"
    assert done.stderr == ""  # no progress bar when stderr is not a terminal
    assert stored_task(session_factory, cancelled).status is TaskStatus.PENDING
    # By id: a task that is not failed or cancelled is an error (exit 1).
    done = run_pgotask(["retry", str(pending), str(failed_a)], database_url)
    assert done.returncode == 1
    assert f"skipped task {pending}: no failed or cancelled task with this id" in done.stdout


# -- cancel --------------------------------------------------------------------------


def test_cancel_tasks_by_id_and_filter(session_factory: sessionmaker[Session]) -> None:
    pending, running, done, other = add_tasks(
        session_factory,
        Task(kind="a"),
        _running("a"),
        Task(kind="a", status=TaskStatus.SUCCEEDED, finished_at=func.now()),
        Task(kind="b"),
    )
    result = cancel_tasks(session_factory, ids=[pending, running, done])
    assert (result.cancelled, result.requested, result.not_cancellable) == (
        [pending],
        [running],
        [done],
    )
    assert stored_task(session_factory, pending).status is TaskStatus.CANCELLED
    flagged = stored_task(session_factory, running)
    assert flagged.status is TaskStatus.RUNNING and flagged.cancel_requested_at is not None
    result = cancel_tasks(session_factory, TaskFilter(kinds=["b"]))
    assert result.cancelled == [other]


def test_cli_cancel(database_url: str, session_factory: sessionmaker[Session]) -> None:
    a, b, c = add_tasks(session_factory, Task(kind="a"), Task(kind="b"), Task(kind="b", queue="q"))
    found = _json(run_pgotask(["cancel", str(a), "--json"], database_url))
    assert found == {"cancelled": [a], "requested": [], "not_cancellable": []}
    done = run_pgotask(["cancel", str(a)], database_url)
    assert done.returncode == 1
    assert f"skipped task {a}: no pending or running task with this id" in done.stdout
    done = run_pgotask(["cancel", "--kind", "b", "--status", "pending"], database_url)
    assert done.returncode == 0, done.stderr
    assert (
        done.stdout == "cancelled 2 pending task(s); requested cancellation of 0 running task(s)\n"
    )
    assert stored_task(session_factory, c).status is TaskStatus.CANCELLED
    (d,) = add_tasks(session_factory, Task(kind="z"))
    assert _json(run_pgotask(["cancel", "--all", "--json"], database_url))["cancelled"] == [d]
    assert stored_task(session_factory, b).status is TaskStatus.CANCELLED


# -- check ---------------------------------------------------------------------------


def test_health(session_factory: sessionmaker[Session]) -> None:
    report = health(session_factory)
    assert not report.ok
    assert [c.name for c in report.problems] == ["workers"]
    _worker(session_factory, heartbeat_ago=dt.timedelta(seconds=5))
    assert health(session_factory).ok
    assert not health(session_factory, worker_timeout=1).ok  # its heartbeat is 5 s old

    (stuck,) = add_tasks(session_factory, _running(lease_expired=dt.timedelta(minutes=5)))
    add_tasks(session_factory, _running(lease_expired=dt.timedelta(seconds=5)))  # not yet stuck
    report = health(session_factory, stuck_after=60)
    assert [(c.name, c.data) for c in report.problems] == [("stuck", {"count": 1, "ids": [stuck]})]
    with session_factory.begin() as session:
        session.execute(text("DELETE FROM pgotask_task"))
    # A kind the live worker handles (see test_check_names_kinds_no_live_worker_handles).
    add_tasks(session_factory, Task(kind="job", run_at=func.now() - dt.timedelta(minutes=3)))
    assert health(session_factory, max_age=3600).ok
    report = health(session_factory, max_age=60)
    assert [c.name for c in report.problems] == ["backlog"]
    assert "has waited" in report.problems[0].detail


def test_cli_check(database_url: str, session_factory: sessionmaker[Session]) -> None:
    done = run_pgotask(["check"], database_url)
    assert done.returncode == 1
    assert "FAIL workers: no worker has sent a heartbeat in the last 60s" in done.stdout
    assert "pgotask: unhealthy: workers: no worker has sent a heartbeat in the last 60s" in (
        done.stderr
    )
    assert run_pgotask(["check", "--no-workers"], database_url).returncode == 0

    _worker(session_factory, heartbeat_ago=dt.timedelta(seconds=1))
    done = run_pgotask(["check", "--json"], database_url)
    found = _json(done)
    assert found["ok"] is True
    assert [c["name"] for c in found["checks"]] == [
        "schema",
        "workers",
        "handlers",
        "slots",
        "stuck",
    ]
    assert found["checks"][1]["live"] == 1

    add_tasks(session_factory, _running(lease_expired=dt.timedelta(minutes=5)))
    add_tasks(session_factory, Task(kind="job", run_at=func.now() - dt.timedelta(minutes=3)))
    done = run_pgotask(["check", "--stuck-after", "2m", "--max-age", "1m", "--json"], database_url)
    assert done.returncode == 1
    found = json.loads(done.stdout)
    assert [c["name"] for c in found["checks"] if not c["ok"]] == ["stuck", "backlog"]


def test_check_fails_when_a_workers_threads_have_all_been_stuck_too_long(
    database_url: str, session_factory: sessionmaker[Session]
) -> None:
    second = dt.timedelta(seconds=1)
    _worker(session_factory, heartbeat_ago=second, name="w-some")
    _worker(session_factory, heartbeat_ago=second, name="w-all")
    with session_factory.begin() as session:
        session.execute(
            text(
                "UPDATE pgotask_worker SET concurrency = 4, stuck_slots = 1 WHERE id = 'w-some';"
                "UPDATE pgotask_worker SET concurrency = 4, stuck_slots = 4, "
                "all_stuck_since = now() - interval '30 seconds' WHERE id = 'w-all'"
            )
        )
    report = health(session_factory, stuck_after=60)
    assert report.ok  # 30 s with no free thread: not yet over the 60 s allowed
    [slots] = [c for c in report.checks if c.name == "slots"]
    assert slots.detail.startswith(
        "worker w-all: 4 of 4 handler threads stuck, all of them for 30s; "
        "worker w-some: 1 of 4 handler threads stuck"
    )
    done = run_pgotask(["check", "--stuck-after", "20s"], database_url)
    assert done.returncode == 1
    assert re.search(
        r"FAIL slots: worker w-all: 4 of 4 handler threads stuck, all of them for 3\ds", done.stdout
    )
    assert "no free thread for over 20s: restart the worker" in done.stdout


def test_cli_check_unmigrated_database(empty_database_url: str) -> None:
    done = run_pgotask(["check", "--json"], empty_database_url)
    assert done.returncode == 4
    found = json.loads(done.stdout)
    assert found["ok"] is False and found["checks"][0]["name"] == "schema"
    assert "not installed" in done.stderr
    engine = create_engine(empty_database_url)
    try:
        report = health(sessionmaker(engine))
    finally:
        engine.dispose()
    assert not report.schema_ok and [c.name for c in report.checks] == ["schema"]


def test_check_names_kinds_no_live_worker_handles(
    database_url: str, session_factory: sessionmaker[Session]
) -> None:
    second = dt.timedelta(seconds=1)
    _worker(session_factory, heartbeat_ago=second)  # kind 'job', every queue
    _worker(session_factory, heartbeat_ago=second, name="h:2", kinds=["mail"], queues=["emails"])
    # A dead worker's handlers run nothing.
    _worker(session_factory, heartbeat_ago=dt.timedelta(minutes=10), name="h:3", kinds=["report"])
    add_tasks(
        session_factory,
        Task(kind="job"),
        Task(kind="job", queue="anywhere"),
        Task(kind="mail", queue="emails"),
        Task(kind="report"),
        Task(kind="report"),
        Task(kind="mail"),  # the mail worker serves 'emails' only
        Task(kind="later", run_at=func.now() + dt.timedelta(hours=1)),  # not due
        _failed("gone"),  # not pending
    )
    done = run_pgotask(["check", "--json"], database_url)
    assert done.returncode == 1, done.stderr
    checks = {c["name"]: c for c in json.loads(done.stdout)["checks"]}
    assert checks["workers"]["ok"] and not checks["handlers"]["ok"]
    assert checks["handlers"]["unhandled"] == [
        {"kind": "report", "queue": "default", "due": 2},
        {"kind": "mail", "queue": "default", "due": 1},
    ]
    assert (
        "pgotask: unhealthy: handlers: no live worker handles kind 'report' in queue 'default' "
        "(2 due tasks), kind 'mail' in queue 'default' (1 due task)\n"
    ) in done.stderr

    with session_factory.begin() as session:
        session.execute(text("DELETE FROM pgotask_task WHERE kind IN ('report', 'mail')"))
    done = run_pgotask(["check"], database_url)
    assert done.returncode == 0, done.stderr
    assert "ok   handlers: every due task has a live worker to run it" in done.stdout

    # No live worker at all: the workers check fails and says why, alone.
    with session_factory.begin() as session:
        session.execute(
            text("UPDATE pgotask_worker SET last_heartbeat_at = now() - '1h'::interval")
        )
    report = health(session_factory)
    assert [c.name for c in report.problems] == ["workers"]
    assert "handlers" not in [c.name for c in report.checks]
    assert "handlers" not in [c.name for c in health(session_factory, worker_timeout=None).checks]


# -- enqueue -------------------------------------------------------------------------


def test_cli_enqueue(database_url: str, session_factory: sessionmaker[Session]) -> None:
    done = run_pgotask(
        ["enqueue", "send", "--payload", '{"to": [1, 2]}', "--queue", "q", "--priority", "5"],
        database_url,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("enqueued task ")
    task_id = int(done.stdout.split()[2])
    task = stored_task(session_factory, task_id)
    assert (task.kind, task.payload, task.queue, task.priority) == ("send", {"to": [1, 2]}, "q", 5)

    found = _json(
        run_pgotask(
            [
                "enqueue",
                "send",
                "--run-at",
                "+1h",
                "--dedup-key",
                "k",
                "--max-attempts",
                "2",
                "--json",
            ],
            database_url,
        )
    )
    later = stored_task(session_factory, found["id"])
    assert found["duplicate_of"] is None and later.max_attempts == 2
    with session_factory() as session:
        delay: dt.timedelta | None = session.scalar(
            select(func.age(Task.run_at, func.now())).where(Task.id == found["id"])
        )
    assert delay is not None and dt.timedelta(minutes=59) < delay <= dt.timedelta(hours=1)

    done = run_pgotask(["enqueue", "send", "--dedup-key", "k"], database_url)
    assert done.returncode == 0, done.stderr
    assert f"duplicate of task {found['id']}" in done.stdout

    found = _json(
        run_pgotask(
            ["enqueue", "x", "--run-at", "2030-01-31T09:00:00+01:00", "--json"], database_url
        )
    )
    assert stored_task(session_factory, found["id"]).run_at == dt.datetime(
        2030, 1, 31, 8, tzinfo=dt.timezone.utc
    )


# -- bad input, unreachable and unmigrated databases -----------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["enqueue", "k", "--payload", "{nope"], "the payload is not valid JSON"),
        (["enqueue", "k", "--payload", "NaN"], "NaN is not valid JSON"),
        (["enqueue", "k", "--run-at", "2030-01-01T09:00"], "has no time zone"),
        (["enqueue", "k", "--run-at", "tomorrow"], "expected an ISO 8601 time with a time zone"),
        (["enqueue", "k", "--run-at", "+3w"], "expected a duration like 30s"),
        (["enqueue", "k", "--priority", "high"], "expected a whole number, got 'high'"),
        (["enqueue", ""], "the task kind must not be empty"),
        (["list", "--status", "done"], "unknown status 'done'"),
        (["list", "--limit", "0"], "must be at least 1, got 0"),
        (["list", "--older-than", "soon"], "expected a duration like 30s"),
        (["show", "abc"], "expected a task id (a whole number), got 'abc'"),
        (["show"], "the following arguments are required: id"),
        (["retry"], "give task ids, or --failed and/or --cancelled"),
        (["retry", "1", "--failed"], "give task ids or filters"),
        (["retry", "--failed", "--attempts", "0"], "must be at least 1, got 0"),
        (["cancel"], "give task ids, filters (--status, --kind, --queue, --older-than), or --all"),
        (["cancel", "--status", "failed"], "expected one of pending, running, got 'failed'"),
        (["cancel", "3", "--kind", "a"], "give task ids or filters"),
        (["check", "--worker-timeout", "0"], "must be greater than 0"),
        (["check", "--max-age", "x"], "expected a duration like 30s"),
        (["stats", "--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_cli_bad_arguments(args: list[str], message: str, closed_port_url: str) -> None:
    done = run_pgotask(args, closed_port_url)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr


ALL_COMMANDS = [
    ["stats"],
    ["list"],
    ["show", "1"],
    ["retry", "--failed"],
    ["cancel", "--all"],
    ["check"],
    ["enqueue", "k"],
]


@pytest.mark.parametrize("args", ALL_COMMANDS, ids=lambda a: a[0])
def test_cli_database_unreachable(args: list[str], closed_port_url: str) -> None:
    done = run_pgotask(args, closed_port_url, timeout=30)
    assert done.returncode == 3, done.stderr
    assert "pgotask: error: cannot use the database" in done.stderr


@pytest.mark.parametrize("args", ALL_COMMANDS, ids=lambda a: a[0])
def test_cli_unmigrated_database(args: list[str], empty_database_url: str) -> None:
    done = run_pgotask(args, empty_database_url)
    assert done.returncode == 4, done.stderr
    assert "the sqla_pgotask tables are not installed" in done.stderr


@pytest.mark.parametrize("args", ALL_COMMANDS, ids=lambda a: a[0])
def test_cli_without_database_url(args: list[str]) -> None:
    done = run_pgotask(args, None)
    assert done.returncode == 2, done.stderr
    assert "no database URL: pass --database-url or set PGOTASK_DATABASE_URL" in done.stderr


# Characters that move the cursor, clear the screen, set the title or reverse the text.
HOSTILE = "\x1b[2J\x1b]0;owned\x07\rX\x08\x9b31m\u202eevil"
CONTROL = {"\x1b", "\x07", "\r", "\x08", "\x9b", "\u202e"}


def test_terminal_output_escapes_control_characters(
    database_url: str, session_factory: sessionmaker[Session]
) -> None:
    _worker(session_factory, heartbeat_ago=dt.timedelta(seconds=1))
    (task_id,) = add_tasks(session_factory, Task(kind=f"k{HOSTILE}", queue=f"q{HOSTILE}"))
    with session_factory.begin() as session:
        session.add(
            TaskError(
                task_id=task_id,
                attempt=1,
                exception_type=f"E{HOSTILE}",
                message=f"m{HOSTILE}\nsecond line",
                traceback=f"Traceback (most recent call last):\n  File {HOSTILE}\n",
                worker=f"w{HOSTILE}",
            )
        )
    assert run_pgotask(["queue", "pause", f"q{HOSTILE}"], database_url).returncode == 0
    for args in (["list"], ["stats"], ["show", str(task_id)], ["check"], ["queue", "list"]):
        done = run_pgotask(args, database_url)
        assert done.returncode in (0, 1), done.stderr
        printed = done.stdout + done.stderr
        assert not CONTROL & set(printed), (args, printed)
        assert "\\x1b[2J\\x1b]0;owned\\x07\\rX\\x08\\x9b31m\\u202eevil" in printed, args
    shown = run_pgotask(["show", str(task_id)], database_url).stdout
    assert "\\u202eevil\\nsecond line\n" in shown  # one error message, one line
    # --json: exactly what the database holds.
    found = _json(run_pgotask(["show", str(task_id), "--json"], database_url))
    assert (found["kind"], found["queue"]) == (f"k{HOSTILE}", f"q{HOSTILE}")
    error = found["errors"][0]
    assert (error["exception_type"], error["worker"]) == (f"E{HOSTILE}", f"w{HOSTILE}")
    assert error["message"] == f"m{HOSTILE}\nsecond line"
    listed = _json(run_pgotask(["list", "--json"], database_url))
    assert listed[0]["kind"] == f"k{HOSTILE}"


def test_help_everywhere() -> None:
    for args in ALL_COMMANDS:
        done = run_pgotask([args[0], "--help"], None)
        assert done.returncode == 0, done.stderr
        assert f"usage: pgotask {args[0]}" in done.stdout


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_only_on_a_terminal() -> None:
    terminal = _Terminal()
    bar = ProgressBar("retrying", terminal)
    bar(3, 6)
    bar(6, 6)
    bar.close()
    assert terminal.getvalue() == (
        "\rretrying [###############---------------] 3/6 (50%)"
        "\rretrying [##############################] 6/6 (100%)\n"
    )
    pipe = io.StringIO()
    quiet = ProgressBar("retrying", pipe)
    quiet(1, 1)
    quiet.close()
    assert pipe.getvalue() == ""
    # A total not known in advance (pgotask prune): the count so far.
    counter = _Terminal()
    deleted = ProgressBar("deleted", counter)
    deleted(1000)
    deleted(1500)
    deleted.close()
    assert counter.getvalue() == "\rdeleted: 1000\rdeleted: 1500\n"


def test_retry_wakes_the_workers_of_each_retried_queue(
    database_url: str, session_factory: sessionmaker[Session]
) -> None:
    # An UPDATE fires no insert trigger: retry notifies by itself, once per
    # queue, when its batch commits, so an idle worker starts the task at once.
    emails, reports, reports_too, pending = add_tasks(
        session_factory,
        _failed("job", queue="emails"),
        _failed("job", queue="reports"),
        _failed("job", queue="reports"),
        Task(kind="job", queue="other"),
    )
    with psycopg.connect(
        make_url(database_url).set(drivername="postgresql").render_as_string(hide_password=False),
        autocommit=True,
    ) as listener:
        listener.execute("LISTEN pgotask")
        result = retry_tasks(session_factory, ids=[emails, reports, reports_too, pending])
        assert result.retried == [emails, reports, reports_too]
        heard = [n.payload for n in listener.notifies(timeout=2, stop_after=3)]
        assert sorted(heard) == ["emails", "reports"]
        # Nothing retried, nothing sent.
        assert retry_tasks(session_factory, ids=[pending]).retried == []
        assert [n.payload for n in listener.notifies(timeout=0.5)] == []
