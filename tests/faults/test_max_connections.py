"""Scenario 8: every connection slot taken, while a worker starts and while it runs.

The test starts a server of its own with ``max_connections=24`` and
``superuser_reserved_connections=3``.  The worker connects as an ordinary
role; the test's probe connects as the superuser, so it still gets in when
the ordinary slots are gone.  Idle connections of the worker's role
(:class:`~tests.helpers.faults.SlotHog`, on another database of the same
server) take every slot that is free:

1. **before the worker starts:** it must wait, saying why in its log, and
   start once slots are free, rather than exit (a supervisor would restart
   it in a loop) or claim anything meanwhile;
2. **while it runs:** its own connections (LISTEN, heartbeat, claim, the
   handlers' pooled ones) are already open, so it keeps working;
3. **while it runs, and its connections break:** the test freezes the
   worker (SIGSTOP) for the moment it takes to terminate every backend of
   the worker and take the freed slots too, then lets it go on (SIGCONT).
   Nothing it does can connect until the slots are released, longer than
   its lease; then it must recover by itself.

Nothing may be lost or committed twice.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, make_url
from sqlalchemy.orm import sessionmaker

from sqla_pgotask import Scheduler
from sqla_pgotask.embedded import EmbeddedPostgres
from sqla_pgotask.worker.threaded import WorkerStats
from tests.helpers.faults import (
    Fleet,
    Probe,
    ScenarioResult,
    SlotHog,
    app_database,
    check_ledger,
    report,
    stopwatch,
    url_for,
    wait_for,
)

pytestmark = pytest.mark.slow

MAX_CONNECTIONS = 24
RESERVED = 3
#: Tasks of each phase; each sleeps a few milliseconds, so that the run lasts.
TASKS = 1_500
TASK_SLEEP = 0.004
#: How long the slots stay taken in each phase (the starved one exceeds the lease of 2 s).
WAIT_AT_START = 2.0
FULL_WHILE_RUNNING = 1.5
STARVED = 3.0
#: What the worker logs while it waits at start.
WAITING_LINE = "no connection slot free"


@pytest.fixture(scope="module")
def small_server() -> Iterator[EmbeddedPostgres]:
    """A server with few connection slots, for this module alone."""
    settings = {"max_connections": MAX_CONNECTIONS, "superuser_reserved_connections": RESERVED}
    with EmbeddedPostgres(settings=settings) as server:
        yield server


def _enqueue(probe: Probe, count: int) -> None:
    probe.enqueue(count, payload={"sleep": TASK_SLEEP})


def test_max_connections_exhausted(small_server: EmbeddedPostgres, tmp_path: Path) -> None:
    app_url = app_database(small_server.url, "fault_slots_run")
    # The hog's connections go to another database, so Probe.terminate spares them.
    hog_url = make_url(app_url).set(database="postgres").render_as_string(hide_password=False)
    with (
        Probe(url_for(small_server.url, "fault_slots_run")) as probe,
        SlotHog(hog_url) as hog,
        Fleet(app_url, tmp_path, "--concurrency", "4") as fleet,
        stopwatch() as elapsed,
    ):
        _enqueue(probe, TASKS)
        total = TASKS
        # 1. No slot free when the worker starts.
        held_at_start = hog.fill()
        worker, stopped = fleet.spawn(), fleet.spawn()
        worker.wait_for_log(WAITING_LINE, 30)
        stopped.wait_for_log(WAITING_LINE, 30)
        # A stop signal ends the wait: nothing was claimed, nothing to wait for.
        stopped.send(signal.SIGTERM)
        assert stopped.wait(10) == 0
        assert "worker stopped before it started" in stopped.log()
        time.sleep(WAIT_AT_START)
        waiting_log = worker.log()
        assert worker.alive(), f"the worker exited while waiting for a slot:\n{waiting_log}"
        assert " starting: kinds=" not in waiting_log
        assert probe.count("attempts > 0") == 0, "the worker claimed without a connection slot"
        assert probe.scalar("SELECT count(*) FROM pgotask_worker") == 0
        freed_at_start = hog.release()
        worker.wait_started(30)
        first_start = wait_for(
            lambda: probe.scalar("SELECT min(started_at) FROM pgotask_task"),
            30,
            message="the first task to start",
        )
        start_delay = first_start.timestamp() - freed_at_start

        # 2. The slots are taken again while the worker runs on the connections it holds.
        wait_for(lambda: probe.count("status = 'succeeded'") >= 100, 30, message="the run")
        _enqueue(probe, TASKS)
        total += TASKS
        full_since = time.time()
        held_while_running = hog.fill()
        time.sleep(FULL_WHILE_RUNNING)
        done_while_full = probe.count(
            "finished_at > to_timestamp(:t) AND status = 'succeeded'", t=full_since
        )
        hog.release()

        # 3. Its connections break while every slot is taken.
        if probe.unfinished() < TASKS // 2:
            _enqueue(probe, TASKS)
            total += TASKS
        hog.fill()
        worker.send(signal.SIGSTOP)
        try:
            terminated = probe.terminate()
            wait_for(lambda: not probe.backends(), 10, message="the worker's backends to exit")
            hog.fill()
        finally:
            worker.send(signal.SIGCONT)
        starved_since = time.time()
        time.sleep(STARVED)
        done_while_starved = probe.count("finished_at > to_timestamp(:t)", t=starved_since + 0.5)
        assert worker.alive(), "the worker died while it could not connect"
        freed = hog.release()
        wait_for(lambda: probe.unfinished() == 0, 60, interval=0.1, message="every task to finish")
        run_time = elapsed()
        resumed = probe.first_finished_after(freed)
        codes = fleet.stop()
        log = worker.log()
        check = check_ledger(probe)
    report(
        ScenarioResult(
            scenario="8. max_connections exhausted",
            tasks=check.tasks,
            faults=3,
            lost=check.lost,
            duplicated=check.duplicated,
            recover_s=None if resumed is None else resumed - freed,
            total_s=run_time,
            recover_what="slots freed to the next task done, after the starved phase",
            extra={
                "slots_held": [held_at_start, held_while_running],
                "start_after_free_s": round(start_delay, 2),
                "done_while_full": done_while_full,
                "backends_terminated": terminated,
                "done_while_starved": done_while_starved,
                "rerun": check.rerun,
                "max_attempt": check.max_attempts_seen,
                "errors": check.errors_by_type,
            },
        )
    )
    check.assert_clean(total)
    assert codes == [0]
    assert len(fleet.all) == 2 and not fleet.alive
    assert done_while_full > 0, "the worker stopped while it held its connections"
    assert done_while_starved == 0, "the worker finished tasks without any connection"
    # The worker said why it could not go on.
    assert "remaining connection slots are reserved" in log


def test_stop_ends_the_wait_for_a_slot(
    small_server: EmbeddedPostgres, caplog: pytest.LogCaptureFixture
) -> None:
    app_url = app_database(small_server.url, "fault_slots_stop")
    hog_url = make_url(app_url).set(database="postgres").render_as_string(hide_password=False)
    engine = create_engine(app_url)
    scheduler = Scheduler(sessionmaker(engine))
    scheduler.handler("noop")(lambda session, task: None)
    returned: list[WorkerStats] = []
    try:
        with SlotHog(hog_url) as hog:
            hog.fill()
            with caplog.at_level(logging.WARNING, logger="sqla_pgotask.worker"):
                thread = threading.Thread(target=lambda: returned.append(scheduler.run()))
                thread.start()
                wait_for(lambda: WAITING_LINE in caplog.text, 10, message="the wait to begin")
                scheduler.stop()
                thread.join(5)
            assert not thread.is_alive(), "run() went on waiting after stop()"
            # One line per retry, saying what the server said.
            assert "remaining connection slots are reserved" in caplog.text
    finally:
        engine.dispose()
    assert returned and returned[0].total == 0
