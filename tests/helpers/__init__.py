"""Helpers shared by the test modules: an application table, task rows, waiting, a worker thread.

Fixtures built on them live in ``tests/conftest.py``; running the ``pgotask``
command is ``tests/helpers/processes.py``.  The conftest registers this module for
pytest's assertion rewriting, so its asserts report like a test's.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

from sqlalchemy import BigInteger, Engine, MetaData, String, create_engine, make_url, select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from sqla_pgotask import Scheduler, Task, TaskError, TaskStatus, WorkerStats
from sqla_pgotask.engine.claims import LimitedClaims, PlainClaims, SessionConnection
from sqla_pgotask.engine.limit_plan import LimitPlan
from sqla_pgotask.engine.rows import Claimed

T = TypeVar("T")


class AppBase(DeclarativeBase):
    metadata = MetaData()


class Ledger(AppBase):
    """An application table handlers write to; unique per task."""

    __tablename__ = "app_ledger"

    task_id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    note: Mapped[str] = mapped_column(String(100), default="")


def add_tasks(session_factory: sessionmaker[Session], *tasks: Task) -> list[int]:
    with session_factory.begin() as session:
        session.add_all(tasks)
        session.flush()
        return [t.id for t in tasks]


def get_task(session_factory: sessionmaker[Session], task_id: int) -> Task:
    with session_factory() as session:
        task = session.get(Task, task_id)
        assert task is not None
        session.expunge(task)
        return task


def ledger_ids(session_factory: sessionmaker[Session]) -> list[int]:
    with session_factory() as session:
        return list(session.scalars(select(Ledger.task_id).order_by(Ledger.task_id)))


def errors_of(session_factory: sessionmaker[Session], task_id: int) -> list[TaskError]:
    with session_factory() as session:
        errors = list(
            session.scalars(
                select(TaskError).where(TaskError.task_id == task_id).order_by(TaskError.attempt)
            )
        )
        session.expunge_all()
        return errors


def insert_aged_tasks(
    engine: Engine,
    status: TaskStatus,
    *,
    days_ago: float | None,
    count: int = 1,
    errors: int = 0,
) -> list[int]:
    """Insert ``count`` tasks in ``status`` that finished ``days_ago`` (None: never), by
    the database clock, each with ``errors`` TaskError rows; return their ids."""
    with engine.begin() as conn:
        ids = list(
            conn.execute(
                text(
                    """
                    INSERT INTO pgotask_task (kind, status, attempts, finished_at,
                                              locked_by, lease_expires_at)
                    SELECT 'k', CAST(:status AS text), 1,
                           CASE WHEN CAST(:days AS float) IS NULL THEN NULL
                                ELSE now() - make_interval(secs => :days * 86400) END,
                           CASE WHEN CAST(:status AS text) = 'running' THEN 'w' END,
                           CASE WHEN CAST(:status AS text) = 'running'
                                THEN now() + interval '1 hour' END
                    FROM generate_series(1, :count)
                    RETURNING id
                    """
                ),
                {"status": status.value, "days": days_ago, "count": count},
            ).scalars()
        )
        if errors:
            conn.execute(
                text(
                    """
                    INSERT INTO pgotask_task_error (task_id, attempt, exception_type)
                    SELECT t, n, 'ValueError'
                    FROM unnest(CAST(:ids AS bigint[])) AS t, generate_series(1, :errors) AS n
                    """
                ),
                {"ids": ids, "errors": errors},
            )
    return ids


def wait_until(
    predicate: Callable[[], T],
    timeout: float = 10.0,
    message: str = "condition",
    *,
    interval: float = 0.01,
) -> T:
    """Call ``predicate`` until it returns something truthy and return that, or fail."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.1f}s waiting for {message}")
        time.sleep(interval)


@contextlib.contextmanager
def running(
    scheduler: Scheduler, *, listening: bool = True, **kwargs: object
) -> Iterator[list[WorkerStats]]:
    """Run ``scheduler.run(**kwargs)`` in a thread until the block ends.

    ``listening``: wait for its LISTEN connection before the block starts
    (off for a worker that cannot listen, as behind a transaction pooler).
    """
    stats: list[WorkerStats] = []
    thread = threading.Thread(target=lambda: stats.append(scheduler.run(**kwargs)))  # type: ignore[arg-type]
    thread.start()
    try:
        wait_until(lambda: scheduler.running_worker is not None, 10, "the worker to start")
        worker = scheduler.running_worker
        assert worker is not None
        if listening:
            assert worker.listener.wait_connected(10)
        yield stats
    finally:
        scheduler.stop()
        thread.join(30)
        assert not thread.is_alive()


def process_gone(pid: int) -> bool:
    """Whether process ``pid`` has exited (a zombie nobody reaped yet counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    return stat.rpartition(")")[2].split()[0] in ("Z", "X")


# -- claims, as a runner takes them ------------------------------------------------


def claim_tasks(
    session_factory: sessionmaker[Session],
    *,
    worker_id: str,
    kinds: Mapping[str, int],
    queues: Sequence[str] | None = None,
    limit: int,
    lease_seconds: float = 60,
) -> Claimed:
    """Claim up to ``limit`` due tasks of ``kinds`` for ``worker_id`` (the plain claim)."""
    source = PlainClaims(
        SessionConnection(session_factory),
        worker_id=worker_id,
        kinds=kinds,
        queues=queues,
        lease_seconds=lease_seconds,
    )
    return source.claim(limit)


def claim_within_limits(
    session_factory: sessionmaker[Session],
    plan: LimitPlan,
    *,
    worker_id: str,
    limit: int,
    lease_seconds: float = 60,
) -> Claimed:
    """Claim as ``run_until_idle()`` does under limits: limited tasks first, never waiting."""
    source = LimitedClaims(
        SessionConnection(session_factory), plan, worker_id=worker_id, lease_seconds=lease_seconds
    )
    return source.claim(limit)


# -- databases -----------------------------------------------------------------


def url_for(server_url: str, database: str) -> str:
    """``server_url`` pointing at another database."""
    return make_url(server_url).set(database=database).render_as_string(hide_password=False)


def _admin(server_url: str) -> Engine:
    return create_engine(server_url, isolation_level="AUTOCOMMIT", pool_size=1)


def create_database(server_url: str, name: str, template: str | None = None) -> str:
    """Create database ``name`` (dropping a leftover of that name) and return its URL."""
    admin = _admin(server_url)
    try:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            suffix = f' TEMPLATE "{template}"' if template else ""
            conn.execute(text(f'CREATE DATABASE "{name}"{suffix}'))
    finally:
        admin.dispose()
    return url_for(server_url, name)


def drop_database(server_url: str, name: str) -> None:
    """Drop database ``name``, disconnecting whoever is still connected."""
    admin = _admin(server_url)
    try:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()
