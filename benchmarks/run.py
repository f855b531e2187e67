"""Run the benchmark suite: ``python -m benchmarks.run [options]`` (or ``python3 dev.py bench``).

sqla_pgotask and the raw-SQL baseline (``benchmarks/rawsql.py``) run the same
workloads in the same run, interleaved per repetition, each (implementation,
workload, repetition) in a freshly created database ``pgotask_bench_*``
(dropped afterwards).  Prints machine facts, a table of medians with the
ratio of sqla_pgotask to raw SQL, the claim check, and the correctness
checks; exits non-zero if a run failed or a check did not pass.  Timings
are reported, never judged.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.metadata
import json
import math
import os
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg

from benchmarks import claimcheck, library, rawsql, report, workloads
from benchmarks.config import IMPLS, QUICK, WORKLOADS, Config
from benchmarks.db import DEFAULT_SERVER_URL, SERVER_URL_ENV, Server, database_name

MODULES = {"raw": rawsql, "sqla_pgotask": library}
ROOT = Path(__file__).resolve().parent.parent

Case = tuple[str, str, Callable[[workloads.Target], dict[str, Any]]]


def cases(cfg: Config, workload: str, impl: str) -> list[Case]:
    """(case id, implementation, function) of ``workload`` for ``impl``."""
    if workload == "w1":
        return [("w1", impl, workloads.w1)]
    if workload == "w2":
        out: list[Case] = [("w2", impl, functools.partial(workloads.w2, bulk="add_many"))]
        if impl == "sqla_pgotask":
            if library.has_kind_form():
                w2_kind = functools.partial(workloads.w2, bulk="add_many_kind")
                out.append(("w2_kind_payloads", impl, w2_kind))
            out.append(("w2_add_all", impl, functools.partial(workloads.w2, bulk="add_all")))
        return out
    if workload == "w3":
        return [
            (f"w3_{k}p", impl, functools.partial(workloads.w3, workers=k)) for k in cfg.w3_workers
        ]
    if workload == "w4":
        return [("w4", impl, workloads.w4)]
    if workload == "w5":
        return [("w5", impl, workloads.w5)]
    raise ValueError(workload)


def run_case(cfg: Config, server: Server, case: Case, rep: int) -> dict[str, Any]:
    case_id, impl, fn = case
    db = database_name(impl.replace("sqla_pgotask", "lib"), case_id, f"r{rep}")
    rec: dict[str, Any] = {
        "impl": impl,
        "case": case_id,
        "rep": rep,
        "db": db,
        "metrics": {},
        "checks": {},
        "details": {},
        "error": None,
    }
    start = time.monotonic()
    try:
        server.create(db)
        target = workloads.Target(cfg, server, impl, MODULES[impl], db)
        MODULES[impl].install(target.url)
        server.checkpoint(db)
        rec.update(fn(target))
    except Exception:
        rec["error"] = traceback.format_exc()
    finally:
        if not cfg.keep_db:
            try:
                server.drop(db)
            except psycopg.Error as exc:
                print(f"could not drop {db}: {exc}", file=sys.stderr)
    rec["wall_s"] = time.monotonic() - start
    rec["ok"] = not rec["error"] and all(c.get("ok") for c in rec["checks"].values())
    return rec


def run_claim_check(cfg: Config, server: Server) -> dict[str, Any]:
    db = database_name("lib", "claim")
    try:
        server.create(db)
        return claimcheck.run(cfg, server, db)
    except Exception:
        return {"error": traceback.format_exc(), "checks": {}}
    finally:
        if not cfg.keep_db:
            server.drop(db)


def describe(rec: dict[str, Any]) -> str:
    m = rec["metrics"]
    parts = []
    if "jobs_per_s" in m:
        parts.append(f"{m['jobs_per_s']:,.0f} jobs/s")
    if "p50_ms" in m:
        parts.append(
            f"latency p50/p95/p99 {m['p50_ms']:.2f}/{m['p95_ms']:.2f}/{m['p99_ms']:.2f} ms"
        )
    if "peak_rss_mib" in m:
        parts.append(f"RSS {m['peak_rss_mib']:.0f} MiB")
    if "commits_per_job" in m:
        parts.append(f"{m['commits_per_job']:.2f} commits/job")
    if rec["error"]:
        parts.append("ERROR " + str(rec["error"]).strip().splitlines()[-1])
    parts.append("checks ok" if rec["ok"] else "CHECKS FAILED")
    return ", ".join(parts) + f" ({rec['wall_s']:.1f} s)"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def meta_for(cfg: Config, server: Server) -> dict[str, Any]:
    cpu_model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    libpq = psycopg.pq.version()
    return {
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "reps": cfg.reps,
        "server_url": server.display(),
        "server": server.info(),
        "machine": {
            "cpus": os.cpu_count(),
            "cpu_model": cpu_model,
            "platform": platform.platform(),
            "loadavg": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        },
        "versions": {
            "python": platform.python_version(),
            "SQLAlchemy": importlib.metadata.version("SQLAlchemy"),
            "psycopg": importlib.metadata.version("psycopg"),
            "libpq": f"{libpq // 10000}.{libpq % 10000}",
            "sqla_pgotask": importlib.metadata.version("sqla-pgotask") + _source_state(),
        },
        "settings": cfg.settings,
    }


def _source_state() -> str:
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""
    return f" ({rev}{', modified' if dirty else ''})"


def run_suite(cfg: Config) -> dict[str, Any]:
    server = Server(cfg.server_url)
    meta = meta_for(cfg, server)
    log(
        f"PostgreSQL {meta['server']['server_version']} at {meta['server_url']}; "
        f"workloads {','.join(cfg.workloads)}; {cfg.reps} repetition(s)"
    )
    runs: list[dict[str, Any]] = []
    start = time.monotonic()
    timed = [w for w in WORKLOADS if w in cfg.workloads and w != "claim"]
    for rep in range(cfg.reps):
        # Alternate which implementation goes first, so drift hits both alike.
        order = list(cfg.impls) if rep % 2 == 0 else list(reversed(cfg.impls))
        for workload in timed:
            for impl in order:
                for case in cases(cfg, workload, impl):
                    rec = run_case(cfg, server, case, rep)
                    runs.append(rec)
                    log(f"rep {rep + 1}/{cfg.reps} {case[0]:10s} {impl:12s} {describe(rec)}")
    claim = None
    if "claim" in cfg.workloads:
        log(f"claim check: {cfg.claim_k:,} tasks, then again with {cfg.claim_rows:,} finished rows")
        claim = run_claim_check(cfg, server)
        log("claim check " + ("ERROR" if claim.get("error") else "done"))
    meta["wall_s"] = time.monotonic() - start
    rows = report.rows_for(timed, cfg.w3_workers, dataclasses.asdict(cfg), library.has_kind_form())
    ok = all(r["ok"] for r in runs) and (
        claim is None or (not claim.get("error") and all(c["ok"] for c in claim["checks"].values()))
    )
    return {
        "meta": meta,
        "config": dataclasses.asdict(cfg),
        "runs": runs,
        "summary": report.summarize(runs, rows),
        "claim": claim,
        "ok": ok,
        "text": report.render(meta, runs, rows, claim),
    }


# --------------------------------------------------------------------------
# command line


def _list(kind: Callable[[str], Any]) -> Callable[[str], list[Any]]:
    def parse(value: str) -> list[Any]:
        return [kind(v.strip()) for v in value.split(",") if v.strip()]

    return parse


def parse_args(argv: list[str] | None) -> tuple[Config, argparse.Namespace]:
    d = Config()
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description="sqla_pgotask vs a raw-SQL psycopg queue, same run, fresh databases.",
    )
    p.add_argument(
        "--server-url",
        default=os.environ.get(SERVER_URL_ENV, DEFAULT_SERVER_URL),
        help=f"PostgreSQL server; its database (default postgres) is only used to create "
        f"and drop pgotask_bench_* databases (env {SERVER_URL_ENV}, default {DEFAULT_SERVER_URL})",
    )
    p.add_argument(
        "--workloads",
        type=_list(str),
        default=list(WORKLOADS),
        help=f"comma-separated, from {','.join(WORKLOADS)} (default: all)",
    )
    p.add_argument("--impls", type=_list(str), default=list(IMPLS), help=argparse.SUPPRESS)
    p.add_argument("--reps", type=int, help=f"repetitions; medians are reported (default {d.reps})")
    p.add_argument("--quick", action="store_true", help="tiny sizes, one repetition: a smoke run")
    p.add_argument("--json", metavar="PATH", help="also write every result as JSON here")
    p.add_argument("--keep-db", action="store_true", help="keep the benchmark databases")
    sizes = p.add_argument_group("sizes")
    sizes.add_argument("--w1-n", type=int, help=f"W1 tasks (default {d.w1_n:,})")
    sizes.add_argument("--w2-n", type=int, help=f"W2 tasks (default {d.w2_n:,})")
    sizes.add_argument("--w2-batch", type=int, help=f"W2 tasks per call (default {d.w2_batch:,})")
    sizes.add_argument("--w3-n", type=int, help=f"W3 tasks (default {d.w3_n:,})")
    sizes.add_argument(
        "--w3-workers", type=_list(int), help="W3 worker process counts (default 1,2)"
    )
    sizes.add_argument("--w4-interval-ms", type=float, help="W4 enqueue interval (default 10)")
    sizes.add_argument("--w4-duration-s", type=float, help="W4 duration (default 10)")
    sizes.add_argument("--w5-n", type=int, help=f"W5 tasks (default {d.w5_n:,})")
    sizes.add_argument(
        "--w5-workers", type=int, help=f"W5 worker processes (default {d.w5_workers})"
    )
    sizes.add_argument(
        "--claim-rows", type=int, help=f"claim check: finished rows (default {d.claim_rows:,})"
    )
    sizes.add_argument(
        "--claim-k", type=int, help=f"claim check: due tasks per phase (default {d.claim_k:,})"
    )
    sizes.add_argument(
        "--claim-limit", type=int, help=f"claim check: tasks per claim (default {d.claim_limit})"
    )
    tune = p.add_argument_group("settings")
    tune.add_argument(
        "--concurrency",
        type=int,
        default=library.DEFAULTS["concurrency"],
        help="sqla_pgotask handler threads per worker process (default %(default)s)",
    )
    tune.add_argument(
        "--raw-batch",
        type=int,
        default=rawsql.DEFAULTS["batch"],
        help="raw SQL jobs per claim (default %(default)s)",
    )
    tune.add_argument(
        "--raw-loops",
        type=int,
        default=rawsql.DEFAULTS["loops"],
        help="raw SQL claim loops per worker process (default %(default)s)",
    )
    tune.add_argument(
        "--poll-interval",
        type=float,
        default=1.0,
        help="fallback poll of both workers, s (default %(default)s; NOTIFY wakes them)",
    )
    tune.add_argument(
        "--quiet-wait",
        type=float,
        help=f"before each timed window wait up to this many s for an idle machine "
        f"(default {d.quiet_wait_s:g}; 0 = don't)",
    )
    tune.add_argument(
        "--timeout",
        type=float,
        help=f"give up on a drain after this many s (default {d.timeout_s:g})",
    )
    a = p.parse_args(argv)

    unknown = set(a.workloads) - set(WORKLOADS)
    if unknown:
        p.error(f"unknown workloads {sorted(unknown)}; choose from {','.join(WORKLOADS)}")
    if set(a.impls) - set(IMPLS) or not a.impls:
        p.error(f"--impls: choose from {','.join(IMPLS)}")
    cfg = Config(server_url=a.server_url, workloads=a.workloads, impls=a.impls, keep_db=a.keep_db)
    if a.quick:
        for key, value in QUICK.items():
            setattr(cfg, key, value)
    for opt, field in (
        ("reps", "reps"),
        ("w1_n", "w1_n"),
        ("w2_n", "w2_n"),
        ("w2_batch", "w2_batch"),
        ("w3_n", "w3_n"),
        ("w3_workers", "w3_workers"),
        ("w4_interval_ms", "w4_interval_ms"),
        ("w4_duration_s", "w4_duration_s"),
        ("w5_n", "w5_n"),
        ("w5_workers", "w5_workers"),
        ("claim_rows", "claim_rows"),
        ("claim_k", "claim_k"),
        ("claim_limit", "claim_limit"),
        ("quiet_wait", "quiet_wait_s"),
        ("timeout", "timeout_s"),
    ):
        value = getattr(a, opt)
        if value is not None:
            setattr(cfg, field, value)
    cfg.settings["sqla_pgotask"].update(concurrency=a.concurrency, poll_interval=a.poll_interval)
    cfg.settings["raw"].update(batch=a.raw_batch, loops=a.raw_loops, poll_interval=a.poll_interval)
    if cfg.reps < 1:
        p.error("--reps must be at least 1")
    return cfg, a


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def main(argv: list[str] | None = None) -> int:
    cfg, args = parse_args(argv)
    result = run_suite(cfg)
    print(result["text"], flush=True)
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(_json_safe(result), indent=1) + "\n")
        log(f"results written to {path}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
