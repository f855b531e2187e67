"""Prometheus: ``sqla_pgotask.prometheus`` in-process, and ``pgotask worker --metrics-port``.

The in-process tests give every scheduler a registry of its own
(prometheus_client's default one is process-wide); the command-line tests
run the real ``pgotask worker tests.helpers.apps.ledger:scheduler`` and scrape it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Engine, func, select, text
from sqlalchemy.orm import Session, sessionmaker

from sqla_pgotask import ConfigurationError, Scheduler, Task, TaskStatus, prometheus
from sqla_pgotask.worker.supervisor import ChildFailedError, Supervisor
from tests.helpers import add_tasks, process_gone, wait_until
from tests.helpers.apps.ledger import LedgerEntry, create_ledger
from tests.helpers.processes import (
    LEDGER_SCHEDULER,
    PROJECT_ROOT,
    WorkerProcess,
    pgotask_env,
    pgotask_worker,
    run_pgotask,
)

STARTED = "pgotask_attempt_started_total"
FINISHED = "pgotask_attempt_finished_total"
DURATION_COUNT = "pgotask_attempt_duration_seconds_count"
DURATION_SUM = "pgotask_attempt_duration_seconds_sum"
QUEUE_TASKS = "pgotask_queue_tasks"
OLDEST_DUE = "pgotask_queue_oldest_due_age_seconds"

_SERVING = re.compile(r"serving metrics on http://([\d.]+):(\d+)/metrics")
_METRICS_DIR = re.compile(r"--metrics-dir=(\S+)")
_CHILD_STARTED = re.compile(r"worker process \d+/\d+ started \(pid (\d+)\)")

Labels = frozenset[tuple[str, str]]


class Boom(Exception):
    """A handler's failure."""


def labels(**values: str) -> Labels:
    return frozenset(values.items())


def _scheduler(session_factory: sessionmaker[Session]) -> Scheduler:
    """A scheduler with ``ok`` (succeeds), ``boom`` (fails for good) and ``later`` (mail queue)."""
    scheduler = Scheduler(session_factory)

    @scheduler.handler("ok")
    def ok(session: Session, task: Task) -> object:
        return None

    @scheduler.handler("boom", max_attempts=1)
    def boom(session: Session, task: Task) -> object:
        raise Boom("no")

    @scheduler.handler("later", queue="mail")
    def later(session: Session, task: Task) -> object:
        return None

    return scheduler


def _in_an_hour() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1)


def _value(registry: CollectorRegistry, name: str, **label_values: str) -> float | None:
    return registry.get_sample_value(name, label_values)


# -- in-process ---------------------------------------------------------------------


