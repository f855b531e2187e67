"""The printed report: machine facts, a Markdown table with ratios to raw SQL, checks."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from benchmarks.common import median

Run = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Row:
    """One line of the table: a metric of sqla_pgotask's ``case`` against raw SQL's ``raw_case``."""

    label: str
    metric: str
    unit: str
    case: str
    raw_case: str
    digits: int = 0


def rows_for(
    workloads: list[str], w3_workers: list[int], cfg: dict[str, Any], kind_form: bool = False
) -> list[Row]:
    rows: list[Row] = []
    if "w1" in workloads:
        n = f"{cfg['w1_n']:,}"
        rows.append(Row(f"W1 enqueue {n}, one per commit", "jobs_per_s", "jobs/s", "w1", "w1"))
    if "w2" in workloads:
        n = f"{cfg['w2_n']:,} in calls of {cfg['w2_batch']:,}"
        label = f"W2 bulk enqueue {n}: add_many(session, tasks)"
        rows.append(Row(label, "jobs_per_s", "jobs/s", "w2", "w2"))
        if kind_form:
            label = "W2 the same with add_many(session, kind, payloads)"
            rows.append(Row(label, "jobs_per_s", "jobs/s", "w2_kind_payloads", "w2"))
        rows.append(
            Row("W2 the same with session.add_all", "jobs_per_s", "jobs/s", "w2_add_all", "w2")
        )
    if "w3" in workloads:
        for k in w3_workers:
            case = f"w3_{k}p"
            label = f"W3 drain {cfg['w3_n']:,} no-op, {k} process{'es' if k > 1 else ''}"
            rows.append(Row(label, "jobs_per_s", "jobs/s", case, case))
            rows.append(Row("", "peak_rss_mib", "peak RSS MiB", case, case))
            rows.append(Row("", "commits_per_job", "commits/job", case, case, 2))
    if "w4" in workloads:
        count = round(cfg["w4_duration_s"] * 1000 / cfg["w4_interval_ms"])
        label = f"W4 latency, {count:,} tasks every {cfg['w4_interval_ms']:g} ms"
        rows.append(Row(label, "p50_ms", "p50 ms", "w4", "w4", 2))
        rows.append(Row("", "p95_ms", "p95 ms", "w4", "w4", 2))
        rows.append(Row("", "p99_ms", "p99 ms", "w4", "w4", 2))
    if "w5" in workloads:
        label = f"W5 read+insert handler, {cfg['w5_n']:,}, {cfg['w5_workers']} processes"
        rows.append(Row(label, "jobs_per_s", "jobs/s", "w5", "w5"))
        rows.append(Row("", "commits_per_job", "commits/job", "w5", "w5", 2))
        rows.append(Row("", "peak_rss_mib", "peak RSS MiB", "w5", "w5"))
    return rows


def _runs(runs: list[Run], impl: str, case: str) -> list[Run]:
    return [r for r in runs if r["impl"] == impl and r["case"] == case]


def _values(runs: list[Run], metric: str) -> list[float]:
    return [float(r["metrics"][metric]) for r in runs if metric in r.get("metrics", {})]


def summarize(runs: list[Run], rows: list[Row]) -> list[dict[str, Any]]:
    """Per row: medians, spreads, and the median of the per-repetition ratios."""
    out = []
    for row in rows:
        ours = _runs(runs, "sqla_pgotask", row.case)
        raw = _runs(runs, "raw", row.raw_case)
        ratios = []
        for mine in ours:
            base = [r for r in raw if r["rep"] == mine["rep"]]
            a = mine.get("metrics", {}).get(row.metric)
            b = base[0].get("metrics", {}).get(row.metric) if base else None
            if a is not None and b:
                ratios.append(float(a) / float(b))
        out.append(
            {
                "label": row.label,
                "case": row.case,
                "metric": row.metric,
                "unit": row.unit,
                "raw": _stats(_values(raw, row.metric)),
                "sqla_pgotask": _stats(_values(ours, row.metric)),
                "ratio": median(ratios),
                "ratios": ratios,
            }
        )
    return out


def _stats(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"median": math.nan, "min": math.nan, "max": math.nan, "values": []}
    return {"median": median(values), "min": min(values), "max": max(values), "values": values}


def _cell(stats: dict[str, Any], digits: int) -> str:
    med = stats["median"]
    if math.isnan(med):
        return "n/a"
    text = f"{med:,.{digits}f}"
    if len(stats["values"]) > 1 and med:
        spread = (stats["max"] - stats["min"]) / 2 / abs(med) * 100
        text += f" ±{spread:.0f}%"
    return text


def _checks_cell(runs: list[Run], impls: tuple[str, ...]) -> str:
    bad = []
    for impl in impls:
        mine = [r for r in runs if r["impl"] == impl]
        if any(not r.get("ok") for r in mine):
            bad.append("raw" if impl == "raw" else "ours")
    return "ok" if not bad else "FAILED: " + ", ".join(bad)


def table(runs: list[Run], rows: list[Row]) -> str:
    summary = summarize(runs, rows)
    lines = [
        "| workload | metric | raw SQL | sqla_pgotask | ratio | checks |",
        "|---|---|---:|---:|---:|---|",
    ]
    seen: set[str] = set()
    for row, s in zip(rows, summary, strict=True):
        checks = ""
        if row.case not in seen:
            seen.add(row.case)
            case_runs = _runs(runs, "sqla_pgotask", row.case) + _runs(runs, "raw", row.raw_case)
            checks = _checks_cell(case_runs, ("raw", "sqla_pgotask"))
        ratio = "n/a" if math.isnan(s["ratio"]) else f"{s['ratio']:.2f}x"
        lines.append(
            f"| {row.label} | {row.unit} | {_cell(s['raw'], row.digits)} "
            f"| {_cell(s['sqla_pgotask'], row.digits)} | {ratio} | {checks} |"
        )
    return "\n".join(lines)


def failures(runs: list[Run]) -> list[str]:
    """One line per failed run: its error or the checks that failed."""
    out = []
    for r in runs:
        if r.get("ok"):
            continue
        where = f"{r['impl']} {r['case']} rep {r['rep']}"
        if r.get("error"):
            out.append(f"{where}: ERROR {str(r['error']).strip().splitlines()[-1]}")
        for name, check in r.get("checks", {}).items():
            if not check.get("ok"):
                out.append(f"{where}: check {name} failed: {check}")
    return out


def claim_section(claim: dict[str, Any]) -> str:
    if claim.get("error"):
        last = str(claim["error"]).strip().splitlines()[-1]
        return f"Claim check: ERROR {last}"
    empty, full = claim["phases"]["empty"], claim["phases"]["finished"]
    rows = claim["rows"]
    lines = [
        f"Claim check: {claim['k']:,} due tasks, empty table vs {rows:,} finished rows "
        "(+ VACUUM ANALYZE), sqla_pgotask only",
        "",
        f"| | empty table | {rows:,} finished rows | ratio |",
        "|---|---:|---:|---:|",
        f"| run_until_idle(), tasks/s | {empty['run_until_idle_tasks_per_s']:,.0f} "
        f"| {full['run_until_idle_tasks_per_s']:,.0f} "
        f"| {claim['ratios']['run_until_idle_tasks_per_s']:.2f}x |",
    ]
    if "claim_statement_median_ms" in full:
        for key, label in (
            ("claim_statement_median_ms", f"claim statement (limit {claim['limit']}), median ms"),
            ("claim_execution_median_ms", "the same, server execution time, median ms"),
        ):
            lines.append(
                f"| {label} | {empty[key]:.3f} | {full[key]:.3f} | {claim['ratios'][key]:.2f}x |"
            )
    else:
        lines.append(f"\nclaim statement not timed: {claim.get('claim_statement_skipped')}")
    lines += [
        "",
        "ratio = with finished rows / empty table.  Expected: the same order of magnitude (1x-2x",
        "on a noisy machine); reading the finished rows would make it hundreds of times slower.",
    ]
    plan = full.get("plan")
    if plan:
        lines += ["", f"Claim plan with {rows:,} finished rows (EXPLAIN ANALYZE, BUFFERS):", ""]
        lines += ["    " + line for line in plan["summary"]]
        used = ", ".join(
            f"{s['node']}" + (f" using {s['index']}" if s["index"] else "") for s in plan["scans"]
        )
        partial = plan["partial_index"]
        verdict = f"yes ({', '.join(partial)})" if partial else "NO (no partial index in the plan)"
        lines += [
            "",
            f"pgotask_task read by: {used or '?'}; partial index of pending tasks: {verdict}",
        ]
    empty_plan = empty.get("plan")
    if empty_plan:
        used = ", ".join(
            f"{s['node']}" + (f" using {s['index']}" if s["index"] else "")
            for s in empty_plan["scans"]
        )
        lines.append(f"(empty table: {used or '?'})")
    return "\n".join(lines)


def header(meta: dict[str, Any]) -> str:
    m, pg, v = meta["machine"], meta["server"], meta["versions"]
    s = meta["settings"]
    raw, ours = s["raw"], s["sqla_pgotask"]
    return "\n".join(
        [
            f"sqla_pgotask benchmark suite, {meta['started']}, {meta['reps']} repetition(s)",
            f"machine: {m['cpus']} CPUs ({m['cpu_model']}), {m['platform']}, "
            f"load average at start {m['loadavg']}",
            f"PostgreSQL {pg['server_version']} at {meta['server_url']} (fsync {pg['fsync']}, "
            f"synchronous_commit {pg['synchronous_commit']}, "
            f"shared_buffers {pg['shared_buffers']})",
            f"Python {v['python']}, SQLAlchemy {v['SQLAlchemy']}, psycopg {v['psycopg']} "
            f"(libpq {v['libpq']}), sqla_pgotask {v['sqla_pgotask']}",
            f"sqla_pgotask: {ours['concurrency']} handler threads per worker process, "
            f"poll {ours['poll_interval']:g} s; raw SQL: {raw['loops']} claim loops per process, "
            f"batch {raw['batch']}, poll {raw['poll_interval']:g} s",
        ]
    )


def render(
    meta: dict[str, Any], runs: list[Run], rows: list[Row], claim: dict[str, Any] | None
) -> str:
    parts = [header(meta), ""]
    if rows:
        parts += [
            table(runs, rows),
            "",
            "Medians of the repetitions (± half the min-max range).  ratio = sqla_pgotask / raw",
            "SQL, the median of the per-repetition ratios: for jobs/s higher is better; for ms,",
            "MiB and commits/job lower is better.",
        ]
        idle = [
            r["details"]["idle_before"]
            for r in runs
            if not math.isnan(r.get("details", {}).get("idle_before", math.nan))
        ]
        if idle:
            parts.append(
                f"Lowest idle share of the machine before a timed window: {min(idle):.0%}"
                " (below ~80 %, another tenant was busy: read with care)."
            )
    if claim is not None:
        parts += ["", claim_section(claim)]
    bad = failures(runs) + (
        [
            f"claim check: {name} failed: {c}"
            for name, c in claim.get("checks", {}).items()
            if not c.get("ok")
        ]
        if claim and not claim.get("error")
        else []
    )
    parts += ["", "Checks: all passed." if not bad else "Checks FAILED:\n" + "\n".join(bad)]
    return "\n".join(parts)
