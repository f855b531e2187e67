"""The wheel ships the revisions, and ``sqla_pgotask:migrations/versions`` resolves from it.

An application's ``alembic upgrade heads`` is run in a subprocess, once in a
clean venv where the library is installed from its wheel and once in the
project's own (editable) venv, each time from a directory that does not hold
the source tree, so ``sqla_pgotask`` can only come from the installation.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from sqla_pgotask.alembic_helpers import HEAD_REVISION, TABLE_NAMES
from tests.helpers import create_database, drop_database
from tests.helpers.consumer_app import APP_REVISION, build_consumer_app

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent

WHEEL_FILES = (
    "sqla_pgotask/migrations/versions/sqla_pgotask_0001_initial.py",
    "sqla_pgotask/migrations/env.py",
    "sqla_pgotask/migrations/script.py.mako",
    "sqla_pgotask/py.typed",
    "sqla_pgotask/sql/tasks.sql",
    "sqla_pgotask/sql/schema.sql",
)


def _run(args: list[str | Path], cwd: Path, timeout: float = 300) -> str:
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "VIRTUAL_ENV"}}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    proc = subprocess.run(
        [str(a) for a in args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert proc.returncode == 0, f"{args} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel built from this source tree."""
    outdir = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "build", "--wheel", "--outdir", outdir, ROOT], cwd=outdir)
    [built] = outdir.glob("sqla_pgotask-*.whl")
    return built


@pytest.fixture
def fresh_database(server_url: str) -> Iterator[str]:
    name = f"pgotask_pkg_{os.getpid()}"
    yield create_database(server_url, name)
    drop_database(server_url, name)


def _upgrade_heads_and_check(python: Path, workdir: Path, database_url: str) -> Path:
    """Run the consumer app's ``alembic upgrade heads`` with ``python``; return where
    ``sqla_pgotask`` was imported from."""
    app = build_consumer_app(workdir / "app", database_url)
    where = _run([python, "-c", "import sqla_pgotask; print(sqla_pgotask.__file__)"], workdir)
    _run([python, "-m", "alembic", "-c", app.ini, "upgrade", "heads"], cwd=workdir)
    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            revision = conn.execute(text("SELECT pgotask_schema_revision()")).scalar_one()
            versions = set(conn.execute(text("SELECT version_num FROM alembic_version")).scalars())
            tables = set(
                conn.execute(
                    text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
                ).scalars()
            )
    finally:
        engine.dispose()
    assert revision == HEAD_REVISION
    assert versions == {APP_REVISION, HEAD_REVISION}
    assert tables == {*TABLE_NAMES, "orders", "alembic_version"}
    return Path(where.strip()).resolve()


def test_wheel_contains_revisions_env_and_data(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        [license_file] = [name for name in names if name.endswith(".dist-info/licenses/LICENSE")]
        license_text = archive.read(license_file).decode()
        metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA")))
    missing = [name for name in WHEEL_FILES if name not in names]
    assert not missing, f"not in {wheel.name}: {missing}"
    assert not any(name.startswith("tests/") for name in names)
    assert license_text == (ROOT / "LICENSE").read_text()
    assert license_text.startswith("MIT License")
    assert b"License-Expression: MIT" in metadata


def test_sdist_contains_the_license(tmp_path: Path) -> None:
    _run([sys.executable, "-m", "build", "--sdist", "--outdir", tmp_path, ROOT], cwd=tmp_path)
    [built] = tmp_path.glob("sqla_pgotask-*.tar.gz")
    with tarfile.open(built) as archive:
        names = archive.getnames()
        [license_file] = [name for name in names if name.endswith("/LICENSE")]
        member = archive.extractfile(license_file)
        assert member is not None
        assert member.read().decode() == (ROOT / "LICENSE").read_text()


def test_version_location_resolves_from_a_wheel_install(
    wheel: Path, tmp_path: Path, fresh_database: str
) -> None:
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", venv], cwd=tmp_path)
    python = venv / "bin" / "python"
    pip: list[str | Path] = [python, "-m", "pip", "install", "--quiet"]
    _run([*pip, "--no-deps", wheel], cwd=tmp_path)
    _run([*pip, "sqlalchemy", "psycopg[binary]", "alembic", "croniter"], cwd=tmp_path)

    where = _upgrade_heads_and_check(python, tmp_path, fresh_database)
    assert where.is_relative_to(venv.resolve())
    _check_without_extras(venv, tmp_path)


def _check_without_extras(venv: Path, workdir: Path) -> None:
    """The core works without the optional extras, and asking for one says what to install."""
    python = venv / "bin" / "python"
    _run(
        [python, "-c", "import sqla_pgotask.cli, sqla_pgotask.testing, sqla_pgotask.admin"], workdir
    )
    done = subprocess.run(
        [venv / "bin" / "pgotask", "worker", "app:scheduler", "--metrics-port", "0"],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert "pip install 'sqla-pgotask[prometheus]'" in done.stderr
    done = subprocess.run(
        [python, "-c", "import sqla_pgotask.otel"],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    assert "No module named 'opentelemetry'" in done.stderr


def test_version_location_resolves_from_the_editable_install(
    tmp_path: Path, fresh_database: str
) -> None:
    where = _upgrade_heads_and_check(Path(sys.executable), tmp_path, fresh_database)
    assert where == (ROOT / "sqla_pgotask" / "__init__.py").resolve()