def test_attempts_and_queue_gauges(session_factory: sessionmaker[Session]) -> None:
    registry = CollectorRegistry()
    scheduler = _scheduler(session_factory)
    prometheus.instrument(scheduler, registry=registry, queue_metrics_interval=0)
    assert prometheus.is_instrumented(scheduler)
    add_tasks(
        session_factory,
        Task(kind="ok"),
        Task(kind="ok"),
        Task(kind="ok"),
        Task(kind="boom"),
        Task(kind="later", queue="mail", run_at=_in_an_hour()),
    )

    # Before running: the gauges read the database at every collection (interval 0).
    def tasks(queue: str, kind: str, state: str) -> float | None:
        return _value(registry, QUEUE_TASKS, queue=queue, kind=kind, state=state)

    assert tasks("default", "ok", "due") == 3
    assert tasks("default", "ok", "scheduled") == 0
    assert tasks("default", "ok", "running") == 0
    assert tasks("default", "boom", "due") == 1
    assert tasks("mail", "later", "due") == 0
    assert tasks("mail", "later", "scheduled") == 1
    oldest = _value(registry, OLDEST_DUE, queue="default", kind="ok")
    assert oldest is not None
    assert 0 <= oldest < 60
    assert _value(registry, OLDEST_DUE, queue="mail", kind="later") == 0
    assert _value(registry, STARTED, kind="ok", queue="default") is None

    assert scheduler.run_until_idle() == 4

    assert _value(registry, STARTED, kind="ok", queue="default") == 3
    assert _value(registry, STARTED, kind="boom", queue="default") == 1
    assert _value(registry, STARTED, kind="later", queue="mail") is None
    ok = {"kind": "ok", "queue": "default", "outcome": "succeeded"}
    failed = {"kind": "boom", "queue": "default", "outcome": "failed"}
    assert registry.get_sample_value(FINISHED, ok) == 3
    assert registry.get_sample_value(FINISHED, failed) == 1
    assert registry.get_sample_value(FINISHED, {**ok, "outcome": "failed"}) is None
    assert registry.get_sample_value(DURATION_COUNT, ok) == 3
    assert registry.get_sample_value(DURATION_COUNT, failed) == 1
    total = registry.get_sample_value(DURATION_SUM, ok)
    assert total is not None
    assert 0 <= total < 30
    # Every attempt falls in the histogram's +Inf bucket.
    assert (
        registry.get_sample_value("pgotask_attempt_duration_seconds_bucket", {**ok, "le": "+Inf"})
        == 3
    )

    # After running: the finished (queue, kind)s fall to 0 instead of going missing.
    for state in ("due", "scheduled", "running"):
        assert tasks("default", "ok", state) == 0
        assert tasks("default", "boom", state) == 0
    assert _value(registry, OLDEST_DUE, queue="default", kind="ok") == 0
    assert tasks("mail", "later", "scheduled") == 1


def test_instrumenting_twice_is_an_error(session_factory: sessionmaker[Session]) -> None:
    registry = CollectorRegistry()
    scheduler = _scheduler(session_factory)
    assert not prometheus.is_instrumented(scheduler)
    prometheus.instrument(scheduler, registry=registry)
    with pytest.raises(ConfigurationError, match="already instrumented"):
        prometheus.instrument(scheduler, registry=registry)
    with pytest.raises(ConfigurationError, match="already instrumented"):
        prometheus.instrument(scheduler, registry=CollectorRegistry())


def test_negative_queue_metrics_interval_is_an_error(
    session_factory: sessionmaker[Session],
) -> None:
    scheduler = _scheduler(session_factory)
    with pytest.raises(ConfigurationError, match="must not be negative"):
        prometheus.instrument(scheduler, registry=CollectorRegistry(), queue_metrics_interval=-1)
    assert not prometheus.is_instrumented(scheduler)


def test_two_schedulers_share_a_registry(session_factory: sessionmaker[Session]) -> None:
    registry = CollectorRegistry()
    first = _scheduler(session_factory)
    second = _scheduler(session_factory)
    prometheus.instrument(first, registry=registry, queue_metrics_interval=0)
    prometheus.instrument(second, registry=registry, queue_metrics_interval=0)
    assert prometheus.is_instrumented(first)
    assert prometheus.is_instrumented(second)

    add_tasks(session_factory, Task(kind="ok"), Task(kind="ok"))
    assert first.run_until_idle(max_tasks=1) == 1
    assert second.run_until_idle() == 1
    add_tasks(session_factory, Task(kind="boom"))
    assert second.run_until_idle() == 1

    ok = {"kind": "ok", "queue": "default", "outcome": "succeeded"}
    assert registry.get_sample_value(FINISHED, ok) == 2
    assert registry.get_sample_value(DURATION_COUNT, ok) == 2
    assert _value(registry, FINISHED, kind="boom", queue="default", outcome="failed") == 1
    # One queue collector, not one per scheduler.
    families = [m.name for m in registry.collect()]
    assert families.count(QUEUE_TASKS) == 1
    assert families.count(OLDEST_DUE) == 1
    assert _value(registry, QUEUE_TASKS, queue="default", kind="ok", state="due") is None


