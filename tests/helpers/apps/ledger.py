"""An application for worker-process tests: ``pgotask worker tests.helpers.apps.ledger:scheduler``.

Every handler writes a :class:`LedgerEntry` through the handler's Session, so
the row commits together with the task's completion, and the UNIQUE
constraint on ``task_id`` makes a task that ran twice impossible to miss.

The engine comes from ``PGOTASK_DATABASE_URL``; ``create_engine`` does not
connect, so importing this module is cheap (and works without the variable,
for tests that only need the models).
"""

from __future__ import annotations

import os
import sys
import time

from sqlalchemy import BigInteger, Engine, Integer, MetaData, create_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from sqla_pgotask import Scheduler, Task

DATABASE_URL_ENV = "PGOTASK_DATABASE_URL"


class LedgerBase(DeclarativeBase):
    """The test application's own models, on a metadata of their own."""

    metadata = MetaData()


class LedgerEntry(LedgerBase):
    """One row per task that ran to completion."""

    __tablename__ = "ledger"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    task_id: Mapped[int] = mapped_column(BigInteger, unique=True, nullable=False)
    worker_pid: Mapped[int] = mapped_column(Integer, nullable=False)


def create_ledger(engine: Engine) -> None:
    """Create the ``ledger`` table (if missing)."""
    LedgerBase.metadata.create_all(engine)


engine = create_engine(
    os.environ.get(DATABASE_URL_ENV, "postgresql+psycopg:///pgotask_ledger_unset"),
    pool_size=10,
    max_overflow=10,
)
session_factory = sessionmaker(engine)
scheduler = Scheduler(session_factory, concurrency=2, poll_interval=0.2)


def _write_ledger(session: Session, task: Task) -> None:
    session.add(LedgerEntry(task_id=task.id, worker_pid=os.getpid()))


@scheduler.handler("ledger")
def ledger(session: Session, task: Task) -> object:
    """Write this task's ledger row."""
    _write_ledger(session, task)
    return None


@scheduler.handler("sleep")
def sleep(session: Session, task: Task) -> object:
    """Say so on stderr, sleep ``payload["seconds"]``, then write this task's ledger row."""
    print(f"sleep task {task.id} started", file=sys.stderr, flush=True)
    time.sleep(float(task.payload.get("seconds", 1.0)))
    _write_ledger(session, task)
    return None
