"""``pgotask worker --processes N``: a supervisor and N real worker processes on a real database.

The application is :mod:`tests.helpers.apps.faulty`: its short leases bring a killed
worker's tasks back within seconds, and its ledger's UNIQUE ``task_id``
makes a task that committed twice impossible.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session, sessionmaker

from sqla_pgotask import RegisteredWorker, Task, TaskError, TaskStatus
from sqla_pgotask.cli import build_parser
from sqla_pgotask.cli.worker import _worker_process_args
from sqla_pgotask.worker.supervisor import describe_exit, restart_delay
from tests.helpers import process_gone, wait_until
from tests.helpers.apps.faulty import POISON_MAX_ATTEMPTS, SCHEDULER, LedgerEntry, create_ledger
from tests.helpers.processes import WorkerProcess, pgotask_worker, run_pgotask

_STARTED = re.compile(r"worker process \d+/\d+ started \(pid (\d+)\)")
_RESTART = re.compile(r"worker process (\d+) \(pid \d+\) .*; restarting it in ([\d.]+)s")

linux_only = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="reads process states from /proc"
)


@pytest.fixture
def ledger_engine(engine: Engine) -> Engine:
    """The test database's engine, with the faulty application's ledger table."""
    create_ledger(engine)
    return engine


def _children(supervisor: WorkerProcess) -> list[int]:
    """Pids of every worker process the supervisor started so far, in order."""
    return [int(pid) for pid in _STARTED.findall(supervisor.log())]


def _wait_gone(pid: int, timeout: float) -> None:
    wait_until(lambda: process_gone(pid), timeout, message=f"process {pid} to exit")


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])


@contextlib.contextmanager
def _supervisor(
    database_url: str, log_dir: Path, *args: str, processes: int = 2
) -> Iterator[WorkerProcess]:
    """``pgotask worker tests.helpers.apps.faulty:scheduler --processes N *args``; on the way out,
    no worker process outlives the test."""
    children: list[int] = []
    try:
        with pgotask_worker(
            database_url,
            log_dir,
            "--processes",
            str(processes),
            *args,
            scheduler=SCHEDULER,
            name="supervisor",
        ) as supervisor:
            try:
                yield supervisor
            finally:
                children = _children(supervisor)
    finally:
        # The supervisor is dead now (killed if need be): they stop by themselves.
        for pid in children:
            with contextlib.suppress(AssertionError):
                _wait_gone(pid, 20)
            if not process_gone(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def _registered_pids(session_factory: sessionmaker[Session]) -> set[int]:
    with session_factory() as session:
        return set(session.scalars(select(RegisteredWorker.pid)))


def _wait_registered(
    supervisor: WorkerProcess, session_factory: sessionmaker[Session], processes: int
) -> set[int]:
    """Wait until ``processes`` worker processes of this supervisor run, and return their pids."""

    def registered() -> set[int]:
        if not supervisor.alive():
            raise AssertionError(f"the supervisor exited with {supervisor.process.returncode}")
        pids = _registered_pids(session_factory)
        live = {pid for pid in _children(supervisor) if not process_gone(pid)}
        return pids if len(pids) == processes and pids == live else set()

    return wait_until(registered, 60, interval=0.1, message=f"{processes} registered workers")


def _enqueue(session_factory: sessionmaker[Session], count: int, sleep: float = 0.0) -> None:
    with session_factory.begin() as session:
        session.add_all([Task(kind="ledger", payload={"sleep": sleep}) for _ in range(count)])


def _count(session_factory: sessionmaker[Session], *statuses: TaskStatus) -> int:
    with session_factory() as session:
        return (
            session.scalar(select(func.count()).select_from(Task).where(Task.status.in_(statuses)))
            or 0
        )


def _unfinished(session_factory: sessionmaker[Session]) -> int:
    return _count(session_factory, TaskStatus.PENDING, TaskStatus.RUNNING)


def _check_every_task_ran_once(session_factory: sessionmaker[Session], count: int) -> set[int]:
    """Every task succeeded, with exactly one ledger row each; return the pids that ran them."""
    with session_factory() as session:
        statuses = list(session.scalars(select(Task.status)))
        ledger = session.execute(select(LedgerEntry.task_id, LedgerEntry.worker_pid)).all()
    assert statuses == [TaskStatus.SUCCEEDED] * count
    assert len(ledger) == count
    assert len({row.task_id for row in ledger}) == count
    return {row.worker_pid for row in ledger}


def _stop(supervisor: WorkerProcess, timeout: float = 60.0) -> int:
    supervisor.send(signal.SIGTERM)
    return supervisor.wait(timeout)


# -- pure parts ---------------------------------------------------------------------


def test_restart_delay_doubles_up_to_a_cap() -> None:
    assert [restart_delay(n, 1.0, 30.0) for n in range(1, 8)] == [1, 2, 4, 8, 16, 30, 30]
    assert restart_delay(0, 0.5, 10.0) == 0.5
    assert restart_delay(10_000, 1.0, 30.0) == 30.0


def test_describe_exit() -> None:
    assert describe_exit(-signal.SIGKILL) == "was killed by SIGKILL"
    assert describe_exit(1) == "exited with code 1 (an error)"
    assert describe_exit(4) == "exited with code 4 (the database schema is missing or outdated)"
    assert describe_exit(0) == "exited with code 0"


def test_worker_processes_get_every_worker_option() -> None:
    parser = build_parser()
    args = parser.parse_args(
        [
            "--log-level=DEBUG",
            "worker",
            "app.tasks:scheduler",
            "--concurrency=3",
            "--queue=-dash",
            "--queue=b",
            "--poll-interval=0.25",
            "--shutdown-grace=7.5",
            "--processes=4",
        ]
    )
    given = vars(args)
    # A new ``pgotask worker`` option must be forwarded by _worker_process_args:
    # extend that function, then this list.
    assert set(given) == {
        "log_level",
        "command",
        "func",
        "scheduler",
        "concurrency",
        "queue",
        "poll_interval",
        "shutdown_grace",
        "processes",
        "supervisor_pid",
        "ready_fd",
        # Not forwarded: the supervisor serves the metrics, and gives its worker
        # processes the hidden --metrics-dir instead (sqla_pgotask.cli.metrics).
        "metrics_port",
        "metrics_host",
        "metrics_dir",
    }
    child = vars(parser.parse_args(_worker_process_args(args)))
    assert child == {**given, "processes": 1}
    with_metrics = parser.parse_args(["worker", "app:s", "--processes=2", "--metrics-port=9300"])
    child = vars(parser.parse_args(_worker_process_args(with_metrics)))
    assert (child["metrics_port"], child["metrics_dir"]) == (None, None)


# -- arguments and start-up failures ---------------------------------------------


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("0", "argument --processes: must be at least 1, got 0"),
        ("-2", "argument --processes: must be at least 1, got -2"),
        ("x", "argument --processes: expected a whole number, got 'x'"),
        ("1.5", "argument --processes: expected a whole number, got '1.5'"),
    ],
)
def test_processes_must_be_a_positive_integer(
    value: str, message: str, closed_port_url: str
) -> None:
    done = run_pgotask(["worker", SCHEDULER, "--processes", value], closed_port_url)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
    assert "usage: pgotask worker" in done.stderr
    assert "started (pid" not in done.stderr  # no worker process was started


def test_bad_scheduler_path_fails_before_starting_processes(closed_port_url: str) -> None:
    done = run_pgotask(["worker", "tests.helpers.apps.faulty", "--processes", "2"], closed_port_url)
    assert done.returncode == 2, done.stderr
    assert "expected 'module:attribute'" in done.stderr
    assert "started (pid" not in done.stderr


@pytest.mark.parametrize(
    ("scheduler", "code", "child_message", "meaning"),
    [
        (
            "nosuchmodule:scheduler",
            2,
            "cannot import module 'nosuchmodule'",
            "exited with code 2 (a usage or configuration error); restarting it would not help",
        ),
        (
            SCHEDULER,
            3,
            "cannot use the database",
            "exited with code 3 (the database is unreachable); before any worker process "
            "had started, so it is not restarted",
        ),
    ],
)
def test_worker_process_that_cannot_start_stops_the_supervisor(
    scheduler: str, code: int, child_message: str, meaning: str, closed_port_url: str
) -> None:
    done = run_pgotask(["worker", scheduler, "--processes", "2"], closed_port_url, timeout=60)
    assert done.returncode == code, done.stderr
    assert child_message in done.stderr
    assert meaning in done.stderr
    assert "all worker processes were stopped" in done.stderr
    assert len(_STARTED.findall(done.stderr)) == 2  # started once each, never restarted
    assert "Traceback" not in done.stderr


def test_unmigrated_schema_stops_the_supervisor(empty_database_url: str) -> None:
    done = run_pgotask(["worker", SCHEDULER, "--processes", "2"], empty_database_url, timeout=60)
    assert done.returncode == 4, done.stderr
    assert "sqla_pgotask tables are not installed" in done.stderr
    assert "exited with code 4 (the database schema is missing or outdated)" in done.stderr
    assert "pgotask: error: worker process" in done.stderr
    assert len(_STARTED.findall(done.stderr)) == 2
    assert "restarting it in" not in done.stderr


# -- running ------------------------------------------------------------------------


@pytest.mark.slow
@linux_only
def test_worker_processes_share_the_work_and_stop_on_sigterm(
    database_url: str,
    ledger_engine: Engine,
    session_factory: sessionmaker[Session],
    tmp_path: Path,
) -> None:
    with _supervisor(database_url, tmp_path, "--concurrency", "2", processes=2) as supervisor:
        pids = _wait_registered(supervisor, session_factory, 2)
        assert all(_parent(pid) == supervisor.pid for pid in pids)
        _enqueue(session_factory, 200)
        wait_until(lambda: _unfinished(session_factory) == 0, 120, message="every task to finish")

        assert _stop(supervisor) == 0
        assert all(process_gone(pid) for pid in pids)
        log = supervisor.log()
        assert "SIGTERM: stopping the worker processes after their in-flight tasks" in log
        assert "all 2 worker processes stopped" in log
        assert "restarting" not in log

    assert _check_every_task_ran_once(session_factory, 200) <= pids
    assert _registered_pids(session_factory) == set()  # each one unregistered itself


@pytest.mark.slow
@linux_only
def test_killed_worker_process_is_restarted_and_no_task_is_lost(
    database_url: str,
    ledger_engine: Engine,
    session_factory: sessionmaker[Session],
    tmp_path: Path,
) -> None:
    count = 12
    with _supervisor(database_url, tmp_path, "--concurrency", "2", processes=2) as supervisor:
        first = _wait_registered(supervisor, session_factory, 2)
        _enqueue(session_factory, count, sleep=0.5)

        def busy_pid() -> int:
            with session_factory() as session:
                pid = session.scalar(
                    select(RegisteredWorker.pid)
                    .join(Task, Task.locked_by == RegisteredWorker.id)
                    .where(Task.status == TaskStatus.RUNNING)
                    .limit(1)
                )
            return pid or 0

        victim = wait_until(busy_pid, 30, message="a worker process running a task")
        os.kill(victim, signal.SIGKILL)

        supervisor.wait_for_log(f"(pid {victim}) was killed by SIGKILL after", timeout=30)
        supervisor.wait_for_log("restarting it in", timeout=5)
        after = _wait_registered(supervisor, session_factory, 2)
        assert victim not in after
        assert len(after - first) == 1  # the replacement
        wait_until(lambda: _unfinished(session_factory) == 0, 120, message="every task to finish")
        assert _stop(supervisor) == 0

    _check_every_task_ran_once(session_factory, count)
    with session_factory() as session:
        lost = session.scalars(select(TaskError.exception_type)).all()
    # The attempts the killed process was running were rescued, and recorded.
    assert "sqla_pgotask.WorkerLost" in lost


@pytest.mark.slow
@linux_only
def test_second_signal_kills_the_worker_processes(
    database_url: str,
    ledger_engine: Engine,
    session_factory: sessionmaker[Session],
    tmp_path: Path,
) -> None:
    with _supervisor(
        database_url, tmp_path, "--concurrency", "1", "--shutdown-grace", "120"
    ) as supervisor:
        pids = _wait_registered(supervisor, session_factory, 2)
        _enqueue(session_factory, 1, sleep=120)
        wait_until(
            lambda: _count(session_factory, TaskStatus.RUNNING) == 1, 30, message="a running task"
        )
        supervisor.send(signal.SIGTERM)
        supervisor.wait_for_log("SIGTERM: stopping the worker processes", timeout=10)
        assert supervisor.alive()  # waiting for the running task
        supervisor.send(signal.SIGTERM)
        assert supervisor.wait(30) == 128 + signal.SIGTERM
        assert "second SIGTERM: killing" in supervisor.log()
        assert all(process_gone(pid) for pid in pids)


@pytest.mark.slow
@linux_only
def test_worker_processes_exit_when_the_supervisor_is_killed(
    database_url: str,
    ledger_engine: Engine,
    session_factory: sessionmaker[Session],
    tmp_path: Path,
) -> None:
    with _supervisor(database_url, tmp_path, "--concurrency", "1") as supervisor:
        pids = _wait_registered(supervisor, session_factory, 2)
        supervisor.process.kill()
        supervisor.wait(10)
        for pid in pids:
            _wait_gone(pid, 60)
        # They stopped gracefully (SIGTERM from the kernel), unregistering themselves.
        assert _registered_pids(session_factory) == set()
        assert supervisor.log().count("SIGTERM: stopping after in-flight tasks") == 2


@pytest.mark.slow
@linux_only
def test_crash_looping_worker_processes_back_off(
    database_url: str,
    ledger_engine: Engine,
    session_factory: sessionmaker[Session],
    tmp_path: Path,
) -> None:
    # A poison task SIGKILLs whichever worker process runs it, until its
    # attempts are used up; then it ends failed and the processes keep running.
    with _supervisor(database_url, tmp_path, "--concurrency", "1") as supervisor:
        _wait_registered(supervisor, session_factory, 2)
        with session_factory.begin() as session:
            poison = Task(kind="poison", payload={"poison": True})
            session.add(poison)
            session.flush()
            poison_id = poison.id
        wait_until(lambda: _unfinished(session_factory) == 0, 120, message="the poison task to end")
        with session_factory() as session:
            task = session.get(Task, poison_id)
            assert task is not None
            assert (task.status, task.attempts) == (TaskStatus.FAILED, POISON_MAX_ATTEMPTS)
        _wait_registered(supervisor, session_factory, 2)  # both running again
        log = supervisor.log()
        # One kill per attempt (fewer only if a loaded machine made a live
        # worker look dead, which also uses up an attempt), each one restarted.
        kills = log.count("was killed by SIGKILL")
        assert 1 <= kills <= POISON_MAX_ATTEMPTS

        # Each slot waits twice as long after each quick crash.
        delays: dict[str, list[float]] = {}
        for slot, delay in _RESTART.findall(log):
            delays.setdefault(slot, []).append(float(delay))
        assert sum(len(d) for d in delays.values()) == kills
        for sequence in delays.values():
            assert sequence == [restart_delay(n) for n in range(1, len(sequence) + 1)]
        assert _stop(supervisor) == 0
