"""Scenario 2: PostgreSQL restarts (fast and immediate shutdown) in the middle of a run.

The test starts an embedded server of its own (in the main thread) and
restarts it twice while three worker processes drain 3,000 tasks.  Every
connection breaks; workers must reconnect by themselves (none is respawned).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest

from sqla_pgotask.embedded import EmbeddedPostgres, ShutdownMode
from tests.helpers.faults import (
    Fleet,
    Probe,
    ScenarioResult,
    check_ledger,
    prepare_database,
    report,
    stopwatch,
    wait_for,
)

pytestmark = pytest.mark.slow

TASKS = 3_000
WORKERS = 3
#: Restart when this fraction of the tasks has succeeded.
RESTART_AT = (0.3, 0.65)
DOWN_FOR = 1.0


def _succeeded_at_least(probe: Probe, count: float) -> bool:
    return probe.count("status = 'succeeded'") >= count


@pytest.fixture
def own_server() -> Iterator[EmbeddedPostgres]:
    """A server this test alone uses, started from the main thread."""
    with EmbeddedPostgres() as server:
        prepare_database(server.url)
        yield server


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_postgres_restart_mid_run(
    mode: ShutdownMode, own_server: EmbeddedPostgres, tmp_path: Path
) -> None:
    url = own_server.url
    resumed: list[float] = []
    in_flight_done: list[float] = []
    with Probe(url) as probe, stopwatch() as elapsed:
        with Fleet(url, tmp_path, "--concurrency", "4") as fleet:
            fleet.start(WORKERS)
            probe.enqueue(TASKS)
            restarts: list[tuple[float, float, list[int]]] = []
            for fraction in RESTART_AT:
                wait_for(
                    partial(_succeeded_at_least, probe, TASKS * fraction),
                    60,
                    message=f"{fraction:.0%} of the tasks to succeed",
                )
                in_flight = probe.running_ids()
                down = time.time()
                own_server.restart(mode, down_for=DOWN_FOR)
                restarts.append((down, time.time(), in_flight))
            wait_for(
                lambda: probe.unfinished() == 0, 90, interval=0.1, message="every task to finish"
            )
            run_time = elapsed()
            survivors = len(fleet.alive)
            codes = fleet.stop()
        for down, up, in_flight in restarts:
            first = probe.first_finished_after(up)
            if first is not None:
                resumed.append(first - up)
            done = probe.done_at(in_flight)
            if done is not None:
                in_flight_done.append(max(0.0, done - down))
        check = check_ledger(probe)
    report(
        ScenarioResult(
            scenario=f"2. postgres restart ({mode})",
            tasks=check.tasks,
            faults=len(RESTART_AT),
            lost=check.lost,
            duplicated=check.duplicated,
            recover_s=max(resumed) if resumed else None,
            total_s=run_time,
            recover_what="server up to the next task done, worst restart",
            extra={
                "down_s": DOWN_FOR,
                "in_flight_done_s": [round(x, 2) for x in in_flight_done],
                "rerun": check.rerun,
                "max_attempt": check.max_attempts_seen,
                "errors": check.errors_by_type,
            },
        )
    )
    check.assert_clean(TASKS)
    assert survivors == WORKERS, "a worker process died of the restart"
    assert codes == [0] * WORKERS
