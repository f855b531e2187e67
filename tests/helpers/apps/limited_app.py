"""Fleet-wide limits: ``pgotask worker tests.helpers.apps.limited_app:scheduler``.

Every handler records, through its own Session, one :class:`RunLog` row per
task: the database's ``clock_timestamp()`` when the handler started and when
it ended.  The row commits together with the task's completion, and the
handler's interval lies within the task's ``running`` interval (claim to
completion), so overlapping rows show what ran at once; the UNIQUE
``task_id`` makes a task that ran twice impossible to miss.

Limits:

* kind ``limited``: ``max_running=2`` (sleeps ``payload["seconds"]``);
* kind ``rated``: ``rate_limit=(3, 1.0)``, three starts per second;
* queue ``narrow``: ``max_running=2``, whatever the kind;
* kind ``plain``: no limit of its own (sleeps ``payload["seconds"]``);
* kind ``single``: ``max_running=1``, and in queue ``narrow`` when enqueued there.

The engine comes from ``PGOTASK_DATABASE_URL``; ``create_engine`` does not
connect, so importing this module for its models is cheap.
"""

from __future__ import annotations

import datetime as dt
import os
import time

from sqlalchemy import BigInteger, DateTime, Engine, Integer, MetaData, Text, create_engine, func
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from sqla_pgotask import RateLimit, Scheduler, Task

DATABASE_URL_ENV = "PGOTASK_DATABASE_URL"


class LimitedBase(DeclarativeBase):
    """The test application's own models, on a metadata of their own."""

    metadata = MetaData()


class RunLog(LimitedBase):
    """When one task's handler started and ended (database clock)."""

    __tablename__ = "run_log"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    task_id: Mapped[int] = mapped_column(BigInteger, unique=True, nullable=False)
    kind: Mapped[str] = mapped_column(Text, nullable=False)
    queue: Mapped[str] = mapped_column(Text, nullable=False)
    started: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    ended: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    worker_pid: Mapped[int] = mapped_column(Integer, nullable=False)


def create_run_log(engine: Engine) -> None:
    """Create the ``run_log`` table (if missing)."""
    LimitedBase.metadata.create_all(engine)


def make_scheduler(session_factory: sessionmaker[Session], **settings: object) -> Scheduler:
    """A Scheduler with this application's handlers and limits."""
    scheduler = Scheduler(session_factory, **settings)  # type: ignore[arg-type]

    def run(session: Session, task: Task) -> object:
        started = session.scalar(func.clock_timestamp().select())
        time.sleep(float(task.payload.get("seconds", 0.0)))
        ended = session.scalar(func.clock_timestamp().select())
        assert started is not None and ended is not None
        session.add(
            RunLog(
                task_id=task.id,
                kind=task.kind,
                queue=task.queue,
                started=started,
                ended=ended,
                worker_pid=os.getpid(),
            )
        )
        return None

    scheduler.handler("limited", max_running=2)(run)
    scheduler.handler("rated", rate_limit=RateLimit(3, 1.0))(run)
    scheduler.handler("plain")(run)
    scheduler.handler("single", max_running=1)(run)
    scheduler.limit_queue("narrow", max_running=2)
    return scheduler


engine = create_engine(
    os.environ.get(DATABASE_URL_ENV, "postgresql+psycopg:///pgotask_limited_unset"),
    pool_size=10,
    max_overflow=10,
)
session_factory = sessionmaker(engine)
scheduler = make_scheduler(session_factory, concurrency=3, poll_interval=0.2)
