"""Enqueue micro-benchmark: sqla_pgotask's enqueue paths against raw psycopg, in one run.

W1: one task per transaction.  W2: 1,000 tasks per call, in one transaction.
Every variant runs in the same process against the same fresh database, one
operation of each in turn (the machine is shared and noisy).  A round's rate
is jobs per operation over the median operation time, divided by the raw
baseline's in the same round; the report gives the medians over the rounds.

    .venv/bin/python benchmarks/enqueue_micro.py                 # W1 and W2, 7 rounds
    .venv/bin/python benchmarks/enqueue_micro.py --diagnose      # plus the floors
    .venv/bin/python benchmarks/enqueue_micro.py --profile w1:orm

The raw baseline is the side-by-side harness's hand-written psycopg queue: a ``jobs``
table with a statement-level ``AFTER INSERT`` trigger calling ``pg_notify``;
W1 ``INSERT ... VALUES (...) RETURNING id`` on an autocommit connection
(insert and commit in one round trip), W2 ``INSERT ... SELECT ... FROM
jsonb_array_elements(...) RETURNING id``, also in autocommit.

Variants (``--only`` picks some; ``raw`` always runs):

* W1 ``orm``: ``with Session.begin() as s: s.add(Task(kind=..., payload=p))``;
  ``add_many``: ``add_many(s, kind, [p])`` in the same transaction shape.
* W2 ``add_all``: ``s.add_all([Task(...) for p in payloads])``;
  ``add_many_tasks``: ``add_many(s, [Task(...), ...])``;
  ``add_many_dicts``: ``add_many(s, [{"kind": ..., "payload": p}, ...])``;
  ``add_many_kind``: ``add_many(s, kind, payloads)``;
  ``add_many_kind_ids``: the same with ``return_ids=True`` (raw returns ids too).
* ``--diagnose`` adds the floors: W1 ``raw_tx`` (psycopg with an explicit
  transaction: BEGIN, INSERT, COMMIT, the round trips any ``Session.begin()``
  costs), ``orm_plain`` (a plain SQLAlchemy model of the same shape as
  ``Task``: no listener, no trigger, no relationship), ``orm_min`` (a model
  of three columns): SQLAlchemy's own cost; W2 ``raw_tx``, ``add_all_plain``
  and ``add_all_min`` (``add_all()`` of those models) and ``copy`` (psycopg
  ``COPY`` on the Session's connection).
"""

from __future__ import annotations

