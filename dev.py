#!/usr/bin/env python3
"""One entry point for working on sqla_pgotask, needing nothing but Python 3.10+.

    python3 dev.py test [PYTEST ARGS]   lint, type-check and run the whole test suite
    python3 dev.py demo                  see it work (embedded PostgreSQL if no URL is set)
    python3 dev.py compat [PYTEST ARGS] the fast tests again on the oldest supported
                                         SQLAlchemy (2.0), in ./.venv-sqlalchemy20
    python3 dev.py bench [OPTIONS]      the benchmark suite against raw SQL (see
                                         benchmarks/README.md; --help lists the options)
    python3 dev.py docs [MKDOCS ARGS]   build the documentation site into ./site, strictly
                                         (a broken link or anchor fails it)

test, demo, bench and docs create ./.venv and install the project into it (editable, with
the test and docs extras) the first time, and whenever pyproject.toml changed since.  The tests
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
BIN_DIR = "Scripts" if os.name == "nt" else "bin"
VENV = ROOT / ".venv"
BIN = VENV / BIN_DIR
COMPAT_VENV = ROOT / ".venv-sqlalchemy20"
COMPAT_PIN = "sqlalchemy>=2.0.30,<2.1"


def run(*cmd: str | os.PathLike[str]) -> None:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    code = subprocess.call([str(c) for c in cmd], cwd=ROOT)
    if code:
        sys.exit(code)


def ensure_venv(where: Path = VENV, *extra: str, extras: str = "test,docs") -> Path:
    """Create ``where`` and install the project into it, unless done for this pyproject."""
    bin_dir = where / BIN_DIR
    stamp = where / ".pgotask-installed"
    wanted = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + repr((extras, extra)).encode())
    if stamp.exists() and stamp.read_text() == wanted.hexdigest():
        return bin_dir
    if not (bin_dir / "python").exists():
        print(f"+ creating {where}", flush=True)
        venv.create(where, with_pip=True)
    run(bin_dir / "python", "-m", "pip", "install", "--quiet", "--upgrade", "pip")
    run(bin_dir / "python", "-m", "pip", "install", "--quiet", "-e", f".[{extras}]", *extra)
    stamp.write_text(wanted.hexdigest())
    return bin_dir


def test(args: list[str]) -> None:
    run(BIN / "ruff", "check", ".")
    run(BIN / "ruff", "format", "--check", ".")
    run(BIN / "mypy")
    run(BIN / "python", "-m", "pytest", *args)


def docs(args: list[str]) -> None:
    # mkdocs.yml sets strict and turns broken links and anchors into warnings.
    os.environ.setdefault("NO_MKDOCS_2_WARNING", "1")  # a banner, not a build warning
    run(BIN / "mkdocs", "build", "--strict", *args)


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in {"test", "demo", "compat", "bench", "docs"}:
        print(__doc__)
        sys.exit(2)
    if sys.argv[1] == "compat":
        compat_bin = ensure_venv(COMPAT_VENV, COMPAT_PIN, extras="test")
        run(
            compat_bin / "python",
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            "-m",
            "not slow",
            *sys.argv[2:],
        )
        return
    ensure_venv()
    if sys.argv[1] == "test":
        test(sys.argv[2:])
    elif sys.argv[1] == "bench":
        run(BIN / "python", "-m", "benchmarks.run", *sys.argv[2:])
    elif sys.argv[1] == "docs":
        docs(sys.argv[2:])
    else:
        run(BIN / "pgotask", "demo", *sys.argv[2:])


if __name__ == "__main__":
    main()
