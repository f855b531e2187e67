"""Behind a real PgBouncer, in session and in transaction pool mode.

Enqueueing, wake-ups, retention and cancellation end to end, with the worker's
engine pointed at PgBouncer; the server's own view (``pg_locks``) is read on a
direct connection.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from sqla_pgotask.retention import RETENTION_LOCK, Retention, apply_retention
from tests.pgbouncer import (
    POOL_MODES,
    PgBouncer,
    PoolMode,
    advisory_lock_holders,
    direct,
    pgbouncer_binary,
)

pytestmark = pytest.mark.skipif(
    pgbouncer_binary() is None,
    reason="pgbouncer is not installed (apt-get install pgbouncer; CI installs it)",
)


@pytest.fixture(params=POOL_MODES)
def pool_mode(request: pytest.FixtureRequest) -> PoolMode:
    mode: PoolMode = request.param
    return mode


@pytest.fixture
def bouncer(tmp_path: Path, database_url: str, pool_mode: PoolMode) -> Iterator[PgBouncer]:
    with PgBouncer(tmp_path, database_url, pool_mode) as running:
        yield running


def _add_finished(database_url: str, count: int, hours_ago: float = 48) -> None:
    with direct(database_url) as conn:
        conn.execute(
            "INSERT INTO pgotask_task (kind, status, attempts, finished_at) "
            "SELECT 'k', 'succeeded', 1, now() - make_interval(hours => %s) "
            "FROM generate_series(1, %s)",
            (hours_ago, count),
        )


def _task_count(database_url: str) -> int:
    with direct(database_url) as conn:
        row = conn.execute(text("SELECT count(*) FROM pgotask_task").text).fetchone()
    assert row is not None
    return int(row[0])


# -- retention -----------------------------------------------------------------


def test_a_retention_pass_leaves_no_lock_on_any_server_connection(
    bouncer: PgBouncer, database_url: str
) -> None:
    # A busy pool: each statement outside a transaction may land on another
    # server connection (here: in turn, on four).
    bouncer.warm(database_url, servers=4)
    for count, batch_size in [(5, 10), (3, 2), (4, 2)]:
        _add_finished(database_url, count)
        with bouncer.connect(database_url, autocommit=True) as worker:
            assert apply_retention(worker, Retention(batch_size=batch_size)) == count
        assert advisory_lock_holders(database_url, RETENTION_LOCK) == 0

    # Another worker's pass is not blocked, whichever server connection it gets.
    _add_finished(database_url, 2)
    with direct(database_url) as other:
        assert apply_retention(other, Retention()) == 2
    assert _task_count(database_url) == 0
