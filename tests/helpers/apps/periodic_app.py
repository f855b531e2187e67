"""Periodic schedules: ``pgotask worker tests.helpers.apps.periodic_app:scheduler``.

Every run writes a :class:`PeriodicRun` row through the handler's Session
(so it commits with the task's completion); its UNIQUE ``task_id`` and
``(schedule, slot)`` make a slot that ran twice impossible to miss.

The engine comes from ``PGOTASK_DATABASE_URL``; importing this module does
not connect.
"""

from __future__ import annotations

import datetime as dt
import os

from sqlalchemy import (
    BigInteger,
    DateTime,
    Engine,
    Integer,
    MetaData,
    Text,
    UniqueConstraint,
    create_engine,
    func,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from sqla_pgotask import Scheduler, Task

DATABASE_URL_ENV = "PGOTASK_DATABASE_URL"
SCHEDULER = "tests.helpers.apps.periodic_app:scheduler"

#: The schedules (all of kind ``tick``) and their policies.
EVERY_SECOND = "every_second"  # every=1, backfill=10: nothing missed even if ticks stall
ONCE = "once_1s"  # every=1, missed="once"
BACKFILL = "backfill_1s"  # every=1, missed="backfill", backfill=3
SKIP = "skip_4s"  # every=4, missed="skip", grace=1
BACKFILL_N = 3
SKIP_EVERY = 4
SKIP_GRACE = 1.0


class PeriodicBase(DeclarativeBase):
    """The test application's own models, on a metadata of their own."""

    metadata = MetaData()


class PeriodicRun(PeriodicBase):
    """One row per periodic task that ran to completion."""

    __tablename__ = "periodic_run"
    __table_args__ = (UniqueConstraint("schedule", "slot"),)

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    task_id: Mapped[int] = mapped_column(BigInteger, unique=True, nullable=False)
    schedule: Mapped[str] = mapped_column(Text, nullable=False)
    slot: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    worker_pid: Mapped[int] = mapped_column(Integer, nullable=False)
    ran_at: Mapped[dt.datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.clock_timestamp(), nullable=False
    )


def create_tables(engine: Engine) -> None:
    """Create the ``periodic_run`` table (if missing)."""
    PeriodicBase.metadata.create_all(engine)


engine = create_engine(
    os.environ.get(DATABASE_URL_ENV, "postgresql+psycopg:///pgotask_periodic_unset"),
    pool_size=10,
    max_overflow=10,
)
session_factory = sessionmaker(engine)
scheduler = Scheduler(session_factory, concurrency=2, poll_interval=0.5)


@scheduler.periodic(every=1, name=EVERY_SECOND, missed="backfill", backfill=10)
@scheduler.handler("tick")
def tick(session: Session, task: Task) -> object:
    """Record that this slot ran."""
    assert task.schedule is not None and task.slot is not None
    session.add(
        PeriodicRun(task_id=task.id, schedule=task.schedule, slot=task.slot, worker_pid=os.getpid())
    )
    return {"slot": task.slot.isoformat()}


scheduler.periodic(every=1, kind="tick", name=ONCE, missed="once")
scheduler.periodic(every=1, kind="tick", name=BACKFILL, missed="backfill", backfill=BACKFILL_N)
scheduler.periodic(every=SKIP_EVERY, kind="tick", name=SKIP, missed="skip", grace=SKIP_GRACE)