def test_a_later_scheduler_adds_the_queue_gauges_the_first_left_out(
    session_factory: sessionmaker[Session],
) -> None:
    registry = CollectorRegistry()
    prometheus.instrument(_scheduler(session_factory), registry=registry, queue_metrics=False)
    assert QUEUE_TASKS not in {m.name for m in registry.collect()}
    prometheus.instrument(_scheduler(session_factory), registry=registry, queue_metrics_interval=0)
    add_tasks(session_factory, Task(kind="later", queue="mail", run_at=_in_an_hour()))
    assert _value(registry, QUEUE_TASKS, queue="mail", kind="later", state="scheduled") == 1
    prometheus.instrument(_scheduler(session_factory), registry=registry)  # no second collector
    assert [m.name for m in registry.collect()].count(QUEUE_TASKS) == 1


def test_without_queue_metrics(session_factory: sessionmaker[Session]) -> None:
    registry = CollectorRegistry()
    scheduler = _scheduler(session_factory)
    prometheus.instrument(scheduler, registry=registry, queue_metrics=False)
    add_tasks(
        session_factory, Task(kind="ok"), Task(kind="later", queue="mail", run_at=_in_an_hour())
    )
    assert scheduler.run_until_idle() == 1

    assert _value(registry, FINISHED, kind="ok", queue="default", outcome="succeeded") == 1
    names = {metric.name for metric in registry.collect()}
    assert QUEUE_TASKS not in names
    assert OLDEST_DUE not in names
    assert _value(registry, QUEUE_TASKS, queue="mail", kind="later", state="scheduled") is None


def test_queue_gauges_are_cached_for_the_interval(
    session_factory: sessionmaker[Session],
) -> None:
    registry = CollectorRegistry()
    scheduler = _scheduler(session_factory)
    prometheus.instrument(scheduler, registry=registry, queue_metrics_interval=3600)
    add_tasks(session_factory, Task(kind="ok"))
    assert _value(registry, QUEUE_TASKS, queue="default", kind="ok", state="due") == 1
    add_tasks(session_factory, Task(kind="ok"))
    # Not read again within the hour.
    assert _value(registry, QUEUE_TASKS, queue="default", kind="ok", state="due") == 1


def test_stuck_slots_gauge_reports_each_worker_and_falls_to_zero(
    session_factory: sessionmaker[Session],
) -> None:
    registry = CollectorRegistry()
    scheduler = _scheduler(session_factory)
    prometheus.instrument(scheduler, registry=registry, queue_metrics_interval=0)
    with session_factory.begin() as session:
        session.execute(
            text(
                "INSERT INTO pgotask_worker (id, host, pid, node, kinds, concurrency, stuck_slots) "
                "VALUES ('w1', 'h', 1, 'n', '{ok}', 4, 2), ('w2', 'h', 2, 'n', '{ok}', 4, 0)"
            )
        )
    stuck = "pgotask_worker_stuck_slots"
    assert _value(registry, stuck, worker="w1") == 2
    assert _value(registry, stuck, worker="w2") == 0
    with session_factory.begin() as session:
        session.execute(text("DELETE FROM pgotask_worker WHERE id = 'w1'"))
    assert _value(registry, stuck, worker="w1") == 0  # gone: falls to 0, then out
    assert _value(registry, stuck, worker="w1") is None


def _scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        body: bytes = response.read()
    return body.decode()


def _samples(text: str, name: str) -> dict[Labels, float]:
    """The values of the samples called ``name`` in an exposition, by their labels."""
    return {
        frozenset(sample.labels.items()): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    }


