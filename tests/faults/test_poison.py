"""Scenario 5: a poison task that kills its worker (SIGKILL) every time it runs.

It must end ``failed`` after ``max_attempts`` (3) with one ``WorkerLost``
error per attempt, while the other tasks all succeed.  Dead workers are
reaped and replaced by the test, like a process supervisor would.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from tests.helpers.apps.faulty import POISON_MAX_ATTEMPTS
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

TASKS = 500
WORKERS = 2


def test_poison_task_ends_failed(fault_db: str, tmp_path: Path) -> None:
    with Probe(fault_db) as probe, stopwatch() as elapsed:
        with Fleet(fault_db, tmp_path, "--concurrency", "4") as fleet:
            fleet.start(WORKERS)
            probe.enqueue(TASKS // 2, payload={"sleep": 0.005})
            enqueued = time.time()
            poison_id = probe.enqueue_one("poison", {"poison": True})
            probe.enqueue(TASKS - TASKS // 2, payload={"sleep": 0.005})

            wait_for(
                lambda: probe.unfinished() == 0,
                60,
                interval=0.05,
                message="every task to finish",
                tick=lambda: fleet.respawn_dead(WORKERS),
            )
            run_time = elapsed()
            fleet.wait_started()
            codes = fleet.stop()
            deaths = sum(w.process.returncode == -signal.SIGKILL for w in fleet.all)
        poison = probe.rows(
            "SELECT status, attempts, max_attempts, finished_at FROM pgotask_task WHERE id = :id",
            id=poison_id,
        )[0]
        errors = probe.rows(
            "SELECT attempt, exception_type, message FROM pgotask_task_error "
            "WHERE task_id = :id ORDER BY attempt",
            id=poison_id,
        )
        check = check_ledger(probe)
        poison_rows = probe.scalar(
            "SELECT count(*) FROM fault_ledger WHERE task_id = :id", id=poison_id
        )
    report(
        ScenarioResult(
            scenario="5. poison task (kills its worker)",
            tasks=check.tasks + 1,
            faults=deaths,
            lost=check.lost,
            duplicated=check.duplicated,
            recover_s=poison.finished_at.timestamp() - enqueued,
            total_s=run_time,
            recover_what="enqueue to the poison task failed",
            extra={
                "poison_status": poison.status,
                "poison_attempts": poison.attempts,
                "poison_errors": len(errors),
                "others_rerun": check.rerun,
            },
        )
    )
    check.assert_clean(TASKS)
    assert (poison.status, poison.attempts, poison.max_attempts) == (
        "failed",
        POISON_MAX_ATTEMPTS,
        POISON_MAX_ATTEMPTS,
    )
    assert poison_rows == 0
    assert [e.attempt for e in errors] == list(range(1, POISON_MAX_ATTEMPTS + 1)), errors
    assert all(e.exception_type == "sqla_pgotask.WorkerLost" for e in errors), errors
    assert all("was lost during attempt" in e.message for e in errors), errors
    assert deaths == POISON_MAX_ATTEMPTS
    assert set(codes) == {0}
