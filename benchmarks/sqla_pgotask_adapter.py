"""sqla_pgotask adapter for the shared Postgres job-queue benchmark harness.

Load it without touching the harness, by file path (``python -m bench.run
--adapters rawsql,SPEC``; ``benchmarks/run_side_by_side.sh`` does it all)::

    SPEC=/work/main/benchmarks/sqla_pgotask_adapter.py:SqlaPgotaskAdapter

How the library is used (its documented idioms, nothing bench-specific):

* schema: ``sqla_pgotask.migrate.upgrade(url)`` (Alembic, ``postgresql+psycopg://``);
* W1 (single enqueue): ``with Session.begin() as s: s.add(Task(kind="bench", payload=p))``,
  the ORM idiom of "a task is a row added in the application's transaction";
* W2 (bulk enqueue): ``sqla_pgotask.add_many(session, "bench", payloads)`` in one
  transaction (one ``INSERT ... SELECT``, payloads sent as one JSON array); ``--set
  sqla_pgotask.bulk=add_all`` measures the plain ORM ``session.add_all()``
  instead (SQLAlchemy 2's "insertmanyvalues" batches the INSERT ... RETURNING);
* worker: ``Scheduler(Session, concurrency=..., poll_interval=...)``, a
  ``@scheduler.handler("bench")`` ``def fn(session, task)``, and the blocking
  ``scheduler.run()`` in a thread (``asyncio.to_thread``) from ``worker_run``;
  ``scheduler.stop()`` when the harness sets ``stop`` (in-flight handlers
  finish and commit, unstarted claims are released).
* W5: the job's application SQL (``W5_SQL``: read one ``bench_app_ref`` row,
  insert one ``bench_app_rows`` row) runs **through the handler's own
  Session** (``session.execute(text(...))``), so it commits in the same
  transaction as the task's completion: one commit per job for work plus
  completion, plus the claim's own short transaction.  This is the library's
  design under test ("handler writes + completion commit together"), not one
  extra transaction per job.  ``SqlaPgotaskOrmAdapter`` (``sqla_pgotask_orm``
  in the report) does the same work in the ORM's idiom: ``session.get(Ref,
  key)`` and ``session.add(Row(...))`` on declarative models of the two tables.

The library is synchronous: every blocking call runs in a thread
(``asyncio.to_thread``) so the adapter's async contract holds.  The harness's
``handler`` bumps an unlocked shared counter (``RawValue``); our handler
threads call it under a lock so concurrent increments are not lost.

Tunables (``--set sqla_pgotask.KEY=VALUE``): ``concurrency`` (handler threads
per worker process), ``poll_interval`` (fallback poll; wake-ups come by
LISTEN/NOTIFY), ``pool_size`` (engine pool per process, 0 = concurrency + 3),
``lease_seconds``.
"""

from __future__ import annotations

import asyncio
import re
import threading
from typing import Any, ClassVar

from bench.adapters.base import W5_SQL, Adapter, Handler, w5_key

KIND = "bench"


def _sqla_url(dsn: str) -> str:
    """``postgresql://...`` (the harness's DSN) -> ``postgresql+psycopg://...``."""
    return re.sub(r"^(postgresql|postgres)(\+\w+)?://", "postgresql+psycopg://", dsn)


def _named(sql: str) -> tuple[str, list[str]]:
    """psycopg ``%s`` placeholders -> SQLAlchemy ``:p0, :p1, ...`` bind names."""
    names: list[str] = []

    def repl(_: re.Match[str]) -> str:
        names.append(f"p{len(names)}")
        return f":{names[-1]}"

    return re.sub(r"%s", repl, sql), names


