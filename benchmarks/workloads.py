"""Workloads W1-W5, each run against one implementation in its own fresh database.

Every function gets a :class:`Target` (implementation, database, URLs) and
returns ``{"metrics": {...}, "checks": {name: {"ok": bool, ...}}, "details": {...}}``.
Nothing here asserts on timings: a check is about correctness only.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import time
from types import ModuleType
from typing import Any

import psycopg

from benchmarks.common import APP_SCHEMA, REF_ROWS, now_ns, percentile, wait_quiet
from benchmarks.config import Config
from benchmarks.db import Server
from benchmarks.worker import WorkerPool

Result = dict[str, Any]


@dataclasses.dataclass
class Target:
    """One implementation in one fresh database."""

    cfg: Config
    server: Server
    impl: str
    module: ModuleType
    db: str

    @property
    def url(self) -> str:
        """The URL the implementation itself takes (SQLAlchemy's for sqla_pgotask)."""
        return self.server.sqla_url(self.db) if self.impl != "raw" else self.pg_url

    @property
    def pg_url(self) -> str:
        """psycopg URL, for the suite's own queries."""
        return self.server.libpq_url(self.db)

    @property
    def settings(self) -> dict[str, Any]:
        return self.cfg.settings[self.impl]

    def scalar(self, sql: str) -> int:
        with psycopg.connect(self.pg_url, autocommit=True) as conn:
            row = conn.execute(sql).fetchone()
        return int(row[0]) if row else 0

    def quiet(self) -> float:
        return wait_quiet(self.cfg.quiet_wait_s)


def _payloads(start: int, stop: int) -> list[dict[str, Any]]:
    return [{"seq": i} for i in range(start, stop)]


# --------------------------------------------------------------------------
# W1, W2: enqueue


def w1(t: Target) -> Result:
    """``n`` tasks, one per transaction, one after the other."""
    n = t.cfg.w1_n
    payloads = _payloads(0, n)
    producer = t.module.Producer(t.url)
    try:
        idle = t.quiet()
        start = time.perf_counter()
        for payload in payloads:
            producer.enqueue_one(payload)
        elapsed = time.perf_counter() - start
    finally:
        producer.close()
    return {
        "metrics": {"jobs_per_s": n / elapsed},
        "checks": {"count": _count_check(t, n)},
        "details": {"n": n, "elapsed_s": elapsed, "idle_before": idle},
    }


def w2(t: Target, bulk: str = "add_many") -> Result:
    """``n`` tasks in calls of ``batch``, one transaction per call."""
    n, size = t.cfg.w2_n, t.cfg.w2_batch
    batches = [_payloads(s, min(n, s + size)) for s in range(0, n, size)]
    producer = t.module.Producer(t.url, bulk=bulk)
    try:
        idle = t.quiet()
        start = time.perf_counter()
        for batch in batches:
            producer.enqueue_many(batch)
        elapsed = time.perf_counter() - start
    finally:
        producer.close()
    return {
        "metrics": {"jobs_per_s": n / elapsed},
        "checks": {"count": _count_check(t, n)},
        "details": {"n": n, "batch": size, "bulk": bulk, "elapsed_s": elapsed, "idle_before": idle},
    }


def _count_check(t: Target, n: int) -> dict[str, Any]:
    found = t.scalar(t.module.TOTAL_SQL)
    return {"ok": found == n, "expected": n, "in_db": found}


# --------------------------------------------------------------------------
# W3, W5: drain pre-enqueued tasks with worker processes


def w3(t: Target, workers: int) -> Result:
    """Drain ``n`` pre-enqueued no-op tasks with ``workers`` processes."""
    out = _drain(t, t.cfg.w3_n, workers, w5=False)
    out["checks"]["exactly_once"] = _exactly_once(t, out.pop("results"), t.cfg.w3_n)
    return out


def w5(t: Target) -> Result:
    """Drain ``n`` tasks whose handler reads one row and inserts one, in its transaction."""
    with psycopg.connect(t.pg_url, autocommit=True) as conn:
        conn.execute(APP_SCHEMA)
    n = t.cfg.w5_n
    out = _drain(t, n, t.cfg.w5_workers, w5=True)
    executions = _exactly_once(t, out.pop("results"), n)
    out["checks"]["app_rows"] = _app_rows_check(t, n, executions)
    return out


def _prefill(t: Target, n: int) -> None:
    producer = t.module.Producer(t.url)
    try:
        for start in range(0, n, t.cfg.prefill_batch):
            producer.enqueue_many(_payloads(start, min(n, start + t.cfg.prefill_batch)))
    finally:
        producer.close()


def _drain(t: Target, n: int, workers: int, w5: bool) -> Result:
    _prefill(t, n)
    t.server.vacuum_analyze(t.db)
    t.server.checkpoint(t.db)
    commits_before = t.server.xact_commit(t.db)
    pool = WorkerPool(t.impl, t.url, t.settings, workers, w5=w5)
    started = ended = 0
    polls = 0
    error = None
    try:
        pool.wait_ready()
        with psycopg.connect(t.pg_url, autocommit=True) as poll_conn:
            idle = t.quiet()
            started = now_ns()
            pool.go()
            ended, polls = _wait_drained(t, pool, poll_conn, n, started, adaptive=w5)
    finally:
        results = pool.finish()
    if not ended:
        error = f"not drained within {t.cfg.timeout_s:g} s ({pool.handled()} of {n} handled)"
    commits_after = t.server.xact_commit(t.db)
    errors = [r["error"] for r in results if r.get("error")]
    if errors:
        error = errors[0]
    details: dict[str, Any] = {
        "n": n,
        "workers": workers,
        "db_polls": polls,
        "idle_before": idle,
        "worker_stats": [r.get("stats") for r in results],
        "handled_per_worker": [len(r.get("seqs", [])) for r in results],
    }
    metrics: dict[str, float] = {
        "peak_rss_mib": max(r.get("vm_hwm_kib", 0) for r in results) / 1024,
    }
    if ended:
        elapsed = (ended - started) / 1e9
        metrics["jobs_per_s"] = n / elapsed
        metrics["commits_per_job"] = (commits_after - commits_before - polls) / n
        metrics["worker_cpu_ms_per_job"] = (
            sum(float(r.get("cpu_s") or 0.0) for r in results) * 1000 / n
        )
        firsts = [min(r["starts_ns"]) for r in results if r.get("starts_ns")]
        details["elapsed_s"] = elapsed
        if firsts:
            details["first_handler_after_go_ms"] = (min(firsts) - started) / 1e6
            details["jobs_per_s_after_first_handler"] = n / ((ended - min(firsts)) / 1e9)
    return {"metrics": metrics, "checks": {}, "details": details, "results": results} | (
        {"error": error} if error else {}
    )


def _wait_drained(
    t: Target,
    pool: WorkerPool,
    conn: psycopg.Connection[Any],
    n: int,
    started: int,
    adaptive: bool = False,
) -> tuple[int, int]:
    """Wait until the handlers ran ``n`` times and the database shows nothing pending.

    Returns (``now_ns()`` at that moment or 0 on timeout, queries made).  The
    database is queried only once every handler was called; with
    ``adaptive`` (W5: the work follows the handler call) every quarter of the
    time the remaining tasks need at the rate so far (5-100 ms), else every 5 ms.
    """
    deadline = time.monotonic() + t.cfg.timeout_s
    while pool.handled() < n:
        if time.monotonic() > deadline or not pool.alive():
            return 0, 0
        time.sleep(0.002)
    polls = 0
    pending_sql = t.module.PENDING_SQL
    while True:
        polls += 1
        row = conn.execute(pending_sql).fetchone()
        pending = int(row[0]) if row else 0
        if pending == 0:
            return now_ns(), polls
        if time.monotonic() > deadline or not pool.alive():
            return 0, polls
        pause = 0.005
        if adaptive:
            done = max(1, n - pending)
            per_task = (now_ns() - started) / 1e9 / done
            pause = min(0.1, max(0.005, pending * per_task / 4))
        time.sleep(pause)


# --------------------------------------------------------------------------
# W4: latency


def w4(t: Target) -> Result:
    """One idle worker; one task every ``interval`` ms: commit -> handler start."""
    cfg = t.cfg
    count = max(1, round(cfg.w4_duration_s * 1000 / cfg.w4_interval_ms))
    interval = cfg.w4_interval_ms / 1000
    called = [0] * count
    committed = [0] * count
    pool = WorkerPool(t.impl, t.url, t.settings, 1)
    producer = None
    ended = 0
    error = None
    try:
        producer = t.module.Producer(t.url)
        pool.wait_ready()
        pool.go()
        time.sleep(cfg.w4_settle_s)  # the worker is idle and listening now
        idle = t.quiet()
        with psycopg.connect(t.pg_url, autocommit=True) as poll_conn:
            first = time.perf_counter() + 0.01
            for i in range(count):
                delay = first + i * interval - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                called[i] = now_ns()
                producer.enqueue_one({"seq": i})
                committed[i] = now_ns()
            ended, _ = _wait_drained(t, pool, poll_conn, count, called[0])
    finally:
        results = pool.finish()
        if producer is not None:
            producer.close()
    if not ended:
        error = f"not drained within {cfg.timeout_s:g} s ({pool.handled()} of {count} handled)"
    errors = [r["error"] for r in results if r.get("error")]
    if errors:
        error = errors[0]
    latency_ms: list[float] = []
    from_call_ms: list[float] = []
    seen: set[int] = set()
    for r in results:
        for seq, start in zip(r.get("seqs", []), r.get("starts_ns", []), strict=True):
            if 0 <= seq < count and seq not in seen:
                seen.add(seq)
                latency_ms.append((start - committed[seq]) / 1e6)
                from_call_ms.append((start - called[seq]) / 1e6)
    enqueue_ms = [(c - s) / 1e6 for s, c in zip(called, committed, strict=True)]
    metrics = {
        "p50_ms": percentile(latency_ms, 50),
        "p95_ms": percentile(latency_ms, 95),
        "p99_ms": percentile(latency_ms, 99),
        "max_ms": max(latency_ms, default=math.nan),
        "peak_rss_mib": max(r.get("vm_hwm_kib", 0) for r in results) / 1024,
    }
    details = {
        "count": count,
        "interval_ms": cfg.w4_interval_ms,
        "idle_before": idle,
        "from_enqueue_call_p50_ms": percentile(from_call_ms, 50),
        "from_enqueue_call_p99_ms": percentile(from_call_ms, 99),
        "enqueue_call_p50_ms": percentile(enqueue_ms, 50),
        "enqueue_call_p99_ms": percentile(enqueue_ms, 99),
        # the handler may start before the producer hears its COMMIT acknowledged
        "started_before_commit_returned": sum(1 for x in latency_ms if x < 0),
    }
    out: Result = {
        "metrics": metrics,
        "checks": {"exactly_once": _exactly_once(t, results, count)},
        "details": details,
    }
    if error:
        out["error"] = error
    return out


# --------------------------------------------------------------------------
# checks


def _exactly_once(t: Target, results: list[dict[str, Any]], n: int) -> dict[str, Any]:
    """Every seq 0..n-1 handled exactly once, and the queue records all n succeeded."""
    counts = collections.Counter(s for r in results for s in r.get("seqs", []))
    duplicated = sorted(s for s, c in counts.items() if c > 1)
    unexpected = sorted(s for s in counts if not 0 <= s < n)
    missing = n - sum(1 for s in counts if 0 <= s < n)
    pending = t.scalar(t.module.PENDING_SQL)
    succeeded = t.scalar(t.module.SUCCEEDED_SQL)
    ok = not duplicated and not unexpected and missing == 0 and pending == 0 and succeeded == n
    return {
        "ok": ok,
        "expected": n,
        "handler_calls": sum(counts.values()),
        "duplicated": len(duplicated),
        "duplicated_first": duplicated[:10],
        "missing": missing,
        "unexpected": len(unexpected),
        "queue_pending": pending,
        "queue_succeeded": succeeded,
    }


def _app_rows_check(t: Target, n: int, executions: dict[str, Any]) -> dict[str, Any]:
    """W5: ``bench_app_rows`` holds every seq exactly once, with the value its task read.

    A handler that ran again after its transaction was rolled back left no
    row behind: such re-executions are reported, not failed.
    """
    with psycopg.connect(t.pg_url, autocommit=True) as conn:
        row = conn.execute(
            """
            SELECT count(*), count(DISTINCT r.seq),
                   count(*) FILTER (WHERE r.seq < 0 OR r.seq >= %(n)s),
                   count(*) FILTER (WHERE f.v IS DISTINCT FROM r.v)
            FROM bench_app_rows AS r
            LEFT JOIN bench_app_ref AS f ON f.id = r.seq %% %(refs)s + 1
            """,
            {"n": n, "refs": REF_ROWS},
        ).fetchone()
    assert row is not None
    rows, distinct, out_of_range, wrong = (int(x) for x in row)
    ok = (
        rows == n
        and distinct == n
        and out_of_range == 0
        and wrong == 0
        and executions["missing"] == 0
        and executions["queue_pending"] == 0
        and executions["queue_succeeded"] == n
    )
    return {
        "ok": ok,
        "expected": n,
        "rows": rows,
        "distinct_seq": distinct,
        "out_of_range": out_of_range,
        "wrong_value": wrong,
        "handler_calls": executions["handler_calls"],
        "re_executed": executions["duplicated"],
        "queue_pending": executions["queue_pending"],
        "queue_succeeded": executions["queue_succeeded"],
    }
