"""Several ``pgotask worker`` processes sharing one database."""

from __future__ import annotations

import re
import signal
import time
from collections import Counter
from contextlib import ExitStack
from pathlib import Path

import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session, sessionmaker

from sqla_pgotask import Task, TaskError, TaskStatus
from tests.helpers import wait_until
from tests.helpers.apps.ledger import LedgerEntry, create_ledger
from tests.helpers.processes import WorkerProcess, pgotask_worker

TOTAL = 2_000
BEFORE_START = 500

_STATS = re.compile(
    r"stopped: WorkerStats\(succeeded=(\d+), retried=(\d+), failed=(\d+), "
    r"cancelled=(\d+), lost=(\d+), interrupted=(\d+), released=(\d+), snoozed=(\d+), "
    r"refused=(\d+), stuck_slots=(\d+)\)"
)


def _unfinished(session_factory: sessionmaker[Session], kind: str = "ledger") -> int:
    with session_factory() as session:
        return (
            session.scalar(
                select(func.count())
                .select_from(Task)
                .where(Task.kind == kind)
                .where(Task.status.in_([TaskStatus.PENDING, TaskStatus.RUNNING]))
            )
            or 0
        )


def _enqueue(session_factory: sessionmaker[Session], kind: str, count: int, **options: int) -> None:
    with session_factory() as session:
        session.add_all([Task(kind=kind, payload={"n": n}, **options) for n in range(count)])
        session.commit()


def _stop(workers: list[WorkerProcess], timeout: float = 30.0) -> list[tuple[int, ...]]:
    """SIGTERM every worker, check they exit 0, and return their logged stats."""
    for worker in workers:
        worker.send(signal.SIGTERM)
    stats = []
    for worker in workers:
        assert worker.wait(timeout) == 0
        found = _STATS.search(worker.log())
        assert found is not None, "no final stats in the worker log"
        stats.append(tuple(int(n) for n in found.groups()))
    return stats


@pytest.mark.slow
def test_two_workers_run_every_task_once(
    database_url: str,
    engine: Engine,
    session_factory: sessionmaker[Session],
    tmp_path: Path,
) -> None:
    create_ledger(engine)
    _enqueue(session_factory, "ledger", BEFORE_START)
    started = time.monotonic()
    with ExitStack() as stack:
        workers = [
            stack.enter_context(
                pgotask_worker(database_url, tmp_path, "--concurrency", "4", name=f"worker{n}")
            )
            for n in range(2)
        ]
        for worker in workers:
            worker.wait_started()
        _enqueue(session_factory, "ledger", TOTAL - BEFORE_START)
        wait_until(
            lambda: _unfinished(session_factory) == 0,
            120,
            interval=0.2,
            message="every ledger task to finish",
        )
        elapsed = time.monotonic() - started
        stats = _stop(workers)

    with session_factory() as session:
        tasks = Counter(
            (row.status, row.attempts)
            for row in session.execute(select(Task.status, Task.attempts)).all()
        )
        ledger_rows = session.scalar(select(func.count()).select_from(LedgerEntry))
        ledger_tasks = session.scalar(select(func.count(LedgerEntry.task_id.distinct())))
        by_pid = Counter(
            {
                pid: count
                for pid, count in session.execute(
                    select(LedgerEntry.worker_pid, func.count()).group_by(LedgerEntry.worker_pid)
                )
            }
        )
        errors = session.scalar(select(func.count()).select_from(TaskError))
    print(f"{TOTAL} tasks in {elapsed:.1f}s; ledger rows by worker pid: {dict(by_pid)}")
    assert tasks == {(TaskStatus.SUCCEEDED, 1): TOTAL}
    assert ledger_rows == TOTAL
    assert ledger_tasks == TOTAL
    assert errors == 0
    assert set(by_pid) == {worker.pid for worker in workers}
    assert all(count > 0 for count in by_pid.values())
    # What each process says it did agrees with the ledger: nothing retried or lost.
    assert [s[0] for s in stats] == [by_pid[worker.pid] for worker in workers]
    assert all(s[1:] == (0,) * 9 for s in stats)


def test_worker_never_claims_kinds_it_has_no_handler_for(
    database_url: str,
    engine: Engine,
    session_factory: sessionmaker[Session],
    tmp_path: Path,
) -> None:
    create_ledger(engine)
    # The 'b' tasks come first in claim order (higher priority, older), so a
    # claim that ignored the kind would take them before any ledger task.
    _enqueue(session_factory, "b", 20, priority=10)
    _enqueue(session_factory, "ledger", 50)
    with pgotask_worker(database_url, tmp_path, "--concurrency", "4") as worker:
        worker.wait_started()
        wait_until(
            lambda: _unfinished(session_factory) == 0, 30, message="every ledger task to finish"
        )
        _enqueue(session_factory, "b", 5, priority=10)  # a wake-up with nothing to claim
        _enqueue(session_factory, "ledger", 5)
        wait_until(lambda: _unfinished(session_factory) == 0, 30, message="the second ledger batch")
        _stop([worker])
    with session_factory() as session:
        b_tasks = session.scalars(select(Task).where(Task.kind == "b")).all()
        ledger_rows = session.scalar(select(func.count()).select_from(LedgerEntry))
    assert len(b_tasks) == 25
    assert all(
        t.status == TaskStatus.PENDING
        and t.attempts == 0
        and t.locked_by is None
        and t.started_at is None
        for t in b_tasks
    ), b_tasks
    assert ledger_rows == 55
