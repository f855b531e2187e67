"""What per-task isolation costs in a batch: savepoint strategies side by side.

    .venv/bin/python benchmarks/savepoints.py [--n 3000] [--reps 3]
        [--pg postgresql://postgres@127.0.0.1:5432]

Runs W5's handler (read one ``app_ref`` row, insert one ``app_rows`` row, in
the handler's Session) over ``--n`` pre-enqueued tasks with
``scheduler.run_until_idle()`` on one thread, in a scratch database
(``pgotask_bench_savepoints``, dropped afterwards), for each strategy in turn,
``--reps`` times interleaved, and prints tasks/s (median) and the ratio to
the unsafe floor, and the client CPU per task (this process):

* ``own transaction``: ``batch_size=1``, one transaction (and commit) per task;
* ``savepoint + release``: batches of 100 where every task after the first
  sends ``SAVEPOINT`` and ``RELEASE SAVEPOINT`` as SQLAlchemy does by itself
  (the library's savepoint hooks bypassed): two extra round trips per task;
* ``lazy, pipelined``: the savepoint is held back until the handler's
  first statement and goes out in the same network write (psycopg pipeline
  mode), never released;
* ``library``: batches of 100 as the worker runs them: the held-back
  savepoint is sent as a round trip of its own just before the handler's
  first statement, and never released;
* ``library, no savepoint``: as ``library`` but the task savepoints are
  never sent (unsafe): what the ORM Session per task and the rest cost;
* ``no isolation``: hand-written psycopg, the same SQL in one transaction per
  100 tasks with no savepoints at all: a failing task would roll back the
  others (what guarantee 2 forbids), shown as the floor.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import psycopg
from sqlalchemy import create_engine, text
from sqlalchemy.orm import Session, sessionmaker

from sqla_pgotask import Scheduler, Task
from sqla_pgotask.engine import savepoints as _savepoints
from sqla_pgotask.migrate import upgrade

DB = "pgotask_bench_savepoints"
SCHEMA = """
CREATE TABLE app_ref (id int PRIMARY KEY, v text NOT NULL);
INSERT INTO app_ref SELECT g, md5(g::text) FROM generate_series(1, 1000) g;
CREATE TABLE app_rows (id bigserial PRIMARY KEY, seq bigint NOT NULL UNIQUE, v text NOT NULL);
"""
READ = "SELECT v FROM app_ref WHERE id = %s"
WRITE = "INSERT INTO app_rows (seq, v) VALUES (%s, %s)"


class _Pipelined(_savepoints.LazySavepoints):
    """Sends a held-back savepoint in the next statement's network write (pipeline mode)."""

    send = "pipelined"


class _Dropped(_savepoints.LazySavepoints):
    """Never sends a task's savepoint (unsafe): what the rest of the library costs."""

    def rollback_to(self, name: str) -> str | None:
        return None if name == self.name else name

    def execute(self, cursor: Any, statement: str, run: Any) -> bool:
        self.statements += 1
        return False


class _Passthrough(_savepoints.LazySavepoints):
    """Sends every statement as SQLAlchemy asks: SAVEPOINT and RELEASE included."""

    def hold(self, name: str) -> bool:
        if self.armed:
            self.open += 1
        return False

    def release(self, name: str) -> bool:
        return False

    def rollback_to(self, name: str) -> str | None:
        self.statements += 1
        return name

    def execute(self, cursor: Any, statement: str, run: Any) -> bool:
        self.statements += 1
        return False


def _enqueue(url: str, n: int, start: int) -> None:
    with psycopg.connect(url) as conn:
        conn.execute(
            "INSERT INTO pgotask_task (kind, payload) "
            "SELECT 'w5', jsonb_build_object('seq', g) FROM generate_series(%s::int, %s::int) g",
            (start, start + n - 1),
        )
        conn.execute("TRUNCATE app_rows")


