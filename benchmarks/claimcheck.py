"""Does claiming due tasks stay cheap when the table holds a million finished ones?

In one fresh, migrated database, twice: with an empty table, then after
inserting ``rows`` finished tasks (``succeeded``/``failed``, ``finished_at``
set) and ``VACUUM ANALYZE``.  Each phase:

1. three rounds of: enqueue ``k`` pending tasks (``add_many``), ``VACUUM
   ANALYZE``, run the worker's claim statement (``claim`` in
   ``sqla_pgotask/sql/tasks.sql``) once under ``EXPLAIN (ANALYZE,
   BUFFERS)`` and roll it back, then time the claim statement alone,
   ``limit`` tasks per statement, each in its own committed transaction,
   until all ``k`` are claimed (median ms as seen by the client, and the
   median server-side execution time of the EXPLAINs);
2. enqueue ``k`` more and drain them with ``scheduler.run_until_idle()``
   (claim, handler, completion, one task at a time: tasks/s).

An untimed warm-up (connections, prepared statements) comes first.  The
ratios of phase 2 to phase 1 should stay of the same order (about 1x; a
noisy machine makes it 1x-2x): the claim reads the partial index of pending
tasks, whose size does not depend on finished rows.  A plan that read them
would be hundreds of times slower.
"""

from __future__ import annotations

import math
import re
import time
from typing import Any

from sqlalchemy import TextClause, create_engine, text
from sqlalchemy.orm import Session, sessionmaker

from benchmarks.common import KIND, median
from benchmarks.config import Config
from benchmarks.db import Server
from sqla_pgotask import Scheduler, Task, add_many
from sqla_pgotask.migrate import upgrade

FINISHED_ROWS = """
INSERT INTO pgotask_task
    (kind, payload, status, attempts, max_attempts, run_at, created_at, started_at, finished_at)
SELECT :kind, jsonb_build_object('seq', -g),
       CASE WHEN g % 10 = 0 THEN 'failed' ELSE 'succeeded' END,
       1, 3, t, t, t, t + interval '5 ms'
FROM generate_series(1, :rows) AS g,
     LATERAL (SELECT now() - interval '30 days' + g * interval '1 ms') AS s (t)
"""
CLEAN_UP_CLAIMED = """
UPDATE pgotask_task
SET status = 'succeeded', finished_at = now(), locked_by = NULL, lease_expires_at = NULL
WHERE status = 'running'
"""
#: rounds of "enqueue k, claim them all" per phase (the statement timings are pooled)
ROUNDS = 3
_EXECUTION = re.compile(r"Execution Time: ([0-9.]+) ms")
_NODE = re.compile(r"^(\s*(?:->\s*)?)(.*?)\s+\(cost=[^)]*\)\s*(\(actual [^)]*\))?(.*)$")
_SCAN = re.compile(
    r"(Seq Scan|Index Scan|Index Only Scan|Bitmap Index Scan|Bitmap Heap Scan)"
    r"(?: Backward)?(?: using (\S+))? on pgotask_task\b"
)


def run(cfg: Config, server: Server, db: str) -> dict[str, Any]:
    url = server.sqla_url(db)
    upgrade(url)
    engine = create_engine(url, pool_size=2, max_overflow=2)
    session_factory = sessionmaker(engine)
    scheduler = Scheduler(session_factory, concurrency=1)

    @scheduler.handler(KIND)
    def noop(session: Session, task: Task) -> None:
        pass

    claim, params, why_not = _claim_statement(cfg)
    phases: dict[str, dict[str, Any]] = {}
    try:
        # Warm up (connections, prepared statements, caches), untimed.
        warm = min(cfg.claim_k, 100)
        if claim is not None:
            _enqueue(session_factory, warm)
            _time_claims(engine, claim, params)
            with engine.begin() as conn:
                conn.execute(text(CLEAN_UP_CLAIMED))
        _enqueue(session_factory, warm)
        scheduler.run_until_idle()
        for phase, rows in (("empty", 0), ("finished", cfg.claim_rows)):
            info: dict[str, Any] = {"finished_rows": rows}
            if rows:
                start = time.perf_counter()
                with engine.begin() as conn:
                    conn.execute(text(FINISHED_ROWS), {"kind": KIND, "rows": rows})
                info["insert_s"] = time.perf_counter() - start
                start = time.perf_counter()
                server.vacuum_analyze(db, "pgotask_task")
                info["vacuum_analyze_s"] = time.perf_counter() - start
            if claim is not None:
                statement_ms: list[float] = []
                execution_ms: list[float] = []
                for _ in range(ROUNDS):
                    _enqueue(session_factory, cfg.claim_k)
                    server.vacuum_analyze(db, "pgotask_task")
                    info["plan"] = _explain(engine, claim, params)
                    execution_ms.append(info["plan"]["execution_ms"])
                    statement_ms += _time_claims(engine, claim, params)
                    with engine.begin() as conn:
                        conn.execute(text(CLEAN_UP_CLAIMED))
                info["claim_statement_median_ms"] = median(statement_ms)
                info["claim_execution_median_ms"] = median(execution_ms)
                info["claim_statements"] = len(statement_ms)
            _enqueue(session_factory, cfg.claim_k)
            server.vacuum_analyze(db, "pgotask_task")
            start = time.perf_counter()
            ran = scheduler.run_until_idle()
            elapsed = time.perf_counter() - start
            info["run_until_idle_ran"] = ran
            info["run_until_idle_tasks_per_s"] = ran / elapsed if elapsed else 0.0
            phases[phase] = info
    finally:
        engine.dispose()
    empty, full = phases["empty"], phases["finished"]
    out: dict[str, Any] = {
        "rows": cfg.claim_rows,
        "k": cfg.claim_k,
        "limit": cfg.claim_limit,
        "phases": phases,
        "ratios": {
            "run_until_idle_tasks_per_s": full["run_until_idle_tasks_per_s"]
            / empty["run_until_idle_tasks_per_s"]
        },
    }
    if claim is None:
        out["claim_statement_skipped"] = why_not
    else:
        for key in ("claim_statement_median_ms", "claim_execution_median_ms"):
            out["ratios"][key] = full[key] / empty[key]
    out["checks"] = {
        "drained": {
            "ok": all(p["run_until_idle_ran"] == cfg.claim_k for p in phases.values()),
            "expected": cfg.claim_k,
            "ran": [p["run_until_idle_ran"] for p in phases.values()],
        }
    }
    # Reported, not checked: on a small table the planner may rightly prefer another plan.
    plan = full.get("plan")
    out["uses_partial_index"] = bool(plan["partial_index"]) if plan else None
    return out