class SqlaPgotaskAdapter(Adapter):
    name = "sqla_pgotask"
    defaults: ClassVar[dict[str, Any]] = {
        "loop": "asyncio",  # the library is sync; the loop only awaits threads
        # handler threads per worker process: the library's default.  With batches,
        # fewer threads make bigger batches; the project's suite (python3 dev.py bench
        # --concurrency 2/4/8) measured W5 at 1,672 / 1,865 / 1,354 jobs/s.
        "concurrency": 4,
        "poll_interval": 1.0,  # fallback poll (s); NOTIFY wakes the claim loop
        "pool_size": 0,  # SQLAlchemy pool per process; 0 = concurrency + 3
        "lease_seconds": 30.0,  # library default
        "bulk": "add_many",  # W2: "add_many" (the bulk API) or "add_all" (the ORM)
    }
    _engine: Any = None
    #: How the W5 handler reaches its tables: "text" (``session.execute(text(...))``)
    #: or "orm" (declarative models; see SqlaPgotaskOrmAdapter).
    w5_style = "text"

    @classmethod
    def versions(cls) -> dict[str, str]:
        import importlib.metadata as md

        return {
            "sqla_pgotask": md.version("sqla-pgotask"),
            "SQLAlchemy": md.version("SQLAlchemy"),
            "psycopg": md.version("psycopg"),
        }

    # ----------------------------------------------------------------- helpers
    @property
    def url(self) -> str:
        return _sqla_url(self.dsn)

    def _make_engine(self, pool_size: int) -> Any:
        from sqlalchemy import create_engine

        return create_engine(self.url, pool_size=pool_size, max_overflow=5)

    # ------------------------------------------------------------------ schema
    async def install(self) -> None:
        from sqla_pgotask.migrate import upgrade

        await asyncio.to_thread(upgrade, self.url)

    # ---------------------------------------------------------------- producer
    async def open_producer(self) -> None:
        from sqlalchemy.orm import sessionmaker

        self._engine = self._make_engine(2)
        self._Session = sessionmaker(self._engine)
        # Connect now (and warm the mapper/compiled cache), outside timed windows.
        await asyncio.to_thread(self._warm_producer)

    def _warm_producer(self) -> None:
        from sqlalchemy import text

        with self._Session() as s:
            s.execute(text("SELECT 1"))

    async def close_producer(self) -> None:
        if self._engine is not None:
            await asyncio.to_thread(self._engine.dispose)
            self._engine = None

    def _enqueue_one(self, payload: dict) -> None:
        from sqla_pgotask import Task

        with self._Session.begin() as s:
            s.add(Task(kind=KIND, payload=payload))

    def _enqueue_batch(self, payloads: list[dict]) -> None:
        from sqla_pgotask import Task, add_many

        if self.settings["bulk"] == "add_all":
            tasks = [Task(kind=KIND, payload=p) for p in payloads]
            with self._Session.begin() as s:
                s.add_all(tasks)
        else:
            # The bulk API's form for tasks of one kind: no ORM objects, the
            # payloads serialised once, one INSERT ... SELECT.
            with self._Session.begin() as s:
                add_many(s, KIND, payloads)

    async def enqueue_one(self, payload: dict) -> None:
        await asyncio.to_thread(self._enqueue_one, payload)

    async def enqueue_batch(self, payloads: list[dict]) -> None:
        await asyncio.to_thread(self._enqueue_batch, payloads)

    # ------------------------------------------------------------------ worker
    def _scheduler(self) -> Any:
        from sqlalchemy.orm import sessionmaker

        from sqla_pgotask import Scheduler

        concurrency = int(self.settings["concurrency"])
        pool = int(self.settings["pool_size"]) or concurrency + 3
        self._engine = self._make_engine(pool)
        self._Session = sessionmaker(self._engine)
        self._scheduler_obj = Scheduler(
            self._Session,
            concurrency=concurrency,
            poll_interval=float(self.settings["poll_interval"]),
            lease_seconds=float(self.settings["lease_seconds"]),
        )
        return self._scheduler_obj

    @staticmethod
    def _locked(handler: Handler) -> Handler:
        lock = threading.Lock()

        def call(payload: dict) -> None:
            with lock:
                handler(payload)

        return call

    async def worker_setup(self, handler: Handler) -> None:
        scheduler = self._scheduler()
        bench_handler = self._locked(handler)

        @scheduler.handler(KIND)
        def bench(session: Any, task: Any) -> None:
            bench_handler(task.payload)

        await asyncio.to_thread(self._warm_worker)

    async def worker_setup_w5(self, handler: Handler) -> None:
        if self.w5_style == "orm":
            return await self._worker_setup_w5_orm(handler)
        from sqlalchemy import text

        scheduler = self._scheduler()
        bench_handler = self._locked(handler)
        read_sql, read_names = _named(W5_SQL["psycopg"][0])
        write_sql, write_names = _named(W5_SQL["psycopg"][1])
        read, write = text(read_sql), text(write_sql)

        @scheduler.handler(KIND)
        def bench_w5(session: Any, task: Any) -> None:
            payload = task.payload
            bench_handler(payload)
            seq = payload["seq"]
            # Through the handler's Session: commits with the task's completion.
            v = session.execute(
                read, dict(zip(read_names, (w5_key(seq),), strict=True))
            ).scalar_one()
            session.execute(write, dict(zip(write_names, (seq, v), strict=True)))

        await asyncio.to_thread(self._warm_worker)

    async def _worker_setup_w5_orm(self, handler: Handler) -> None:
        from sqlalchemy import BigInteger, Integer, Text
        from sqlalchemy.orm import DeclarativeBase, mapped_column

        # Unannotated columns: this module's annotations are strings, and
        # these names are imported here, where workers need them.
        class Base(DeclarativeBase):
            pass

        class Ref(Base):
            __tablename__ = "bench_app_ref"
            id = mapped_column(Integer, primary_key=True)
            v = mapped_column(Text, nullable=False)

        class Row(Base):
            __tablename__ = "bench_app_rows"
            id = mapped_column(BigInteger, primary_key=True)
            seq = mapped_column(BigInteger, nullable=False)
            v = mapped_column(Text, nullable=False)

        scheduler = self._scheduler()
        bench_handler = self._locked(handler)

        @scheduler.handler(KIND)
        def bench_w5_orm(session: Any, task: Any) -> None:
            payload = task.payload
            bench_handler(payload)
            seq = payload["seq"]
            ref = session.get(Ref, w5_key(seq))
            session.add(Row(seq=seq, v=ref.v))

        await asyncio.to_thread(self._warm_worker)

    def _warm_worker(self) -> None:
        # Schema check and a first connection before the clock starts
        # (Scheduler.run() would otherwise do the schema check inside the window).
        self._scheduler_obj.check_schema()

    async def worker_run(self, stop: asyncio.Event) -> None:
        scheduler = self._scheduler_obj
        run = asyncio.create_task(asyncio.to_thread(scheduler.run))
        stopper = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait({run, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if run in done:  # the worker ended on its own: surface the error
            stopper.cancel()
            run.result()
            return
        scheduler.stop()  # graceful: running handlers finish and commit
        await run

    async def worker_teardown(self) -> None:
        if self._engine is not None:
            await asyncio.to_thread(self._engine.dispose)
            self._engine = None

    # ------------------------------------------------------------ verification
    def sql_total(self) -> str:
        return "SELECT count(*) FROM pgotask_task"

    def sql_pending(self) -> str:
        return "SELECT count(*) FROM pgotask_task WHERE status IN ('pending', 'running')"

    def sql_completed(self) -> str:
        return "SELECT count(*) FROM pgotask_task WHERE status = 'succeeded'"


class SqlaPgotaskOrmAdapter(SqlaPgotaskAdapter):
    """The same library, W5's handler in the ORM's idiom (``session.get``, ``session.add``)."""

    name = "sqla_pgotask_orm"
    w5_style = "orm"
