"""What the orchestrator and the worker processes share: clock, task kind, W5 SQL.

Standard library only, so a raw-SQL worker process loads psycopg and nothing
else (its peak RSS is then the baseline's own).
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Iterable

#: the task kind (sqla_pgotask) / job kind (raw SQL) of every benchmark task
KIND = "bench"


def now_ns() -> int:
    """``CLOCK_MONOTONIC`` in ns: on Linux the same clock in every process of the machine."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


# --- W5: the application's tables and what each task does with them ---------

#: rows of ``bench_app_ref``; task ``seq`` reads row ``ref_key(seq)``
REF_ROWS = 1000

APP_SCHEMA = f"""
CREATE TABLE bench_app_ref (id integer PRIMARY KEY, v text NOT NULL);
INSERT INTO bench_app_ref (id, v) SELECT g, md5(g::text) FROM generate_series(1, {REF_ROWS}) g;
CREATE TABLE bench_app_rows (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    seq bigint NOT NULL UNIQUE,
    v text NOT NULL
);
"""

#: read one reference row (named parameters: valid for psycopg and for SQLAlchemy ``text()``)
APP_READ_PSYCOPG = "SELECT v FROM bench_app_ref WHERE id = %(id)s"
APP_WRITE_PSYCOPG = "INSERT INTO bench_app_rows (seq, v) VALUES (%(seq)s, %(v)s)"
APP_READ_SQLA = "SELECT v FROM bench_app_ref WHERE id = :id"
APP_WRITE_SQLA = "INSERT INTO bench_app_rows (seq, v) VALUES (:seq, :v)"


def ref_key(seq: int) -> int:
    """The ``bench_app_ref.id`` that task ``seq`` reads."""
    return seq % REF_ROWS + 1


# --- statistics ------------------------------------------------------------


def percentile(values: Iterable[float], p: float) -> float:
    """Percentile ``p`` (0-100) with linear interpolation; NaN for no values."""
    xs = sorted(values)
    if not xs:
        return math.nan
    k = (len(xs) - 1) * p / 100.0
    lo = math.floor(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def median(values: Iterable[float | None]) -> float:
    """Median of the values that are numbers; NaN if there are none."""
    xs = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(xs) if xs else math.nan


# --- the machine -------------------------------------------------------------


def vm_hwm_kib() -> int:
    """Peak resident set size of this process image (``VmHWM``), in KiB.

    Not ``ru_maxrss``: Linux carries the forking parent's high-water mark
    across ``exec``.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def cpu_times() -> tuple[float, float]:
    """Machine-wide (busy, idle) CPU seconds since boot, from ``/proc/stat``."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return 0.0, 0.0
    user, nice, system, idle, iowait, irq, softirq = (fields + [0] * 7)[:7]
    tick = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq) / tick, (idle + iowait) / tick


def wait_quiet(max_wait_s: float, idle_share: float = 0.85, sample_s: float = 0.25) -> float:
    """Wait (at most ``max_wait_s``) until the machine is ``idle_share`` idle.

    Returns the idle share of the last sample (NaN if not waited at all), so a
    result measured on a busy machine can be told apart.
    """
    if max_wait_s <= 0:
        return math.nan
    deadline = time.monotonic() + max_wait_s
    share = math.nan
    while True:
        busy0, idle0 = cpu_times()
        time.sleep(sample_s)
        busy1, idle1 = cpu_times()
        total = (busy1 - busy0) + (idle1 - idle0)
        share = (idle1 - idle0) / total if total > 0 else math.nan
        if not share < idle_share or time.monotonic() >= deadline:
            return share