def _claim_statement(cfg: Config) -> tuple[TextClause | None, dict[str, Any], str]:
    """The library's claim statement and its parameters, if this suite knows them all."""
    try:
        from sqla_pgotask._queries import query

        claim = query("claim")
    except Exception as exc:  # the library's internals may change
        return None, {}, f"no 'claim' query in sqla_pgotask/sql/tasks.sql ({exc})"
    known: dict[str, Any] = {
        "kinds": [KIND],
        "max_attempts": [3],
        "limit": cfg.claim_limit,
        "worker": "pgotask-bench:claim-check",
        "lease_seconds": 300.0,
        "excluded_queues": [],
    }
    names = set(claim.compile().params)
    unknown = names - set(known)
    if unknown:
        return None, {}, f"the claim query takes parameters unknown here: {sorted(unknown)}"
    return claim, {k: v for k, v in known.items() if k in names}, ""


def _enqueue(session_factory: sessionmaker[Session], k: int) -> None:
    for start in range(0, k, 1000):
        with session_factory.begin() as session:
            add_many(
                session,
                [Task(kind=KIND, payload={"seq": i}) for i in range(start, min(k, start + 1000))],
            )


def _time_claims(engine: Any, claim: TextClause, params: dict[str, Any]) -> list[float]:
    """Run the claim statement, one committed transaction each, until nothing is due."""
    times: list[float] = []
    while True:
        with engine.begin() as conn:
            start = time.perf_counter()
            rows = conn.execute(claim, params).fetchall()
            times.append((time.perf_counter() - start) * 1000)
        if not rows:
            return times[:-1] or times


def _explain(engine: Any, claim: TextClause, params: dict[str, Any]) -> dict[str, Any]:
    """``EXPLAIN (ANALYZE, BUFFERS)`` of one claim, rolled back; a summary of the plan."""
    with engine.connect() as conn:
        trans = conn.begin()
        try:
            lines = [
                str(r[0])
                for r in conn.execute(text("EXPLAIN (ANALYZE, BUFFERS) " + claim.text), params)
            ]
        finally:
            trans.rollback()
        scans = []
        partial = []
        for line in lines:
            for kind, index in _SCAN.findall(line):
                definition = None
                if index:
                    definition = conn.execute(
                        text("SELECT indexdef FROM pg_indexes WHERE indexname = :name"),
                        {"name": index},
                    ).scalar_one_or_none()
                    if definition and " WHERE " in definition:
                        partial.append(index)
                scans.append({"node": kind, "index": index or None, "indexdef": definition})
    executed = [float(m) for line in lines for m in _EXECUTION.findall(line)]
    return {
        "lines": lines,
        "summary": summarize(lines),
        "scans": scans,
        "partial_index": partial,
        "execution_ms": executed[0] if executed else math.nan,
    }


def summarize(lines: list[str]) -> list[str]:
    """The plan's nodes with their actual rows/time and buffers, estimates dropped."""
    out = []
    for line in lines:
        match = _NODE.match(line)
        if match:
            indent, node, actual, rest = match.groups()
            out.append(f"{indent}{node} {actual or ''}{rest}".rstrip())
        elif line.strip().startswith(("Buffers:", "Execution Time", "Index Cond", "Filter")):
            out.append(line.rstrip())
    return out
