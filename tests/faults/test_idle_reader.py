"""Scenario 7: an idle-in-transaction reader held open for the whole run.

A connection runs ``BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT count(*)
FROM pgotask_task;`` and then sits idle in its transaction, like a
forgotten psql session or a long report.  Its snapshot holds back the
cleanup of dead row versions (every claim and completion leaves one), so
the claim query has more to step over; its lock (ACCESS SHARE) blocks no
worker.  The queue must keep working; the figure is the throughput drop
against the same run without the reader, run at the same time on another
database of the same server.  (Under READ COMMITTED an idle
transaction holds no snapshot between statements and costs nothing.)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import Connection, text

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

TASKS = 6_000
WORKERS = 2


@contextlib.contextmanager
def idle_reader(probe: Probe) -> Iterator[Connection]:
    """A connection idle in a REPEATABLE READ transaction that has read the task table."""
    with probe.engine.connect() as plain:
        conn = plain.execution_options(isolation_level="REPEATABLE READ")
        with conn.begin() as tx:
            conn.execute(text("SELECT count(*) FROM pgotask_task")).scalar_one()
            yield conn
            tx.rollback()


def test_idle_in_transaction_reader(new_database: Callable[[], str], tmp_path: Path) -> None:
    # Both runs at once, on two databases of one server, so that whatever else
    # the machine does slows both alike.  (The reader's snapshot only holds
    # back cleanup in its own database.)
    sides = {"without": new_database(), "with": new_database()}
    with contextlib.ExitStack() as stack, stopwatch() as elapsed:
        probes = {side: stack.enter_context(Probe(url)) for side, url in sides.items()}
        reader = stack.enter_context(idle_reader(probes["with"]))
        fleets = {}
        for side, url in sides.items():
            (tmp_path / side).mkdir()
            fleet = stack.enter_context(Fleet(url, tmp_path / side, "--concurrency", "4"))
            for _ in range(WORKERS):
                fleet.spawn()
            fleets[side] = fleet
        for fleet in fleets.values():
            fleet.wait_started()
        enqueued = {side: probe.enqueue(TASKS) for side, probe in probes.items()}
        wait_for(
            lambda: all(probe.unfinished() == 0 for probe in probes.values()),
            120,
            interval=0.1,
            message="every task to finish",
        )
        run_time = elapsed()
        # Throughput over the window both ran in: from enqueue until the first side was done.
        ends = [probe.last_finished() for probe in probes.values()]
        end = min(e for e in ends if e is not None)
        rates = {
            side: probe.count("finished_at <= to_timestamp(:t)", t=end) / (end - enqueued[side])
            for side, probe in probes.items()
        }
        pid = reader.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
        state: str | None = probes["with"].scalar(
            "SELECT state || ' xmin=' || coalesce(backend_xmin::text, '-') "
            "FROM pg_stat_activity WHERE pid = :pid",
            pid=pid,
        )
        codes = [code for fleet in fleets.values() for code in fleet.stop()]
        checks = {side: check_ledger(probe) for side, probe in probes.items()}
    drop = 1 - rates["with"] / rates["without"]
    report(
        ScenarioResult(
            scenario="7. idle-in-transaction reader",
            tasks=checks["with"].tasks,
            faults=1,
            lost=checks["with"].lost,
            duplicated=checks["with"].duplicated,
            recover_s=None,
            total_s=run_time,
            extra={
                "jobs_per_s_without": round(rates["without"]),
                "jobs_per_s_with": round(rates["with"]),
                "drop_pct": round(100 * drop, 1),
                "reader": state,
            },
        )
    )
    for check in checks.values():
        check.assert_clean(TASKS)
    assert codes == [0] * (2 * WORKERS)
    assert state is not None and state.startswith("idle in transaction xmin="), state
