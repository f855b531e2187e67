"""Pruning finished tasks: ``prune_tasks()`` and ``pgotask prune``, on a real database."""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections import Counter
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from sqla_pgotask import SchemaError, Task, TaskError, TaskStatus, prune_tasks
from tests.helpers import insert_aged_tasks
from tests.helpers.processes import run_pgotask

WEEK = dt.timedelta(days=7)
FINISHED = (TaskStatus.SUCCEEDED, TaskStatus.FAILED, TaskStatus.CANCELLED)


def _remaining(engine: Engine) -> set[int]:
    with engine.connect() as conn:
        return set(conn.execute(select(Task.id)).scalars())


def _error_task_ids(engine: Engine) -> Counter[int]:
    with engine.connect() as conn:
        return Counter(conn.execute(select(TaskError.task_id)).scalars())


# -- prune_tasks() --------------------------------------------------------------


def test_prunes_only_finished_tasks_past_the_cutoff(engine: Engine) -> None:
    old = [id_ for status in FINISHED for id_ in insert_aged_tasks(engine, status, days_ago=10)]
    recent = [id_ for status in FINISHED for id_ in insert_aged_tasks(engine, status, days_ago=6.9)]
    pending = insert_aged_tasks(engine, TaskStatus.PENDING, days_ago=None, count=2)
    running = insert_aged_tasks(engine, TaskStatus.RUNNING, days_ago=None)
    # Not a state the library makes, but the status decides, not the timestamp.
    odd = insert_aged_tasks(engine, TaskStatus.PENDING, days_ago=30) + insert_aged_tasks(
        engine, TaskStatus.RUNNING, days_ago=30
    )

    assert prune_tasks(engine, older_than=WEEK) == len(old)

    assert _remaining(engine) == set(recent + pending + running + odd)
    assert prune_tasks(engine, older_than=WEEK) == 0  # nothing left to do


@pytest.mark.parametrize("status", FINISHED)
def test_prunes_only_the_statuses_asked_for(engine: Engine, status: TaskStatus) -> None:
    by_status = {s: insert_aged_tasks(engine, s, days_ago=10, count=2) for s in FINISHED}

    assert prune_tasks(engine, older_than=WEEK, statuses=[status.value]) == 2

    kept = {id_ for s, ids in by_status.items() if s is not status for id_ in ids}
    assert _remaining(engine) == kept


def test_task_errors_go_with_their_tasks(engine: Engine) -> None:
    (old,) = insert_aged_tasks(engine, TaskStatus.FAILED, days_ago=10, errors=3)
    (recent,) = insert_aged_tasks(engine, TaskStatus.FAILED, days_ago=1, errors=2)
    (pending,) = insert_aged_tasks(engine, TaskStatus.PENDING, days_ago=None, errors=1)
    assert _error_task_ids(engine) == {old: 3, recent: 2, pending: 1}

    assert prune_tasks(engine, older_than=WEEK) == 1

    assert _error_task_ids(engine) == {recent: 2, pending: 1}


def test_deletes_in_batches(engine: Engine, caplog: pytest.LogCaptureFixture) -> None:
    # Due and not-due rows interleaved by id: every batch must start where
    # the previous one stopped without skipping a due row.
    due: list[int] = []
    kept: list[int] = []
    for _ in range(5):
        due += insert_aged_tasks(engine, TaskStatus.SUCCEEDED, days_ago=10, count=5)
        kept += insert_aged_tasks(engine, TaskStatus.SUCCEEDED, days_ago=1, count=2)
        kept += insert_aged_tasks(engine, TaskStatus.PENDING, days_ago=None)
    with caplog.at_level(logging.DEBUG, logger="sqla_pgotask.retention"):
        deleted = prune_tasks(engine, older_than=WEEK, batch_size=4)
    assert deleted == len(due) == 25
    assert _remaining(engine) == set(kept)
    batches = [r.getMessage() for r in caplog.records if r.getMessage().startswith("prune batch")]
    assert len(batches) == 7, batches  # 6 full batches of 4, then the last task


def test_exact_multiple_of_the_batch_size(engine: Engine) -> None:
    insert_aged_tasks(engine, TaskStatus.CANCELLED, days_ago=10, count=6)
    seen: list[int] = []
    assert prune_tasks(engine, older_than=WEEK, batch_size=3, progress=seen.append) == 6
    assert _remaining(engine) == set()
    assert seen == [3, 6, 6]  # after each batch, the last one empty


def test_takes_a_sessionmaker(session_factory: sessionmaker[Session], engine: Engine) -> None:
    old = insert_aged_tasks(engine, TaskStatus.SUCCEEDED, days_ago=2, count=3)
    recent = insert_aged_tasks(engine, TaskStatus.SUCCEEDED, days_ago=None)  # never finished: NULL
    assert prune_tasks(session_factory, older_than=dt.timedelta(days=1)) == len(old)
    assert _remaining(engine) == set(recent)


def test_zero_age_prunes_every_finished_task(engine: Engine) -> None:
    finished = insert_aged_tasks(engine, TaskStatus.SUCCEEDED, days_ago=0.001, count=2)
    pending = insert_aged_tasks(engine, TaskStatus.PENDING, days_ago=None)
    assert prune_tasks(engine, older_than=dt.timedelta(0)) == len(finished)
    assert _remaining(engine) == set(pending)


def test_skips_rows_locked_by_others_instead_of_waiting(engine: Engine) -> None:
    first, *others = insert_aged_tasks(engine, TaskStatus.SUCCEEDED, days_ago=10, count=4)
    with engine.connect() as locker:
        locker.execute(text("SELECT id FROM pgotask_task WHERE id = :id FOR UPDATE"), {"id": first})
        # It does not wait for the lock (the test would time out): it leaves that row.
        assert prune_tasks(engine, older_than=WEEK, batch_size=2) == len(others)
        assert _remaining(engine) == {first}
        locker.rollback()
    assert prune_tasks(engine, older_than=WEEK) == 1
    assert _remaining(engine) == set()


