"""What deduplication costs at enqueue: tasks with a ``dedup_key`` against tasks without.

A task with a key goes through the ``pgotask_dedup`` BEFORE INSERT trigger (a
transaction-scoped advisory lock and a lookup of the live task of that key);
a task without one does not (the trigger's ``WHEN`` clause).  Each round
enqueues ``--n`` tasks per variant, one transaction each, in turn, against one
fresh database; the report gives tasks/s at the median over the rounds and
the time ratios keyed/plain from the same rounds (the machine is shared and
noisy, so only ratios within a run mean anything).

    .venv/bin/python benchmarks/dedup_enqueue.py [--n 1000] [--rounds 7]
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid
from collections.abc import Callable

from sqlalchemy import Engine, create_engine, make_url, text
from sqlalchemy.orm import Session, sessionmaker

from sqla_pgotask import Task, add_many
from sqla_pgotask.migrate import upgrade

DEFAULT_SERVER = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
DATABASE = "pgotask_bench_dedup"


def _variants(factory: sessionmaker[Session], n: int) -> dict[str, Callable[[], None]]:
    def key() -> str:
        return uuid.uuid4().hex

    def orm(keyed: bool) -> Callable[[], None]:
        def run() -> None:
            with factory.begin() as s:
                s.add_all(
                    [
                        Task(kind="k", payload={"i": i}, dedup_key=key() if keyed else None)
                        for i in range(n)
                    ]
                )

        return run

    def bulk(keyed: bool, same: bool = False) -> Callable[[], None]:
        def run() -> None:
            rows = [
                {
                    "kind": "k",
                    "payload": {"i": i},
                    "dedup_key": "same" if same else (key() if keyed else None),
                }
                for i in range(n)
            ]
            with factory.begin() as s:
                add_many(s, rows)

        return run

    return {
        "session.add, no key": orm(False),
        "session.add, unique keys": orm(True),
        "add_many, no key": bulk(False),
        "add_many, unique keys": bulk(True),
        "add_many, all one key": bulk(True, same=True),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", default=DEFAULT_SERVER, help="server URL (any database)")
    parser.add_argument("--n", type=int, default=1000, help="tasks per operation")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()

    admin = create_engine(args.server, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)"))
        conn.execute(text(f"CREATE DATABASE {DATABASE}"))
    url = make_url(args.server).set(database=DATABASE)
    engine: Engine = create_engine(url)
    try:
        upgrade(engine)
        variants = _variants(sessionmaker(engine), args.n)
        times: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(args.rounds):
            for name, run in variants.items():
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
            with engine.begin() as conn:
                conn.execute(text("TRUNCATE pgotask_task CASCADE"))
        medians = {name: statistics.median(ts) for name, ts in times.items()}
        for name, median in medians.items():
            print(f"{name:26s} {args.n / median:9.0f} tasks/s")
        for form in ("session.add", "add_many"):
            ratio = medians[f"{form}, unique keys"] / medians[f"{form}, no key"]
            print(f"{form}: time with unique keys / without = {ratio:.2f}")
    finally:
        engine.dispose()
        with admin.connect() as conn:
            conn.execute(text(f"DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)"))
        admin.dispose()


if __name__ == "__main__":
    main()
