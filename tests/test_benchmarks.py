"""The benchmark suite still runs: ``benchmarks.run --quick`` end to end.

A smoke test, not a timed one: it checks that every workload completes
against sqla_pgotask and the raw-SQL baseline and that the suite's own
correctness checks pass (each task handled exactly once, W5's application
rows written exactly once).  No timing is asserted.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_quick_benchmark_suite_completes(server_url: str, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.run",
            "--quick",
            "--server-url",
            server_url,
            "--json",
            str(out),
        ],
        cwd=ROOT,
        check=False,
        capture_output=True,
        text=True,
        timeout=840,
    )
    output = f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    assert proc.returncode == 0, output
    result: dict[str, Any] = json.loads(out.read_text())
    runs: list[dict[str, Any]] = result["runs"]

    cases = {(r["impl"], r["case"]) for r in runs}
    for impl in ("raw", "sqla_pgotask"):
        for case in ("w1", "w2", "w3_1p", "w3_2p", "w4", "w5"):
            assert (impl, case) in cases, output
    assert ("sqla_pgotask", "w2_add_all") in cases

    for run in runs:
        assert run["error"] is None, run["error"]
        for name, check in run["checks"].items():
            assert check["ok"], (run["impl"], run["case"], name, check)
        if run["case"].startswith(("w3", "w4")):
            once = run["checks"]["exactly_once"]
            assert once["duplicated"] == 0 and once["missing"] == 0, once
        if run["case"] == "w5":
            rows = run["checks"]["app_rows"]
            assert rows["rows"] == rows["distinct_seq"] == rows["expected"], rows

    claim = result["claim"]
    assert claim.get("error") is None, claim.get("error")
    assert all(check["ok"] for check in claim["checks"].values()), claim["checks"]
    assert result["ok"]
