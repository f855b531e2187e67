"""A real PgBouncer in front of the test server, for the tests that run behind one.

:class:`PgBouncer` starts ``pgbouncer`` (the Debian package; CI installs it)
with a configuration in the test's ``tmp_path``, listening on a free
``127.0.0.1`` port and forwarding every database name to the same database
on the test server.  Its log goes to a file next to the configuration and is
printed when it stops (pytest shows it when the test fails).

``server_round_robin = 1``: the pool hands out its idle server connections
in turn rather than the most recently used one first, so that consecutive
transactions of one client land on different server connections, as they do
on a busy pool.  :meth:`PgBouncer.warm` opens that many server connections
first.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import psycopg
from sqlalchemy import make_url

PoolMode = Literal["session", "transaction"]
POOL_MODES: tuple[PoolMode, ...] = ("session", "transaction")

# The advisory lock key of retention (sqla_pgotask.retention.RETENTION_LOCK)
# as pg_locks shows a bigint key: classid the high half, objid the low half.
_LOCKS_HELD = """
SELECT count(*)
FROM pg_locks
WHERE locktype = 'advisory' AND granted AND objsubid = 1
  AND classid::bigint = (%(key)s >> 32) AND objid::bigint = (%(key)s & 4294967295)
"""


def pgbouncer_binary() -> str | None:
    """The ``pgbouncer`` executable, or ``None`` if it is not installed."""
    found = shutil.which("pgbouncer")
    if found is not None:
        return found
    debian = Path("/usr/sbin/pgbouncer")
    return str(debian) if debian.exists() else None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run_as() -> list[str]:
    # PgBouncer refuses to run as root; started by root it switches user
    # itself (-u) after reading its configuration, so the files may stay
    # private to root.
    if os.geteuid() != 0:
        return []
    for user in ("nobody", "postgres"):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(user)
            return ["-u", user]
    raise RuntimeError("PgBouncer refuses to run as root and there is no 'nobody' user")


def libpq_dsn(url: str) -> str:
    """A SQLAlchemy ``postgresql+psycopg://`` URL as a libpq connection string."""
    u = make_url(url)
    parts = {
        "host": u.host or "127.0.0.1",
        "port": u.port or 5432,
        "user": u.username or "postgres",
        "dbname": u.database or "postgres",
    }
    if u.password:
        parts["password"] = u.password
    return " ".join(f"{key}={value}" for key, value in parts.items())


class PgBouncer:
    """A ``pgbouncer`` in front of the server of ``database_url``, in ``pool_mode``.

    Every database name goes to the same database on the server, in
    ``pool_mode``; :attr:`session_database` goes to ``database_url``'s
    database in session mode, whatever ``pool_mode``.
    """

    def __init__(self, directory: Path, database_url: str, pool_mode: PoolMode) -> None:
        binary = pgbouncer_binary()
        if binary is None:
            raise RuntimeError("pgbouncer is not installed")
        self.binary = binary
        self.directory = directory
        self.pool_mode = pool_mode
        self.port = free_port()
        server = make_url(database_url)
        #: Another name for the test database, always in session mode.
        self.session_database = f"{server.database}_session"
        self.user = server.username or "postgres"
        self.log = directory / "pgbouncer.log"
        self._process: subprocess.Popen[bytes] | None = None
        target = f"host={server.host or '127.0.0.1'} port={server.port or 5432}"
        if server.password:
            target += f" password={server.password}"
        config = directory / "pgbouncer.ini"
        users = directory / "userlist.txt"
        users.write_text(f'"{self.user}" ""\n')
        config.write_text(
            f"""
[databases]
* = {target}
{self.session_database} = {target} dbname={server.database} pool_mode=session

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {self.port}
unix_socket_dir =
auth_type = trust
auth_file = {users}
pool_mode = {pool_mode}
server_round_robin = 1
default_pool_size = 20
max_client_conn = 200
"""
        )
        self.config = config

    def url(self, database_url: str, *, session: bool = False) -> str:
        """``database_url`` (a database on the test server) through PgBouncer.

        ``session``: through :attr:`session_database`, in session mode.
        """
        u = make_url(database_url).set(host="127.0.0.1", port=self.port, password=None)
        if session:
            u = u.set(database=self.session_database)
        return u.render_as_string(hide_password=False)

    def start(self) -> PgBouncer:
        """Start the process and wait until it accepts connections."""
        with self.log.open("wb") as log:
            self._process = subprocess.Popen(
                [self.binary, *_run_as(), str(self.config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 10
        while True:
            if self._process.poll() is not None:
                raise RuntimeError(f"pgbouncer exited at start:\n{self.log.read_text()}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port)):
                return self
            if time.monotonic() > deadline:
                raise RuntimeError(f"pgbouncer did not listen in time:\n{self.log.read_text()}")
            time.sleep(0.02)

    def stop(self) -> None:
        """Stop the process (SIGTERM: at once, closing every connection); print its log."""
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        print(f"--- pgbouncer ({self.pool_mode}) log ---\n{self.log.read_text()}")

    def __enter__(self) -> PgBouncer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def connect(self, database_url: str, **kwargs: Any) -> psycopg.Connection[tuple[Any, ...]]:
        """A psycopg connection to ``database_url``'s database through PgBouncer."""
        dsn = libpq_dsn(self.url(database_url))
        # PgBouncer 1.18 keeps no prepared statements across server connections.
        kwargs.setdefault("prepare_threshold", None)
        return psycopg.connect(dsn, **kwargs)

    def warm(self, database_url: str, servers: int) -> None:
        """Make the pool hold at least ``servers`` server connections to the database."""
        clients = [self.connect(database_url) for _ in range(servers)]
        try:
            for client in clients:  # concurrent transactions: one server connection each
                client.execute("SELECT 1")
            for client in clients:
                client.commit()
        finally:
            for client in clients:
                client.close()


@contextlib.contextmanager
def direct(database_url: str) -> Iterator[psycopg.Connection[tuple[Any, ...]]]:
    """An autocommit connection to the test server itself, bypassing PgBouncer."""
    with psycopg.connect(libpq_dsn(database_url), autocommit=True) as conn:
        yield conn


def advisory_lock_holders(database_url: str, key: int) -> int:
    """How many server sessions hold the advisory lock ``key`` (read on the server itself)."""
    with direct(database_url) as conn:
        row = conn.execute(_LOCKS_HELD, {"key": key}).fetchone()
    assert row is not None
    return int(row[0])
