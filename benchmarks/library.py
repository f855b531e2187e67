"""sqla_pgotask under test, through its public API and documented idioms only.

* schema: ``sqla_pgotask.migrate.upgrade(url)``;
* one task per transaction: ``with Session.begin() as s: s.add(Task(...))``;
* bulk: ``add_many(session, tasks)`` of new ``Task`` objects; also
  ``add_many(session, kind, payloads)`` where the library offers that form,
  and the ORM's ``session.add_all(tasks)``; one transaction per call;
* worker: ``Scheduler(Session, concurrency=..., poll_interval=...)``, a
  ``@scheduler.handler(KIND)`` ``def handler(session, task)``, the blocking
  ``scheduler.run()``, and ``scheduler.stop()`` from another thread;
* W5: the handler's SQL runs through the handler's own Session
  (``session.execute(text(...))``), so it commits with the task's completion.
"""

from __future__ import annotations

import dataclasses
import inspect
import threading
from collections.abc import Callable
from typing import Any

from sqlalchemy import create_engine, text
from sqlalchemy.orm import Session, configure_mappers, sessionmaker

from benchmarks.common import APP_READ_SQLA, APP_WRITE_SQLA, KIND, ref_key
from sqla_pgotask import Scheduler, Task, add_many
from sqla_pgotask.migrate import upgrade

Handler = Callable[[dict[str, Any]], None]

NAME = "sqla_pgotask"
#: ``pool_size`` 0 = ``concurrency + 3`` (handler threads, claim loop, spare)
DEFAULTS: dict[str, Any] = {"concurrency": 4, "poll_interval": 1.0, "pool_size": 0}

#: W2's forms of bulk enqueue: ``add_many(session, tasks)``, ``add_many(session, kind,
#: payloads)`` (where the library has it), the ORM's ``session.add_all(tasks)``
BULK = ("add_many", "add_many_kind", "add_all")

PENDING_SQL = "SELECT count(*) FROM pgotask_task WHERE status IN ('pending', 'running')"
SUCCEEDED_SQL = "SELECT count(*) FROM pgotask_task WHERE status = 'succeeded'"
TOTAL_SQL = "SELECT count(*) FROM pgotask_task"


def has_kind_form() -> bool:
    """Whether ``add_many`` also takes ``(session, kind, payloads)`` (no ``Task`` objects)."""
    return "payloads" in inspect.signature(add_many).parameters


def install(url: str) -> None:
    """Install the library's tables in the (empty) database at ``url``."""
    upgrade(url)


class Producer:
    """The application side: an engine, a ``sessionmaker``, one transaction per call."""

    def __init__(self, url: str, bulk: str = "add_many") -> None:
        if bulk not in BULK:
            raise ValueError(f"bulk must be one of {BULK}, not {bulk!r}")
        self.bulk = bulk
        self.engine = create_engine(url, pool_size=1, max_overflow=1)
        self.Session = sessionmaker(self.engine)
        # Connect and configure the mappers before any clock starts.
        configure_mappers()
        with self.Session() as session:
            session.execute(text("SELECT 1"))

    def enqueue_one(self, payload: dict[str, Any]) -> None:
        with self.Session.begin() as session:
            session.add(Task(kind=KIND, payload=payload))

    def enqueue_many(self, payloads: list[dict[str, Any]]) -> None:
        if self.bulk == "add_many_kind":
            with self.Session.begin() as session:
                add_many(session, KIND, payloads)
            return
        tasks = [Task(kind=KIND, payload=p) for p in payloads]
        with self.Session.begin() as session:
            if self.bulk == "add_all":
                session.add_all(tasks)
            else:
                add_many(session, tasks)

    def close(self) -> None:
        self.engine.dispose()


class Worker:
    """One ``Scheduler`` with one handler for :data:`KIND`, run in this process."""

    def __init__(self, url: str, settings: dict[str, Any], handler: Handler, w5: bool) -> None:
        concurrency = int(settings["concurrency"])
        pool_size = int(settings["pool_size"]) or concurrency + 3
        self.engine = create_engine(url, pool_size=pool_size, max_overflow=5)
        self.scheduler = Scheduler(
            sessionmaker(self.engine),
            concurrency=concurrency,
            poll_interval=float(settings["poll_interval"]),
        )
        self.stats: dict[str, int] = {}
        if w5:
            read, write = text(APP_READ_SQLA), text(APP_WRITE_SQLA)

            @self.scheduler.handler(KIND)
            def bench_w5(session: Session, task: Task) -> None:
                payload = task.payload
                handler(payload)
                seq = payload["seq"]
                # The handler's own Session: commits with the task's completion.
                v = session.execute(read, {"id": ref_key(seq)}).scalar_one()
                session.execute(write, {"seq": seq, "v": v})

        else:

            @self.scheduler.handler(KIND)
            def bench(session: Session, task: Task) -> None:
                handler(task.payload)

    def prepare(self) -> None:
        """Check the schema (and so connect) before the clock starts."""
        self.scheduler.check_schema()

    def run(self, stop: threading.Event) -> None:
        """``scheduler.run()`` until ``stop`` is set, then ``scheduler.stop()``."""
        finished = threading.Event()

        def stop_when_asked() -> None:
            stop.wait()
            # stop() is a no-op before run() has started: repeat until it returned.
            while not finished.is_set():
                self.scheduler.stop()
                finished.wait(0.05)

        threading.Thread(target=stop_when_asked, daemon=True).start()
        try:
            stats = self.scheduler.run()
            self.stats = {k: int(v) for k, v in dataclasses.asdict(stats).items()}
        finally:
            finished.set()

    def close(self) -> None:
        self.engine.dispose()
