#!/usr/bin/env python3
"""One entry point for working on sqla_pgotask, needing nothing but Python 3.10+.

    python3 dev.py test [PYTEST ARGS]   lint, type-check and run the whole test suite
    python3 dev.py demo                  see it work (embedded PostgreSQL if no URL is set)

Both create ./.venv and install the project into it (editable, with test
extras) the first time, and whenever pyproject.toml changed since.  The tests
use PGOTASK_TEST_DATABASE_URL when set, else they start an embedded PostgreSQL.
Local loops can skip the slow fault, process and packaging tests:
``python3 dev.py test -m "not slow"``.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
STAMP = VENV / ".pgotask-installed"


def run(*cmd: str | os.PathLike[str]) -> None:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    code = subprocess.call([str(c) for c in cmd], cwd=ROOT)
    if code:
        sys.exit(code)


def ensure_venv() -> None:
    wanted = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if STAMP.exists() and STAMP.read_text() == wanted:
        return
    if not (BIN / "python").exists():
        print(f"+ creating {VENV}", flush=True)
        venv.create(VENV, with_pip=True)
    run(BIN / "python", "-m", "pip", "install", "--quiet", "--upgrade", "pip")
    run(BIN / "python", "-m", "pip", "install", "--quiet", "-e", ".[test]")
    STAMP.write_text(wanted)


def test(args: list[str]) -> None:
    run(BIN / "ruff", "check", ".")
    run(BIN / "ruff", "format", "--check", ".")
    run(BIN / "mypy")
    run(BIN / "python", "-m", "pytest", *args)


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in {"test", "demo"}:
        print(__doc__)
        sys.exit(2)
    ensure_venv()
    if sys.argv[1] == "test":
        test(sys.argv[2:])
    else:
        run(BIN / "pgotask", "demo", *sys.argv[2:])


if __name__ == "__main__":
    main()