def test_start_http_server_serves_the_registry(session_factory: sessionmaker[Session]) -> None:
    registry = CollectorRegistry()
    scheduler = _scheduler(session_factory)
    prometheus.instrument(scheduler, registry=registry, queue_metrics_interval=0)
    add_tasks(
        session_factory,
        Task(kind="ok"),
        Task(kind="ok"),
        Task(kind="later", queue="mail", run_at=_in_an_hour()),
    )
    assert scheduler.run_until_idle() == 2

    server, thread = prometheus.start_http_server(0, "127.0.0.1", registry)
    try:
        assert thread.daemon
        text = _scrape(f"http://127.0.0.1:{server.server_port}/metrics")
    finally:
        server.shutdown()
        server.server_close()
    assert "# TYPE pgotask_attempt_finished_total counter" in text
    assert "# TYPE pgotask_attempt_duration_seconds histogram" in text
    assert "# TYPE pgotask_queue_tasks gauge" in text
    ok = labels(kind="ok", queue="default")
    assert _samples(text, STARTED) == {ok: 2}
    assert _samples(text, FINISHED) == {ok | labels(outcome="succeeded"): 2}
    assert _samples(text, DURATION_COUNT) == {ok | labels(outcome="succeeded"): 2}
    queue = _samples(text, QUEUE_TASKS)
    assert queue[labels(queue="mail", kind="later", state="scheduled")] == 1
    assert queue[labels(queue="mail", kind="later", state="due")] == 0
    assert _samples(text, OLDEST_DUE) == {labels(queue="mail", kind="later"): 0}


def test_start_http_server_on_a_port_in_use_raises_oserror() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        with pytest.raises(OSError):
            prometheus.start_http_server(port, "127.0.0.1", CollectorRegistry())


# -- the supervisor's on_exit -------------------------------------------------------


@pytest.mark.parametrize("fails", [False, True], ids=["ok", "on_exit raises"])
def test_supervisor_calls_on_exit_with_the_pid_of_an_exited_worker_process(
    fails: bool, caplog: pytest.LogCaptureFixture
) -> None:
    exited: list[int] = []

    def on_exit(pid: int) -> None:
        exited.append(pid)
        if fails:
            raise RuntimeError("on_exit broke")

    # A worker process that exits at once with a usage error (2): the supervisor gives up.
    supervisor = Supervisor(
        ["--log-level=WARNING", "worker", "nosuchmodule_pgotask_test:scheduler"],
        1,
        on_exit=on_exit,
    )
    with (
        caplog.at_level(logging.INFO, logger="sqla_pgotask.supervisor"),
        pytest.raises(ChildFailedError) as raised,
    ):
        supervisor.run()
    assert raised.value.code == 2
    pids = [int(pid) for pid in _CHILD_STARTED.findall(caplog.text)]
    assert len(pids) == 1
    assert exited == pids
    assert pids[0] != os.getpid()
    assert ("on_exit failed for worker process" in caplog.text) is fails


# -- pgotask worker: arguments ------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("70000", "a port is between 0 and 65535, not 70000"),
        ("-1", "a port is between 0 and 65535, not -1"),
        ("abc", "not a port number: 'abc'"),
    ],
)
@pytest.mark.parametrize("processes", ["1", "2"])
def test_bad_metrics_port(value: str, message: str, processes: str) -> None:
    done = run_pgotask(
        ["worker", LEDGER_SCHEDULER, "--processes", processes, f"--metrics-port={value}"], None
    )
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
    assert "usage: pgotask" in done.stderr


def test_empty_metrics_host() -> None:
    done = run_pgotask(["worker", LEDGER_SCHEDULER, "--metrics-port=0", "--metrics-host="], None)
    assert done.returncode == 2, done.stderr
    assert "metrics host" in done.stderr


_WITHOUT_PROMETHEUS = """
import sys


class NoPrometheus:
    def find_spec(self, name, path=None, target=None):
        if name == "prometheus_client" or name.startswith("prometheus_client."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, NoPrometheus())
import sqla_pgotask.cli

sys.exit(sqla_pgotask.cli.main(sys.argv[1:]))
"""


