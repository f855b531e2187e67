"""Scenario 1: ``kill -9`` of worker processes at random points during a run of thousands of tasks.

Killed workers are reaped and replaced at once, so the run completes.  The
tasks a killed worker held come back through the other workers' pid check
(same machine) within about ``maintenance_interval``, with the lost attempt
recorded as a ``WorkerLost`` error.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
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

TASKS = 3_000
WORKERS = 3
KILLS = 9
#: Tasks added when the backlog runs low before the last kill.
TOP_UP = 500


@dataclass
class Kill:
    pid: int
    at: float


def test_kill9_workers_repeatedly(fault_db: str, tmp_path: Path) -> None:
    seed = random.randrange(1 << 32)
    rng = random.Random(seed)
    kills: list[Kill] = []
    with Probe(fault_db) as probe, stopwatch() as elapsed:
        with Fleet(fault_db, tmp_path, "--concurrency", "4") as fleet:
            fleet.start(WORKERS)
            probe.enqueue(TASKS)
            total = TASKS
            while len(kills) < KILLS:
                if probe.unfinished() < TOP_UP:
                    # A fast machine: keep a backlog until every kill is done.
                    probe.enqueue(TOP_UP)
                    total += TOP_UP
                # Fault timing: a random point of the run, not a synchronisation.
                time.sleep(rng.uniform(0.15, 0.6))
                victim = rng.choice(fleet.alive)
                at = fleet.kill9(victim)
                kills.append(Kill(victim.pid, at))
                fleet.spawn()
            wait_for(
                lambda: probe.unfinished() == 0,
                60,
                interval=0.1,
                message="every task to finish",
                tick=lambda: fleet.respawn_dead(WORKERS),
            )
            run_time = elapsed()
            assert set(fleet.stop()) == {0}
        check = check_ledger(probe)
        # The tasks each killed worker held, from their WorkerLost errors
        # ("worker host:pid:xxx was lost during attempt N: its worker is gone; ...").
        lost = probe.rows(
            "SELECT split_part(message, ':', 2)::int AS pid, array_agg(task_id), "
            "max(created_at), array_agg(DISTINCT substring(message from ': (its [a-z ]+);')) "
            "FROM pgotask_task_error WHERE exception_type = 'sqla_pgotask.WorkerLost' "
            "GROUP BY 1"
        )
        by_pid = {row[0]: row for row in lost}
        rescue = []
        stranded_done = []
        for kill in kills:
            if kill.pid in by_pid:
                _, ids, rescued_at, _ = by_pid[kill.pid]
                rescue.append(max(0.0, rescued_at.timestamp() - kill.at))
                done = probe.done_at(ids)
                if done is not None:
                    stranded_done.append(max(0.0, done - kill.at))
    stranded = sum(len(row[1]) for row in lost)
    reasons = {reason for row in lost for reason in row[3]}
    report(
        ScenarioResult(
            scenario="1. kill -9 workers",
            tasks=check.tasks,
            faults=len(kills),
            lost=check.lost,
            duplicated=check.duplicated,
            recover_s=max(rescue) if rescue else None,
            total_s=run_time,
            recover_what="kill to its tasks pending again, worst kill",
            extra={
                "workers": WORKERS,
                "stranded": stranded,
                "rerun": check.rerun,
                "rescue_s": summary(rescue),
                "stranded_done_max_s": round(max(stranded_done, default=0.0), 2),
                "jobs_per_s": round(total / run_time),
                "seed": seed,
            },
        )
    )
    check.assert_clean(total)
    # Only killed workers lost tasks, and the pid check found them dead (on
    # this machine it does so before any lease expires).
    assert set(by_pid) <= {kill.pid for kill in kills}, by_pid
    assert reasons <= {"its worker is gone"}, reasons
    assert check.errors_by_type == ({"sqla_pgotask.WorkerLost": stranded} if stranded else {})