def _library(
    session_factory: sessionmaker[Session],
    batch: int,
    state: type[_savepoints.LazySavepoints] = _savepoints.LazySavepoints,
) -> int:
    scheduler = Scheduler(session_factory, batch_window=10.0)
    read, write = (
        text("SELECT v FROM app_ref WHERE id = :k"),
        text("INSERT INTO app_rows (seq, v) VALUES (:s, :v)"),
    )

    @scheduler.handler("w5")
    def w5(session: Session, task: Task) -> None:
        seq = task.payload["seq"]
        v = session.execute(read, {"k": seq % 1000 + 1}).scalar_one()
        session.execute(write, {"s": seq, "v": v})

    register = _savepoints.register

    def instead(dbapi_connection: Any) -> _savepoints.LazySavepoints:
        _savepoints._batches[dbapi_connection] = lazy = state()
        return lazy

    _savepoints.register = instead  # type: ignore[assignment]
    try:
        return scheduler.run_until_idle(batch_size=batch)
    finally:
        _savepoints.register = register  # type: ignore[assignment]


def _no_isolation(url: str) -> int:
    done = 0
    with psycopg.connect(url) as conn:
        while True:
            with conn.transaction():
                rows = conn.execute(
                    "SELECT id, payload FROM pgotask_task WHERE status = 'pending' "
                    "ORDER BY id LIMIT 100 FOR UPDATE SKIP LOCKED"
                ).fetchall()
                for _, payload in rows:
                    seq = payload["seq"]
                    (v,) = conn.execute(READ, (seq % 1000 + 1,)).fetchone() or ("",)
                    conn.execute(WRITE, (seq, v))
                conn.execute(
                    "UPDATE pgotask_task SET status = 'succeeded', attempts = attempts + 1, "
                    "finished_at = now() WHERE id = ANY(%s)",
                    ([r[0] for r in rows],),
                )
            if not rows:
                return done
            done += len(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432")
    p.add_argument("--n", type=int, default=3000)
    p.add_argument("--reps", type=int, default=3)
    a = p.parse_args()
    admin = f"{a.pg}/postgres"
    url = f"{a.pg}/{DB}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {DB}")
    try:
        sqla_url = url.replace("postgresql://", "postgresql+psycopg://", 1)
        upgrade(sqla_url)
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(SCHEMA)
        engine = create_engine(sqla_url)
        session_factory = sessionmaker(engine)
        modes: dict[str, Any] = {
            "own transaction": lambda: _library(session_factory, 1),
            "savepoint + release": lambda: _library(session_factory, 100, _Passthrough),
            "lazy, pipelined": lambda: _library(session_factory, 100, _Pipelined),
            "library": lambda: _library(session_factory, 100),
            "library, no savepoint": lambda: _library(session_factory, 100, _Dropped),
            "no isolation": lambda: _no_isolation(url),
        }
        rates: dict[str, list[float]] = {name: [] for name in modes}
        cpu: dict[str, list[float]] = {name: [] for name in modes}
        seq = 0
        for _ in range(a.reps):
            for name, run in modes.items():
                _enqueue(url, a.n, seq)
                seq += a.n
                started, cpu_started = time.perf_counter(), time.process_time()
                ran = run()
                elapsed = time.perf_counter() - started
                assert ran == a.n, (name, ran)
                rates[name].append(ran / elapsed)
                cpu[name].append((time.process_time() - cpu_started) / ran)
        engine.dispose()
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")
    floor = statistics.median(rates["no isolation"])
    print(f"W5 handler, {a.n} tasks, one thread, median of {a.reps}")
    print(f"{'strategy':<22}{'tasks/s':>10}{'vs floor':>10}{'µs/task':>10}{'client CPU µs':>15}")
    for name, values in rates.items():
        rate = statistics.median(values)
        client = statistics.median(cpu[name]) * 1e6
        print(f"{name:<22}{rate:>10,.0f}{rate / floor:>9.2f}x{1e6 / rate:>10.0f}{client:>15.0f}")


if __name__ == "__main__":
    main()
