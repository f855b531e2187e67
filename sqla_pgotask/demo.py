"""``pgotask demo``: install the tables, enqueue a few tasks, run a worker, show what happened."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

from sqlalchemy import Engine, ForeignKey, MetaData, String, create_engine, func, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from sqla_pgotask.config.retry import ConstantBackoff
from sqla_pgotask.migrate import upgrade
from sqla_pgotask.models import Task, TaskStatus
from sqla_pgotask.scheduler import Scheduler


class DemoBase(DeclarativeBase):
    """The demo application's own models."""

    metadata = MetaData()


class Greeting(DemoBase):
    """An application table the demo's handler writes to, in the task's transaction."""

    __tablename__ = "pgotask_demo_greeting"

    id: Mapped[int] = mapped_column(primary_key=True)
    task_id: Mapped[int] = mapped_column(ForeignKey(Task.id, ondelete="CASCADE"), unique=True)
    text: Mapped[str] = mapped_column(String(200))


def build_scheduler(session_factory: sessionmaker[Session]) -> Scheduler:
    """The demo's handlers: one that greets, one that fails its first attempt."""
    scheduler = Scheduler(session_factory, concurrency=2, poll_interval=0.5)

    @scheduler.handler("greet")
    def greet(session: Session, task: Task) -> object:
        text = f"Hello, {task.payload['name']}!"
        session.add(Greeting(task_id=task.id, text=text))
        return {"greeting": text}

    @scheduler.handler("flaky", retry=ConstantBackoff(1.0), max_attempts=3)
    def flaky(session: Session, task: Task) -> object:
        if task.attempts < 2:
            raise ConnectionError("the mail server did not answer (this attempt fails on purpose)")
        session.add(Greeting(task_id=task.id, text="sent on the second attempt"))
        return {"sent": True}

    return scheduler


@contextlib.contextmanager
def _database(url: str | None) -> Iterator[str]:
    if url:
        yield url
        return
    from sqla_pgotask.embedded import EmbeddedPostgres

    print("No database URL given: starting an embedded PostgreSQL ...")
    with EmbeddedPostgres() as server:
        print(f"  listening on 127.0.0.1:{server.port}")
        yield server.url


def run_demo(url: str | None) -> int:
    """Run the demo against ``url`` (or an embedded server); return an exit code."""
    with _database(url) as database_url:
        engine = create_engine(database_url)
        try:
            _demo(engine)
        finally:
            engine.dispose()
    return 0


def _demo(engine: Engine) -> None:
    print("1. alembic upgrade heads (the library's revisions)")
    upgrade(engine)
    DemoBase.metadata.create_all(engine)
    session_factory = sessionmaker(engine)
    scheduler = build_scheduler(session_factory)

    print("2. enqueue in the application's transaction")
    with session_factory.begin() as session:
        new = [Task(kind="greet", payload={"name": n}) for n in ("Ada", "Grace", "Edsger")]
        new.append(Task(kind="flaky", payload={"to": "ops@example.com"}))
        session.add_all(new)
        session.flush()
        ids = [task.id for task in new]
    with session_factory.begin() as session:
        session.add(Task(kind="greet", payload={"name": "nobody"}))
        print("   (and one more that is rolled back: it never exists)")
        session.rollback()

    print("3. run a worker until every task is finished")
    worker = threading.Thread(target=scheduler.run, name="demo-worker")
    worker.start()
    deadline = time.monotonic() + 30
    try:
        while time.monotonic() < deadline:
            with session_factory() as session:
                unfinished = session.scalar(
                    select(func.count())
                    .select_from(Task)
                    .where(Task.id.in_(ids))
                    .where(Task.status.in_([TaskStatus.PENDING, TaskStatus.RUNNING]))
                )
            if not unfinished:
                break
            time.sleep(0.2)
    finally:
        scheduler.stop()
        worker.join()

    print("4. what happened")
    with session_factory() as session:
        tasks = session.scalars(select(Task).where(Task.id.in_(ids)).order_by(Task.id)).all()
        print(f"   {'id':>4}  {'kind':<6}  {'status':<9}  {'attempts':>8}  result / errors")
        for task in tasks:
            print(
                f"   {task.id:>4}  {task.kind:<6}  {task.status.value:<9}  "
                f"{task.attempts:>8}  {task.result}"
            )
            for error in task.errors:
                print(f"{'':>38}attempt {error.attempt}: {error.exception_type}: {error.message}")
        greetings = session.scalars(
            select(Greeting.text).where(Greeting.task_id.in_(ids)).order_by(Greeting.task_id)
        ).all()
        print(f"   rows the handlers wrote, committed with their tasks: {list(greetings)}")
