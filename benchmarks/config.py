"""What a suite run measures: sizes, settings, options."""

from __future__ import annotations

import dataclasses
from typing import Any

from benchmarks import library, rawsql
from benchmarks.db import DEFAULT_SERVER_URL

#: every workload, in the order they run within a repetition
WORKLOADS = ("w1", "w2", "w3", "w4", "w5", "claim")
#: implementation keys, baseline first
IMPLS = ("raw", "sqla_pgotask")
NAMES = {"raw": rawsql.NAME, "sqla_pgotask": library.NAME}


@dataclasses.dataclass
class Config:
    server_url: str = DEFAULT_SERVER_URL
    workloads: list[str] = dataclasses.field(default_factory=lambda: list(WORKLOADS))
    impls: list[str] = dataclasses.field(default_factory=lambda: list(IMPLS))
    reps: int = 3
    w1_n: int = 5_000
    w2_n: int = 100_000
    w2_batch: int = 1_000
    w3_n: int = 20_000
    w3_workers: list[int] = dataclasses.field(default_factory=lambda: [1, 2])
    w4_interval_ms: float = 10.0
    w4_duration_s: float = 10.0
    w4_settle_s: float = 1.0
    w5_n: int = 10_000
    w5_workers: int = 2
    claim_rows: int = 1_000_000
    claim_k: int = 2_000
    claim_limit: int = 10
    prefill_batch: int = 1_000
    settings: dict[str, dict[str, Any]] = dataclasses.field(
        default_factory=lambda: {
            "raw": dict(rawsql.DEFAULTS),
            "sqla_pgotask": dict(library.DEFAULTS),
        }
    )
    #: before each timed window, wait up to this long for a >= 85 % idle machine (0: don't)
    quiet_wait_s: float = 3.0
    timeout_s: float = 600.0
    keep_db: bool = False


#: ``--quick``: tiny sizes, a smoke run of every code path in about a minute
QUICK: dict[str, Any] = {
    "reps": 1,
    "w1_n": 100,
    "w2_n": 2_000,
    "w2_batch": 500,
    "w3_n": 300,
    "w4_duration_s": 0.5,
    "w4_settle_s": 0.3,
    "w5_n": 200,
    "claim_rows": 5_000,
    "claim_k": 100,
    "quiet_wait_s": 0.0,
}
