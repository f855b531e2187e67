"""Scenario 4: the LISTEN connections are killed; tasks still start, wake-ups come back.

Only the backends whose last query is ``LISTEN pgotask...`` are terminated
(the pooled and heartbeat connections are left alone).  The enqueue-to-start
latency of single tasks (``started_at - created_at``, both from the
database clock) is measured before, right after each kill (the notification
is sent while nobody listens) and once every listener has reconnected.

A killed listener reconnects (after 0.1 s) and wakes its worker, since a
notification may have been missed; so, last, the listeners' backends are
*stalled* (SIGSTOP: the connection looks healthy but delivers nothing, like
a dead network path) to show that polling alone still starts tasks.
"""

from __future__ import annotations

import datetime as dt
import os
import signal
import statistics
import time
from pathlib import Path

import pytest

from tests.helpers.faults import (
    Fleet,
    Probe,
    ScenarioResult,
    check_ledger,
    report,
    stopwatch,
    summary,
    wait_for,
)

pytestmark = pytest.mark.slow

WORKERS = 2
POLL_INTERVAL = 0.5
SAMPLES = 10
KILLS = 8
LISTEN_LIKE = "LISTEN pgotask%"


def _latency(probe: Probe) -> float:
    """Enqueue one task, wait until it succeeded, return its enqueue-to-start latency."""
    task_id = probe.enqueue_one()
    wait_for(
        lambda: probe.count("id = :id AND status = 'succeeded'", id=task_id),
        10,
        interval=0.01,
        message=f"task {task_id} to run",
    )
    latency: float = probe.scalar(
        "SELECT extract(epoch FROM started_at - created_at)::float FROM pgotask_task "
        "WHERE id = :id",
        id=task_id,
    )
    return latency


def _listening_again(probe: Probe) -> float:
    """Wait until every worker LISTENs again; return when the last one started to."""
    wait_for(
        lambda: len(probe.backends(LISTEN_LIKE)) == WORKERS,
        10,
        interval=0.01,
        message="every worker to LISTEN again",
    )
    last: dt.datetime = probe.scalar(
        "SELECT max(state_change) FROM pg_stat_activity "
        "WHERE datname = current_database() AND query LIKE :pattern",
        pattern=LISTEN_LIKE,
    )
    return last.timestamp()


def test_listen_connection_killed(fault_db: str, tmp_path: Path) -> None:
    with Probe(fault_db) as probe, stopwatch() as elapsed:
        with Fleet(
            fault_db, tmp_path, "--concurrency", "2", "--poll-interval", str(POLL_INTERVAL)
        ) as fleet:
            fleet.start(WORKERS)
            wait_for(
                lambda: len(probe.backends(LISTEN_LIKE)) == WORKERS,
                10,
                message="every worker to LISTEN",
            )
            before = [_latency(probe) for _ in range(SAMPLES)]
            killed = 0
            gap = []
            reconnect = []
            for _ in range(KILLS):
                at = time.time()
                killed += probe.terminate(LISTEN_LIKE)
                gap.append(_latency(probe))  # notified while no one listens
                reconnect.append(_listening_again(probe) - at)
            after = [_latency(probe) for _ in range(SAMPLES)]
            stalled_pids = probe.backends(LISTEN_LIKE)
            for pid in stalled_pids:
                os.kill(pid, signal.SIGSTOP)
            try:
                stalled = [_latency(probe) for _ in range(SAMPLES // 2)]
            finally:
                for pid in stalled_pids:
                    os.kill(pid, signal.SIGCONT)
            run_time = elapsed()
            survivors = len(fleet.alive)
            codes = fleet.stop()
        check = check_ledger(probe)
    tasks = 2 * SAMPLES + KILLS + SAMPLES // 2
    report(
        ScenarioResult(
            scenario="4. LISTEN connection killed",
            tasks=check.tasks,
            faults=killed,
            lost=check.lost,
            duplicated=check.duplicated,
            recover_s=max(reconnect),
            total_s=run_time,
            recover_what="kill to LISTEN again, worst kill",
            extra={
                "poll_s": POLL_INTERVAL,
                "latency_before_s": summary(before),
                "latency_gap_s": summary(gap),
                "latency_after_s": summary(after),
                "latency_stalled_s": summary(stalled),
                "reconnect_s": summary(reconnect),
            },
        )
    )
    check.assert_clean(tasks)
    assert survivors == WORKERS
    assert codes == [0] * WORKERS
    assert killed >= KILLS  # at least one LISTEN backend each time
    # Missed notifications are covered (reconnect wake-up or poll): bounded by the poll.
    assert max(gap) < POLL_INTERVAL + 0.5, gap
    # Wake-ups work before the faults and again after the reconnect: well under the poll.
    assert statistics.median(before) < 0.1, before
    assert statistics.median(after) < 0.1, after
    assert max(after) < 0.25, after
    # A listener that hears nothing: polling alone starts the tasks, within the poll interval.
    assert max(stalled) < POLL_INTERVAL + 0.25, stalled
