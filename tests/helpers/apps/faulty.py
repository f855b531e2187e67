"""The fault-injection suite's application: ``pgotask worker tests.helpers.apps.faulty:scheduler``.

Like :mod:`tests.helpers.apps.ledger`, every handler that completes writes a
:class:`LedgerEntry` through the handler's Session, so the row commits
together with the task's completion, and the UNIQUE constraint on
``task_id`` makes a task that committed twice impossible.

The Scheduler uses short leases so that a killed worker's tasks come back
within seconds (see ``docs/reliability.md``)::

    lease_seconds=2, heartbeat_interval=0.3, maintenance_interval=0.5, dead_after=1.5

Handlers:

* ``ledger``: sleep ``payload["sleep"]`` seconds (default: 0 to 2 ms), then
  write the ledger row;
* ``poison``: kill its own worker process with SIGKILL when
  ``payload["poison"]`` is true, else behave like ``ledger``.

The engine comes from ``PGOTASK_DATABASE_URL``; ``create_engine`` does not
connect, so importing this module for its models is cheap.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import random
import signal
import sys
import time

from sqlalchemy import BigInteger, DateTime, Engine, Integer, MetaData, create_engine, func
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from sqla_pgotask import Scheduler, Task
from sqla_pgotask.config.retry import ExponentialBackoff

DATABASE_URL_ENV = "PGOTASK_DATABASE_URL"
SCHEDULER = "tests.helpers.apps.faulty:scheduler"

#: The timing the suite runs with (the library defaults are 30 s / 5 s / 5 s / 30 s).
LEASE_SECONDS = 2.0
HEARTBEAT_INTERVAL = 0.3
MAINTENANCE_INTERVAL = 0.5
DEAD_AFTER = 1.5
SHUTDOWN_GRACE = 10.0
#: Attempts of a ``ledger`` task: connection faults fail attempts too.
LEDGER_MAX_ATTEMPTS = 10
POISON_MAX_ATTEMPTS = 3


class FaultBase(DeclarativeBase):
    """The test application's own models, on a metadata of their own."""

    metadata = MetaData()


class LedgerEntry(FaultBase):
    """One row per task whose handler's transaction committed."""

    __tablename__ = "fault_ledger"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    task_id: Mapped[int] = mapped_column(BigInteger, unique=True, nullable=False)
    attempt: Mapped[int] = mapped_column(Integer, nullable=False)
    worker_pid: Mapped[int] = mapped_column(Integer, nullable=False)
    written_at: Mapped[dt.datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.clock_timestamp(), nullable=False
    )


def create_ledger(engine: Engine) -> None:
    """Create the ``fault_ledger`` table (if missing)."""
    FaultBase.metadata.create_all(engine)


class _QuietTaskLines(logging.Filter):
    """Drop the worker's INFO line per finished task (thousands of them per run)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (
            record.levelno == logging.INFO
            and isinstance(record.msg, str)
            and record.msg.startswith("task ")
        )


# In the worker processes only: imported by the test process (for its
# constants), the filter would hide these records from every later test.
if "pytest" not in sys.modules:
    logging.getLogger("sqla_pgotask.worker").addFilter(_QuietTaskLines())

engine = create_engine(
    os.environ.get(DATABASE_URL_ENV, "postgresql+psycopg:///pgotask_faulty_unset"),
    pool_size=10,
    max_overflow=10,
)
session_factory = sessionmaker(engine)
scheduler = Scheduler(
    session_factory,
    concurrency=4,
    poll_interval=0.5,
    lease_seconds=LEASE_SECONDS,
    heartbeat_interval=HEARTBEAT_INTERVAL,
    maintenance_interval=MAINTENANCE_INTERVAL,
    dead_after=DEAD_AFTER,
    shutdown_grace=SHUTDOWN_GRACE,
)
_RETRY = ExponentialBackoff(base=0.1, max_delay=1.0)


def _work_and_write(session: Session, task: Task) -> None:
    seconds = task.payload.get("sleep") if isinstance(task.payload, dict) else None
    time.sleep(float(seconds) if seconds is not None else random.uniform(0.0, 0.002))
    session.add(LedgerEntry(task_id=task.id, attempt=task.attempts, worker_pid=os.getpid()))


@scheduler.handler("ledger", max_attempts=LEDGER_MAX_ATTEMPTS, retry=_RETRY)
def ledger(session: Session, task: Task) -> object:
    """A tiny bit of work, then this task's ledger row."""
    _work_and_write(session, task)
    return None


@scheduler.handler("poison", max_attempts=POISON_MAX_ATTEMPTS, retry=_RETRY)
def poison(session: Session, task: Task) -> object:
    """SIGKILL this worker process if ``payload["poison"]``; else like ``ledger``."""
    if isinstance(task.payload, dict) and task.payload.get("poison"):
        os.kill(os.getpid(), signal.SIGKILL)
    _work_and_write(session, task)
    return None
