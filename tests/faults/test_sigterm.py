"""Scenario 6: SIGTERM to every worker in the middle of a run (guarantee 7).

In-flight tasks finish, nothing is lost, claimed-but-unstarted tasks go back
without consuming an attempt: after the stop, every succeeded task has
``attempts == 1`` and every pending one ``attempts == 0``; new workers then
finish the run, still with one attempt per task.
"""

from __future__ import annotations

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
    wait_for,
)

pytestmark = pytest.mark.slow

TASKS = 600
WORKERS = 2
CONCURRENCY = 4
#: Long enough that a handler is running at any time (the handlers sleep).
TASK_SECONDS = 0.05


def test_sigterm_mid_run(fault_db: str, tmp_path: Path) -> None:
    with Probe(fault_db) as probe, stopwatch() as elapsed:
        with Fleet(fault_db, tmp_path, "--concurrency", str(CONCURRENCY)) as fleet:
            workers = fleet.start(WORKERS)
            probe.enqueue(TASKS, payload={"sleep": TASK_SECONDS})
            wait_for(
                lambda: probe.count("status = 'succeeded'") >= TASKS // 4,
                30,
                message="a quarter of the tasks to succeed",
            )
            in_flight = probe.running_ids()
            at = time.time()
            codes = fleet.stop()
            drained = time.time() - at
            after_stop = probe.rows(
                "SELECT status, attempts, count(*), count(started_at) FROM pgotask_task "
                "GROUP BY status, attempts ORDER BY status, attempts"
            )
            errors_at_stop = probe.scalar("SELECT count(*) FROM pgotask_task_error")
            in_flight_status = probe.rows(
                "SELECT status, count(*) FROM pgotask_task WHERE id = ANY(:ids) GROUP BY status",
                ids=in_flight,
            )
            released = sum(int(n) for w in workers for n in _released(w.log()))
            fleet.start(WORKERS)
            wait_for(
                lambda: probe.unfinished() == 0, 60, interval=0.1, message="every task to finish"
            )
            run_time = elapsed()
            final_codes = fleet.stop()
        check = check_ledger(probe)
    states = {
        (status, attempts): (count, started) for status, attempts, count, started in after_stop
    }
    done_at_stop = states.get(("succeeded", 1), (0, 0))[0]
    report(
        ScenarioResult(
            scenario="6. SIGTERM mid-run",
            tasks=check.tasks,
            faults=WORKERS,
            lost=check.lost,
            duplicated=check.duplicated,
            recover_s=drained,
            total_s=run_time,
            recover_what="SIGTERM to all workers exited",
            extra={
                "in_flight_at_stop": len(in_flight),
                "succeeded_at_stop": done_at_stop,
                "released_unstarted": released,
                "max_attempt": check.max_attempts_seen,
            },
        )
    )
    assert codes == [0] * WORKERS
    # After the stop: only succeeded tasks (one attempt each) and untouched pending ones.
    assert set(states) <= {("succeeded", 1), ("pending", 0)}, after_stop
    assert states.get(("pending", 0), (0, 0))[1] == 0, "a pending task kept its started_at"
    assert errors_at_stop == 0
    # Claimed tasks are 'running' in the table whether their handler had started
    # or they waited their turn in the worker: the started ones finished, the
    # others went back untouched.
    assert set(dict(in_flight_status)) <= {"succeeded", "pending"}, in_flight_status
    assert dict(in_flight_status).get("succeeded", 0) >= 1, in_flight_status
    check.assert_clean(TASKS)
    assert check.max_attempts_seen == 1
    assert final_codes == [0] * WORKERS


def _released(log: str) -> list[str]:
    marker = "released "
    return [
        line.split(marker, 1)[1].split()[0]
        for line in log.splitlines()
        if marker in line and "claimed tasks that had not started" in line
    ]