def test_unmigrated_database(empty_database_url: str) -> None:
    eng = create_engine(empty_database_url)
    try:
        with pytest.raises(SchemaError, match="tables are not installed"):
            prune_tasks(eng, older_than=WEEK)
    finally:
        eng.dispose()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"statuses": ["pending"]}, "cannot prune pending tasks: only finished tasks"),
        (
            {"statuses": [TaskStatus.SUCCEEDED, TaskStatus.RUNNING]},
            "cannot prune running tasks",
        ),
        ({"statuses": ["done"]}, "unknown task status 'done' (choose from succeeded, failed"),
        ({"statuses": "failed"}, "not the string 'failed'"),
        ({"statuses": []}, "must name at least one of succeeded, failed, cancelled"),
        ({"older_than": dt.timedelta(days=-1)}, "older_than must not be negative"),
        ({"older_than": 7}, "older_than must be a datetime.timedelta, not int"),
        ({"batch_size": 0}, "batch_size must be an integer >= 1, not 0"),
        ({"batch_size": True}, "batch_size must be an integer >= 1, not True"),
    ],
)
def test_bad_arguments(kwargs: dict[str, Any], message: str) -> None:
    # Checked before connecting: this engine's server does not exist.
    eng = create_engine("postgresql+psycopg://nobody@127.0.0.1:1/none")
    arguments: dict[str, Any] = {"older_than": WEEK, **kwargs}
    with pytest.raises(ValueError) as raised:
        prune_tasks(eng, **arguments)
    assert message in str(raised.value)


# -- pgotask prune ------------------------------------------------------------------


def test_cli_prune(database_url: str, engine: Engine) -> None:
    old = {s: insert_aged_tasks(engine, s, days_ago=10, count=2, errors=1) for s in FINISHED}
    recent = insert_aged_tasks(engine, TaskStatus.SUCCEEDED, days_ago=0.25)  # 6 hours ago
    pending = insert_aged_tasks(engine, TaskStatus.PENDING, days_ago=None)

    done = run_pgotask(["prune", "--older-than", "7d", "--status", "failed"], database_url)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "deleted 2 tasks (failed) that finished more than 7d ago"

    done = run_pgotask(
        [
            "prune",
            "--older-than=12h",
            "--batch-size",
            "1",
            "--json",
            "--database-url",
            database_url,
        ],
        None,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {
        "deleted": 4,
        "statuses": ["succeeded", "failed", "cancelled"],
        "older_than_seconds": 12 * 3600.0,
    }
    assert _remaining(engine) == set(recent + pending)
    assert not set(_error_task_ids(engine)) & {id_ for ids in old.values() for id_ in ids}


def test_foreign_key_of_the_application_that_forbids_the_delete(
    database_url: str, engine: Engine
) -> None:
    (kept,) = insert_aged_tasks(engine, TaskStatus.SUCCEEDED, days_ago=10)
    others = insert_aged_tasks(engine, TaskStatus.SUCCEEDED, days_ago=10, count=2)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE invoice (task_id bigint REFERENCES pgotask_task (id))"))
        conn.execute(text("INSERT INTO invoice VALUES (:id)"), {"id": kept})
    with pytest.raises(IntegrityError, match="still referenced from table"):
        prune_tasks(engine, older_than=WEEK)

    done = run_pgotask(["prune", "--older-than", "7d"], database_url)
    assert done.returncode == 1, done.stderr
    assert "pgotask: error: cannot delete a task: update or delete on table" in done.stderr
    assert "ondelete='CASCADE' or 'SET NULL'" in done.stderr
    assert "Traceback" not in done.stderr
    assert _remaining(engine) == {kept, *others}  # one batch: nothing deleted


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--older-than", "7"], "expected a duration like 30s, 15m, 12h or 7d, got '7'"),
        (["--older-than", "week"], "expected a duration like 30s, 15m, 12h or 7d, got 'week'"),
        (["--older-than=-1d"], "expected a duration like 30s, 15m, 12h or 7d, got '-1d'"),
        (["--older-than", "7d", "--status", "pending"], "pending tasks cannot be pruned"),
        (["--older-than", "7d", "--status", "running"], "running tasks cannot be pruned"),
        (["--older-than", "7d", "--status", "done"], "unknown status 'done' (choose from"),
        (["--older-than", "7d", "--batch-size", "0"], "must be at least 1, got 0"),
        ([], "the following arguments are required: --older-than"),
    ],
)
def test_cli_prune_bad_arguments(args: list[str], message: str, closed_port_url: str) -> None:
    done = run_pgotask(["prune", *args], closed_port_url)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
    assert "usage: pgotask prune" in done.stderr


def test_cli_prune_without_database_url() -> None:
    done = run_pgotask(["prune", "--older-than", "7d"], None)
    assert done.returncode == 2, done.stderr
    assert "no database URL: pass --database-url or set PGOTASK_DATABASE_URL" in done.stderr


def test_cli_prune_database_unreachable(closed_port_url: str) -> None:
    done = run_pgotask(["prune", "--older-than", "7d"], closed_port_url, timeout=30)
    assert done.returncode == 3, done.stderr
    assert "pgotask: error: cannot use the database" in done.stderr
    assert "Traceback" not in done.stderr


def test_cli_prune_unmigrated_database(empty_database_url: str) -> None:
    done = run_pgotask(["prune", "--older-than", "7d", "--database-url", empty_database_url], None)
    assert done.returncode == 4, done.stderr
    assert "sqla_pgotask tables are not installed" in done.stderr