def _pgotask_without_prometheus(
    args: list[str], env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    """``pgotask *args`` in a process where prometheus_client cannot be imported."""
    return subprocess.run(
        [sys.executable, "-c", _WITHOUT_PROMETHEUS, *args],
        cwd=PROJECT_ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("processes", ["1", "2"])
def test_metrics_port_without_prometheus_client(processes: str, tmp_path: Path) -> None:
    unreachable = "postgresql+psycopg://postgres@127.0.0.1:1/x?connect_timeout=5"
    env = pgotask_env(unreachable)
    env["TMPDIR"] = str(tmp_path)
    done = _pgotask_without_prometheus(
        ["worker", LEDGER_SCHEDULER, "--processes", processes, "--metrics-port", "0"], env
    )
    assert done.returncode == 2, done.stderr
    assert "pip install 'sqla-pgotask[prometheus]'" in done.stderr
    assert "Traceback" not in done.stderr
    assert list(tmp_path.iterdir()) == []  # the supervisor made no metrics directory


def test_the_script_blocks_prometheus_client_only() -> None:
    """The same script without --metrics-port runs fine: only prometheus_client is missing."""
    done = _pgotask_without_prometheus(["worker", "--help"], pgotask_env(None))
    assert done.returncode == 0, done.stderr
    assert "--metrics-port" in done.stdout


# -- pgotask worker: real processes -------------------------------------------------


@pytest.fixture
def ledger_engine(engine: Engine) -> Engine:
    """The test database's engine, with the ledger application's table created."""
    create_ledger(engine)
    return engine


@pytest.fixture
def own_tmpdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty TMPDIR for the ``pgotask`` processes this test starts."""
    path = tmp_path / "tmp"
    path.mkdir()
    monkeypatch.setenv("TMPDIR", str(path))
    return path


def _metrics_url(worker: WorkerProcess) -> str:
    worker.wait_for_log("serving metrics on http://")
    match = _SERVING.search(worker.log())
    assert match is not None, worker.log()
    host, port = match.groups()
    assert host == "127.0.0.1"
    assert int(port) > 0
    return f"http://{host}:{port}/metrics"


def _ledger_rows(session_factory: sessionmaker[Session]) -> int:
    with session_factory() as session:
        return session.scalar(select(func.count()).select_from(LedgerEntry)) or 0


def _succeeded(session_factory: sessionmaker[Session]) -> int:
    with session_factory() as session:
        query = select(func.count()).select_from(Task).where(Task.status == TaskStatus.SUCCEEDED)
        return session.scalar(query) or 0


def _finished(text: str, **label_values: str) -> float:
    """The sum of ``pgotask_attempt_finished_total`` over the samples with these labels."""
    wanted = labels(**label_values)
    return sum(value for key, value in _samples(text, FINISHED).items() if wanted <= key)


def _scrape_when_finished(url: str, count: int) -> str:
    """The exposition at ``url`` once it counts ``count`` finished ledger attempts, else ""."""
    text = _scrape(url)
    return text if _finished(text, kind="ledger") == count else ""


@contextlib.contextmanager
def _supervisor(database_url: str, log_dir: Path, *args: str) -> Iterator[WorkerProcess]:
    """``pgotask worker --processes 2 *args``; no worker process outlives the test."""
    children: list[int] = []
    try:
        with pgotask_worker(
            database_url, log_dir, "--processes", "2", *args, name="supervisor"
        ) as supervisor:
            try:
                yield supervisor
            finally:
                children = [int(pid) for pid in _CHILD_STARTED.findall(supervisor.log())]
    finally:
        for pid in children:
            with contextlib.suppress(AssertionError):
                wait_until(partial(process_gone, pid), 20, message=f"process {pid} to exit")
            if not process_gone(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
def test_worker_serves_metrics(
    database_url: str,
    ledger_engine: Engine,
    session_factory: sessionmaker[Session],
    tmp_path: Path,
) -> None:
    count = 5
    with pgotask_worker(
        database_url, tmp_path, "--metrics-port", "0", "--metrics-host", "127.0.0.1"
    ) as worker:
        url = _metrics_url(worker)
        worker.wait_started()
        add_tasks(
            session_factory,
            *(Task(kind="ledger") for _ in range(count)),
            Task(kind="ledger", queue="later", run_at=_in_an_hour()),
        )
        wait_until(lambda: _succeeded(session_factory) == count, 30, message="the tasks to run")
        # Counted once the outcome committed: a moment after the database says so.
        text = wait_until(
            lambda: _scrape_when_finished(url, count),
            10,
            message=f"{count} finished attempts in the metrics",
        )
        assert _ledger_rows(session_factory) == count

        ledger = labels(kind="ledger", queue="default")
        assert _samples(text, STARTED) == {ledger: count}
        assert _samples(text, FINISHED) == {ledger | labels(outcome="succeeded"): count}
        assert _samples(text, DURATION_COUNT) == {ledger | labels(outcome="succeeded"): count}
        later = labels(queue="later", kind="ledger")
        queue = _samples(text, QUEUE_TASKS)
        assert queue[later | labels(state="scheduled")] == 1
        assert queue[later | labels(state="due")] == 0
        assert queue[later | labels(state="running")] == 0
        assert _samples(text, OLDEST_DUE)[later] == 0

        worker.send(signal.SIGTERM)
        assert worker.wait(timeout=30) == 0


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_supervisor_serves_the_metrics_of_its_worker_processes(
    database_url: str,
    ledger_engine: Engine,
    session_factory: sessionmaker[Session],
    tmp_path: Path,
    own_tmpdir: Path,
) -> None:
    count = 40
    # Before the worker processes start: their first read of the queue depth sees it.
    add_tasks(session_factory, Task(kind="ledger", queue="later", run_at=_in_an_hour()))
    with _supervisor(
        database_url, tmp_path, "--metrics-port", "0", "--metrics-host", "127.0.0.1"
    ) as supervisor:
        url = _metrics_url(supervisor)
        supervisor.wait_for_log("--metrics-dir=")
        match = _METRICS_DIR.search(supervisor.log())
        assert match is not None
        metrics_dir = Path(match.group(1))
        assert metrics_dir.parent == own_tmpdir
        assert metrics_dir.name.startswith("pgotask-metrics-")
        assert metrics_dir.is_dir()
        wait_until(
            lambda: supervisor.log().count(" starting: kinds=") == 2,
            30,
            message="2 worker processes to start",
        )

        add_tasks(session_factory, *(Task(kind="ledger") for _ in range(count)))
        wait_until(lambda: _succeeded(session_factory) == count, 60, message="the tasks to run")
        text = wait_until(
            lambda: _scrape_when_finished(url, count),
            10,
            message=f"{count} finished attempts in the metrics",
        )
        assert _finished(text, kind="ledger", queue="default", outcome="succeeded") == count
        started = _samples(text, STARTED)
        assert sum(started.values()) == count
        assert sum(_samples(text, DURATION_COUNT).values()) == count
        # The queue gauges, written by the worker processes (the most recent wins).
        later = labels(queue="later", kind="ledger")
        queue = _samples(text, QUEUE_TASKS)
        assert queue[later | labels(state="scheduled")] == 1
        assert queue[later | labels(state="due")] == 0
        assert [f.name for f in metrics_dir.iterdir()]  # the worker processes' files

        supervisor.send(signal.SIGTERM)
        assert supervisor.wait(timeout=60) == 0
        assert "all 2 worker processes stopped" in supervisor.log()
        assert not metrics_dir.exists()
    assert list(own_tmpdir.iterdir()) == []


def _bound_port() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


@pytest.mark.slow
@pytest.mark.parametrize("processes", ["1", "2"])
def test_metrics_port_in_use(processes: str, database_url: str, own_tmpdir: Path) -> None:
    with _bound_port() as sock:
        port = sock.getsockname()[1]
        done = run_pgotask(
            [
                "worker",
                LEDGER_SCHEDULER,
                "--processes",
                processes,
                "--metrics-port",
                str(port),
                "--metrics-host",
                "127.0.0.1",
            ],
            database_url,
        )
    assert done.returncode == 2, done.stderr
    assert f"pgotask: error: cannot serve metrics on 127.0.0.1:{port}" in done.stderr
    assert "Traceback" not in done.stderr
    assert "worker process 1/2 started" not in done.stderr
    assert list(own_tmpdir.iterdir()) == []  # the supervisor's directory is gone
