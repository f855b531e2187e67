"""Profile one worker process draining pre-enqueued no-op tasks (a W3-like drain).

    python benchmarks/profile_drain.py [--n 5000] [--concurrency 4] [--w5] [--top 15]
        [--pg postgresql://postgres@127.0.0.1:5432] [--dump out.prof]

Creates a scratch database ``bench_pgotask_profile`` (dropped afterwards),
installs the schema, enqueues ``--n`` tasks (untimed, one ``add_all``
transaction per 1,000), then runs ``Scheduler.run()`` in this process until
every task succeeded.  Every thread of the worker (claim loop, handler
threads, listener, maintenance) runs under its own ``cProfile`` profiler; the
profiles are merged and the top functions printed by own time (``tottime``)
and by cumulative time.  ``--w5`` adds the W5 application SQL to the handler
(through the handler's Session).  cProfile roughly doubles Python CPU time:
use the ranking, not the absolute rate.  For a sampling view without that
overhead: ``py-spy record -o drain.svg -- python benchmarks/profile_drain.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import pstats
import threading
import time
from typing import Any

import psycopg
from sqlalchemy import create_engine, text
from sqlalchemy.orm import sessionmaker

from sqla_pgotask import Scheduler, Task
from sqla_pgotask.migrate import upgrade

DB = "bench_pgotask_profile"
W5_SCHEMA = """
CREATE TABLE bench_app_ref (id int PRIMARY KEY, v text NOT NULL);
INSERT INTO bench_app_ref (id, v) SELECT g, md5(g::text) FROM generate_series(1, 1000) g;
CREATE TABLE bench_app_rows (id bigserial PRIMARY KEY, seq bigint NOT NULL UNIQUE, v text NOT NULL);
"""


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432")
    p.add_argument("--n", type=int, default=5000)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--w5", action="store_true")
    p.add_argument("--top", type=int, default=15)
    p.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall: where each thread waits (round trips, idle queues); "
        "cpu: per-thread CPU time (time.thread_time), where Python burns CPU",
    )
    p.add_argument("--dump", default=None, help="write the merged profile (pstats) here")
    a = p.parse_args()

    with psycopg.connect(f"{a.pg}/postgres", autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {DB}")
        admin.execute(f"CREATE DATABASE {DB}")
    url = a.pg.replace("postgresql://", "postgresql+psycopg://", 1) + f"/{DB}"
    engine = create_engine(url, pool_size=a.concurrency + 3)
    try:
        _run(a, url, engine)
    finally:
        engine.dispose()
        with psycopg.connect(f"{a.pg}/postgres", autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")


def _run(a: argparse.Namespace, url: str, engine: Any) -> None:
    upgrade(url)
    session_factory = sessionmaker(engine)
    with session_factory.begin() as s:
        if a.w5:
            s.connection().exec_driver_sql(W5_SCHEMA)
    for start in range(0, a.n, 1000):
        with session_factory.begin() as s:
            s.add_all(
                [
                    Task(kind="bench", payload={"seq": i, "t0": 0})
                    for i in range(start, min(a.n, start + 1000))
                ]
            )

    scheduler = Scheduler(session_factory, concurrency=a.concurrency)
    read = text("SELECT v FROM bench_app_ref WHERE id = :id")
    write = text("INSERT INTO bench_app_rows (seq, v) VALUES (:seq, :v)")

    @scheduler.handler("bench")
    def bench(session: Any, task: Task) -> None:
        seq = task.payload["seq"]
        if a.w5:
            v = session.execute(read, {"id": seq % 1000 + 1}).scalar_one()
            session.execute(write, {"seq": seq, "v": v})

    scheduler.check_schema()

    # One profiler per thread, merged at the end.
    def new_profile() -> cProfile.Profile:
        return cProfile.Profile(time.thread_time) if a.clock == "cpu" else cProfile.Profile()

    profiles: list[cProfile.Profile] = []
    lock = threading.Lock()
    original_run = threading.Thread.run

    def profiled_run(self: threading.Thread) -> None:
        prof = new_profile()
        with lock:
            profiles.append(prof)
        prof.enable()
        try:
            original_run(self)
        finally:
            prof.disable()

    threading.Thread.run = profiled_run  # type: ignore[method-assign]

    def watch() -> None:  # polls the DB (profiled too: a separate thread; cheap)
        with psycopg.connect(f"{a.pg}/{DB}", autocommit=True) as conn:
            while True:
                left = conn.execute(
                    "SELECT count(*) FROM pgotask_task WHERE status IN ('pending','running')"
                ).fetchone()[0]
                if left == 0:
                    break
                time.sleep(0.05)
        scheduler.stop()

    main_prof = new_profile()
    t0 = time.perf_counter()
    threading.Thread(target=watch, name="watch", daemon=True).start()
    main_prof.enable()
    scheduler.run()
    main_prof.disable()
    elapsed = time.perf_counter() - t0
    threading.Thread.run = original_run  # type: ignore[method-assign]

    print(
        f"drained {a.n} tasks in {elapsed:.2f}s = {a.n / elapsed:,.0f}/s under cProfile "
        f"(concurrency={a.concurrency}{', w5' if a.w5 else ''}, clock={a.clock})"
    )
    stats = pstats.Stats(main_prof)
    for prof in profiles:
        with contextlib.suppress(TypeError):  # a profiler that never collected anything
            stats.add(prof)
    if a.dump:
        stats.dump_stats(a.dump)
    stats.sort_stats("tottime").print_stats(a.top)
    stats.sort_stats("cumulative").print_stats(a.top * 2)


if __name__ == "__main__":
    main()
