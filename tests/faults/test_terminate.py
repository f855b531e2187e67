"""Scenario 3: ``pg_terminate_backend`` of every worker connection, again and again.

Every 0.5 s, six times, the test terminates every other client backend of
the database: the workers' pooled connections (mid-claim, mid-handler,
mid-commit or idle), their LISTEN connections and their heartbeat
connections.  The workers must reconnect on their own.
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

TASKS = 3_000
WORKERS = 3
ROUNDS = 6
EVERY = 0.5


def test_terminate_every_worker_connection(fault_db: str, tmp_path: Path) -> None:
    terminated: list[int] = []
    rounds: list[tuple[float, list[int]]] = []
    with Probe(fault_db) as probe, stopwatch() as elapsed:
        with Fleet(fault_db, tmp_path, "--concurrency", "4") as fleet:
            fleet.start(WORKERS)
            probe.enqueue(TASKS)
            wait_for(
                lambda: probe.count("status = 'succeeded'") >= TASKS // 10,
                30,
                message="the run to get going",
            )
            for _ in range(ROUNDS):
                in_flight = probe.running_ids()
                at = time.time()
                terminated.append(probe.terminate())
                rounds.append((at, in_flight))
                time.sleep(EVERY)  # fault timing
            wait_for(
                lambda: probe.unfinished() == 0, 90, interval=0.1, message="every task to finish"
            )
            run_time = elapsed()
            survivors = len(fleet.alive)
            codes = fleet.stop()
        resumed = []
        in_flight_done = []
        for at, in_flight in rounds:
            first = probe.first_finished_after(at)
            if first is not None:
                resumed.append(first - at)
            done = probe.done_at(in_flight)
            if done is not None:
                in_flight_done.append(max(0.0, done - at))
        check = check_ledger(probe)
    report(
        ScenarioResult(
            scenario="3. terminate all worker backends",
            tasks=check.tasks,
            faults=ROUNDS,
            lost=check.lost,
            duplicated=check.duplicated,
            recover_s=max(resumed) if resumed else None,
            total_s=run_time,
            recover_what="termination to the next task done, worst round",
            extra={
                "backends_terminated": sum(terminated),
                "in_flight_done_max_s": round(max(in_flight_done, default=0.0), 2),
                "rerun": check.rerun,
                "max_attempt": check.max_attempts_seen,
                "errors": check.errors_by_type,
            },
        )
    )
    check.assert_clean(TASKS)
    assert survivors == WORKERS, "a worker process died"
    assert codes == [0] * WORKERS