import argparse
import cProfile
import datetime as dt
import json
import os
import pstats
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg.types.json import Jsonb
from sqlalchemy import (
    BigInteger,
    DateTime,
    Engine,
    Identity,
    Integer,
    MetaData,
    Text,
    create_engine,
    func,
    make_url,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from sqla_pgotask import Task, add_many
from sqla_pgotask.migrate import upgrade

DEFAULT_SERVER = "postgresql://postgres@127.0.0.1:5432/postgres"
KIND = "bench"

RAW_SCHEMA = """
CREATE TABLE jobs (
    id           bigserial PRIMARY KEY,
    queue        text        NOT NULL DEFAULT 'default',
    kind         text        NOT NULL,
    payload      jsonb       NOT NULL DEFAULT '{}',
    status       text        NOT NULL DEFAULT 'queued',
    priority     int         NOT NULL DEFAULT 0,
    run_at       timestamptz NOT NULL DEFAULT now(),
    attempts     int         NOT NULL DEFAULT 0,
    max_attempts int         NOT NULL DEFAULT 3,
    locked_by    text,
    locked_at    timestamptz,
    created_at   timestamptz NOT NULL DEFAULT now(),
    finished_at  timestamptz
);
CREATE INDEX jobs_runnable_idx ON jobs (queue, priority DESC, id) WHERE status = 'queued';
CREATE FUNCTION jobs_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('rawsql_jobs', '');
    RETURN NULL;
END $$;
CREATE TRIGGER jobs_notify AFTER INSERT ON jobs
    FOR EACH STATEMENT EXECUTE FUNCTION jobs_notify();
"""
RAW_INSERT_ONE = "INSERT INTO jobs (queue, kind, payload) VALUES (%s, %s, %s) RETURNING id"
RAW_INSERT_MANY = (
    "INSERT INTO jobs (queue, kind, payload) "
    "SELECT %s, %s, p FROM jsonb_array_elements(%s::jsonb) AS p RETURNING id"
)
TASK_INSERT_ONE = "INSERT INTO pgotask_task (kind, payload) VALUES (%s, %s) RETURNING id"

_TZ = DateTime(timezone=True)


class _FloorBase(DeclarativeBase):
    metadata = MetaData()


class PlainTask(_FloorBase):
    """``Task``'s columns and server defaults, as a plain model: SQLAlchemy's own cost."""

    __tablename__ = "micro_plain_task"

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    kind: Mapped[str] = mapped_column(Text)
    queue: Mapped[str] = mapped_column(Text, server_default=text("'default'"))
    payload: Mapped[Any] = mapped_column(JSONB, server_default=text("'{}'::jsonb"))
    status: Mapped[str] = mapped_column(Text, server_default=text("'pending'"))
    priority: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    run_at: Mapped[dt.datetime] = mapped_column(_TZ, server_default=func.now())
    attempts: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    max_attempts: Mapped[int | None] = mapped_column(Integer)
    dedup_key: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(_TZ, server_default=func.now())
    started_at: Mapped[dt.datetime | None] = mapped_column(_TZ)
    finished_at: Mapped[dt.datetime | None] = mapped_column(_TZ)
    locked_by: Mapped[str | None] = mapped_column(Text)
    lease_expires_at: Mapped[dt.datetime | None] = mapped_column(_TZ)
    result: Mapped[Any | None] = mapped_column(JSONB)
    cancel_requested_at: Mapped[dt.datetime | None] = mapped_column(_TZ)


class MinimalTask(_FloorBase):
    """Three columns, nothing fetched back: about the least an ORM insert costs."""

    __tablename__ = "micro_min_task"
    __mapper_args__ = {"eager_defaults": False}  # noqa: RUF012

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    kind: Mapped[str] = mapped_column(Text)
    payload: Mapped[Any] = mapped_column(JSONB)


def _payload(seq: int) -> dict[str, int]:
    return {"seq": seq, "t0": time.time_ns()}


class Bench:
    """The database, connections and every variant's one operation."""

    def __init__(self, server_url: str, batch: int) -> None:
        self.batch = batch
        self.server = make_url(server_url).set(drivername="postgresql")
        self.name = f"pgotask_micro_{os.getpid()}"
        self.dsn = self.server.set(database=self.name).render_as_string(hide_password=False)
        self.url = (
            self.server.set(drivername="postgresql+psycopg", database=self.name)
        ).render_as_string(hide_password=False)
        self.seq = 0

    def _admin(self, sql: str) -> None:
        dsn = self.server.render_as_string(hide_password=False)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(sql)

    @contextmanager
    def database(self) -> Iterator[None]:
        self._admin(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
        self._admin(f'CREATE DATABASE "{self.name}"')
        engine: Engine | None = None
        try:
            upgrade(self.url)
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                conn.execute(RAW_SCHEMA)
            engine = create_engine(self.url, pool_size=2)
            _FloorBase.metadata.create_all(engine)
            self.engine = engine
            self.session = sessionmaker(engine)
            self.raw = psycopg.connect(self.dsn, autocommit=True)
            self.raw_tx = psycopg.connect(self.dsn)
            yield
        finally:
            for name in ("raw", "raw_tx"):
                if hasattr(self, name):
                    getattr(self, name).close()
            if engine is not None:
                engine.dispose()
            self._admin(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')

    def truncate(self) -> None:
        self.raw.execute(
            "TRUNCATE jobs, pgotask_task, micro_plain_task, micro_min_task RESTART IDENTITY CASCADE"
        )

    def payloads(self) -> list[dict[str, int]]:
        start = self.seq
        self.seq += self.batch
        return [{"seq": i, "t0": 0} for i in range(start, start + self.batch)]

    # ------------------------------------------------------------------ W1
    def w1_raw(self, p: dict[str, int]) -> None:
        self.raw.execute(RAW_INSERT_ONE, ("default", KIND, Jsonb(p))).fetchone()

    def w1_raw_tx(self, p: dict[str, int]) -> None:
        with self.raw_tx.transaction():
            self.raw_tx.execute(TASK_INSERT_ONE, (KIND, Jsonb(p))).fetchone()

    def w1_orm(self, p: dict[str, int]) -> None:
        with self.session.begin() as s:
            s.add(Task(kind=KIND, payload=p))

    def w1_add_many(self, p: dict[str, int]) -> None:
        with self.session.begin() as s:
            add_many(s, KIND, [p])

    def w1_orm_plain(self, p: dict[str, int]) -> None:
        with self.session.begin() as s:
            s.add(PlainTask(kind=KIND, payload=p))

    def w1_orm_min(self, p: dict[str, int]) -> None:
        with self.session.begin() as s:
            s.add(MinimalTask(kind=KIND, payload=p))

    # ------------------------------------------------------------------ W2
    def w2_raw(self, ps: list[dict[str, int]]) -> None:
        self.raw.execute(RAW_INSERT_MANY, ("default", KIND, Jsonb(ps))).fetchall()

    def w2_raw_tx(self, ps: list[dict[str, int]]) -> None:
        with self.raw_tx.transaction():
            self.raw_tx.execute(RAW_INSERT_MANY, ("default", KIND, Jsonb(ps))).fetchall()

    def w2_add_all(self, ps: list[dict[str, int]]) -> None:
        with self.session.begin() as s:
            s.add_all([Task(kind=KIND, payload=p) for p in ps])

    def w2_add_all_plain(self, ps: list[dict[str, int]]) -> None:
        with self.session.begin() as s:
            s.add_all([PlainTask(kind=KIND, payload=p) for p in ps])

    def w2_add_all_min(self, ps: list[dict[str, int]]) -> None:
        with self.session.begin() as s:
            s.add_all([MinimalTask(kind=KIND, payload=p) for p in ps])

    def w2_add_many_tasks(self, ps: list[dict[str, int]]) -> None:
        with self.session.begin() as s:
            add_many(s, [Task(kind=KIND, payload=p) for p in ps])

    def w2_add_many_dicts(self, ps: list[dict[str, int]]) -> None:
        with self.session.begin() as s:
            add_many(s, [{"kind": KIND, "payload": p} for p in ps])

    def w2_add_many_kind(self, ps: list[dict[str, int]]) -> None:
        with self.session.begin() as s:
            add_many(s, KIND, ps)

    def w2_add_many_kind_ids(self, ps: list[dict[str, int]]) -> None:
        with self.session.begin() as s:
            add_many(s, KIND, ps, return_ids=True)

    def w2_copy(self, ps: list[dict[str, int]]) -> None:
        encode = json.JSONEncoder(allow_nan=False).encode
        with self.session.begin() as s:
            conn = s.connection().connection.driver_connection
            assert isinstance(conn, psycopg.Connection)
            data = "".join(f"{KIND}\t{encode(p).replace(chr(92), chr(92) * 2)}\n" for p in ps)
            with (
                conn.cursor() as cur,
                cur.copy("COPY pgotask_task (kind, payload) FROM STDIN") as copy,
            ):
                copy.write(data)


W1 = ["raw", "orm", "add_many"]
W2 = ["raw", "add_all", "add_many_tasks", "add_many_dicts", "add_many_kind", "add_many_kind_ids"]
W1_DIAGNOSE = ["raw_tx", "orm_plain", "orm_min"]
W2_DIAGNOSE = ["raw_tx", "add_all_plain", "add_all_min", "copy"]


def _operations(bench: Bench, workload: str, variants: list[str], count: int) -> list[Any]:
    if workload == "w1":
        args = [_payload(bench.seq + i) for i in range(count * len(variants))]
        bench.seq += len(args)
        return args
    return [bench.payloads() for _ in range(count * len(variants))]


def _round(
    bench: Bench, workload: str, variants: list[str], count: int, first: int
) -> dict[str, tuple[list[float], float]]:
    """``count`` operations of each variant, interleaved one by one.

    Returns, per variant, each operation's wall time and the total CPU time.
    """
    ops: dict[str, Callable[[Any], None]] = {v: getattr(bench, f"{workload}_{v}") for v in variants}
    order = variants[first:] + variants[:first]
    args = iter(_operations(bench, workload, variants, count))
    times: dict[str, list[float]] = {v: [] for v in variants}
    cpu = dict.fromkeys(variants, 0.0)
    clock, cpu_clock = time.perf_counter, time.process_time
    for _ in range(count):
        for variant in order:
            arg = next(args)
            c0, t0 = cpu_clock(), clock()
            ops[variant](arg)
            t1, c1 = clock(), cpu_clock()
            times[variant].append(t1 - t0)
            cpu[variant] += c1 - c0
    return {v: (times[v], cpu[v]) for v in variants}


def measure(
    bench: Bench, workload: str, variants: list[str], rounds: int, count: int
) -> dict[str, dict[str, float]]:
    """Per variant: jobs/s and ratio to raw (medians over rounds), CPU per job.

    A round's rate is the jobs per operation over the median operation time,
    so a stall caused by another process weighs little.
    """
    jobs_per_op = 1 if workload == "w1" else bench.batch
    rates: dict[str, list[float]] = {v: [] for v in variants}
    ratios: dict[str, list[float]] = {v: [] for v in variants}
    cpu: dict[str, list[float]] = {v: [] for v in variants}
    _round(bench, workload, variants, max(5, count // 10), 0)  # warm-up: prepared statements
    for r in range(rounds):
        bench.truncate()
        result = _round(bench, workload, variants, count, r % len(variants))
        round_rates = {v: jobs_per_op / statistics.median(result[v][0]) for v in variants}
        for v in variants:
            rates[v].append(round_rates[v])
            ratios[v].append(round_rates[v] / round_rates["raw"])
            cpu[v].append(result[v][1] / (count * jobs_per_op))
    return {
        v: {
            "jobs_per_s": statistics.median(rates[v]),
            "ratio": statistics.median(ratios[v]),
            "ratio_min": min(ratios[v]),
            "ratio_max": max(ratios[v]),
            "cpu_us_per_job": 1e6 * statistics.median(cpu[v]),
        }
        for v in variants
    }


def report(title: str, results: dict[str, dict[str, float]]) -> None:
    print(f"\n{title}")
    print(f"  {'variant':<20} {'jobs/s':>10} {'x raw':>7} {'(min-max)':>13} {'client CPU/job':>15}")
    for variant, r in results.items():
        print(
            f"  {variant:<20} {r['jobs_per_s']:>10,.0f} {r['ratio']:>6.2f}x "
            f"({r['ratio_min']:.2f}-{r['ratio_max']:.2f}) {r['cpu_us_per_job']:>12.1f} us"
        )


def profile(bench: Bench, spec: str, count: int) -> None:
    workload, variant = spec.split(":")
    op: Callable[[Any], None] = getattr(bench, f"{workload}_{variant}")
    for arg in _operations(bench, workload, [variant], max(5, count // 10)):
        op(arg)  # warm-up
    args = _operations(bench, workload, [variant], count)
    profiler = cProfile.Profile()
    profiler.enable()
    for arg in args:
        op(arg)
    profiler.disable()
    stats = pstats.Stats(profiler)
    calls = sum(s[1] for s in stats.stats.values())  # type: ignore[attr-defined]
    print(f"\nprofile {spec}: {calls / count:,.0f} Python function calls per operation")
    stats.sort_stats("cumulative").print_stats(30)
    stats.sort_stats("tottime").print_stats(20)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", default=DEFAULT_SERVER, help="server URL (any database)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--w1", type=int, default=300, help="W1 transactions per variant and round")
    parser.add_argument("--w2", type=int, default=15, help="W2 calls per variant and round")
    parser.add_argument("--batch", type=int, default=1000, help="W2 tasks per call")
    parser.add_argument("--workloads", default="w1,w2")
    parser.add_argument("--only", default="", help="comma-separated variants (raw always runs)")
    parser.add_argument("--diagnose", action="store_true", help="also run the floor variants")
    parser.add_argument("--profile", default="", help="WORKLOAD:VARIANT, e.g. w1:orm")
    args = parser.parse_args(argv)

    bench = Bench(args.server, args.batch)
    with bench.database():
        if args.profile:
            workload = args.profile.split(":")[0]
            profile(bench, args.profile, args.w1 if workload == "w1" else args.w2)
            return
        print(
            f"sqla_pgotask enqueue micro-benchmark: {args.rounds} interleaved rounds, "
            f"Python {sys.version.split()[0]}, SQLAlchemy {_version('sqlalchemy')}, "
            f"psycopg {psycopg.__version__}"
        )
        only = [v for v in args.only.split(",") if v]
        for workload in args.workloads.split(","):
            base = W1 if workload == "w1" else W2
            extra = W1_DIAGNOSE if workload == "w1" else W2_DIAGNOSE
            variants = base + (extra if args.diagnose else [])
            if only:
                variants = ["raw"] + [v for v in variants if v in only and v != "raw"]
            count = args.w1 if workload == "w1" else args.w2
            what = "one task per transaction" if workload == "w1" else f"{args.batch} per call"
            report(
                f"{workload.upper()} ({what}, {count} per variant and round)",
                measure(bench, workload, variants, args.rounds, count),
            )


def _version(module: str) -> str:
    return str(getattr(__import__(module), "__version__", "?"))


if __name__ == "__main__":
    main()
