"""Shared machinery of the fault-injection suite.

* :class:`Fleet`: ``pgotask worker tests.helpers.apps.faulty:scheduler`` processes
  that a test kills, stops and respawns;
* :class:`Probe`: the test's own view of the database (it survives server
  restarts: ``pool_pre_ping`` and retried queries);
* :func:`app_database` and :class:`SlotHog`: a database that workers reach
  as an ordinary role, and idle connections of that role that take every
  connection slot it can get;
* :func:`check_ledger` / :meth:`LedgerCheck.assert_clean`: the end-of-run
  invariants (every task succeeded exactly once, nothing left running, no
  attempt beyond ``max_attempts``);
* :class:`IsolatedHost`: a network namespace joined to this one by a veth
  pair, for a worker whose network the test cuts and heals;
* :class:`ScenarioResult` / :func:`report`: the one-line summary of a
  scenario, also appended as JSON to the file named by
  ``PGOTASK_FAULT_RESULTS``; ``python -m tests.helpers.faults FILE`` turns
  that file into the table of ``docs/reliability.md``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import itertools
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import psycopg
from sqlalchemy import Engine, create_engine, make_url, text
from sqlalchemy.exc import DBAPIError

from sqla_pgotask.embedded import EmbeddedPostgres
from sqla_pgotask.migrate import upgrade
from tests.helpers.apps.faulty import SCHEDULER, create_ledger
from tests.helpers.processes import (
    PROJECT_ROOT,
    WorkerProcess,
    pgotask_env,
    pgotask_executable,
)

RESULTS_ENV = "PGOTASK_FAULT_RESULTS"

T = TypeVar("T")


# -- databases ---------------------------------------------------------------


def url_for(server_url: str, database: str) -> str:
    """``server_url`` pointing at another database."""
    return make_url(server_url).set(database=database).render_as_string(hide_password=False)


def admin_execute(server_url: str, *statements: str) -> None:
    """Run ``statements`` in autocommit on ``server_url``."""
    admin = create_engine(server_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            for statement in statements:
                conn.execute(text(statement))
    finally:
        admin.dispose()


def prepare_database(url: str) -> None:
    """Install the library's tables and the faulty app's ledger in the database at ``url``."""
    upgrade(url)
    engine = create_engine(url)
    try:
        create_ledger(engine)
    finally:
        engine.dispose()


#: The ordinary (not superuser) role of :func:`app_database`.
APP_ROLE = "fault_app"


def app_database(server_url: str, name: str) -> str:
    """Create database ``name`` owned by :data:`APP_ROLE`, migrated by it; return its URL as it.

    Workers that connect as a superuser may take the slots of
    ``superuser_reserved_connections``; an application's role may not, so
    faults about connection slots need one.  The superuser's URL of the same
    database is ``url_for(server_url, name)``.
    """
    admin_execute(
        server_url,
        f"DO $$ BEGIN CREATE ROLE {APP_ROLE} LOGIN; "
        "EXCEPTION WHEN duplicate_object THEN NULL; END $$",
        f'CREATE DATABASE "{name}" OWNER {APP_ROLE}',
    )
    url = make_url(url_for(server_url, name)).set(username=APP_ROLE)
    rendered = url.render_as_string(hide_password=False)
    prepare_database(rendered)
    return rendered


#: What PostgreSQL says when it turns a connection away for want of a slot
#: (SQLSTATE 53300, which a failed connection attempt does not carry).
_NO_SLOT_MESSAGES = ("too many clients already", "remaining connection slots are reserved")


class SlotHog:
    """Idle connections that take every connection slot open to the role of ``url``.

    ``fill()`` connects until the server refuses for want of a slot and
    keeps what it got; ``release()`` closes them all.  Connect it to another
    database than the one under test: ``max_connections`` counts the whole
    server, and :meth:`Probe.terminate` then spares these.
    """

    def __init__(self, url: str) -> None:
        parsed = make_url(url)
        self._params = {
            "host": parsed.host,
            "port": parsed.port,
            "user": parsed.username,
            "dbname": parsed.database,
        }
        self.held: list[psycopg.Connection[Any]] = []

    def __enter__(self) -> SlotHog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def fill(self, *, limit: int = 1_000) -> int:
        """Take every free slot; return how many this call took."""
        taken = 0
        while taken < limit:
            try:
                conn = psycopg.connect(**self._params, autocommit=True)  # type: ignore[arg-type]
            except psycopg.OperationalError as exc:
                if not any(m in str(exc) for m in _NO_SLOT_MESSAGES):
                    raise
                return taken
            self.held.append(conn)
            taken += 1
        raise AssertionError(f"took {limit} connections and the server still had room")

    def release(self) -> float:
        """Close every held connection; return ``time.time()`` once they are closed."""
        held, self.held = self.held, []
        for conn in held:
            conn.close()
        return time.time()


def epoch(value: dt.datetime | None) -> float | None:
    """A database timestamp as ``time.time()`` seconds (same machine, same clock)."""
    return None if value is None else value.timestamp()


class Probe:
    """The test's connection to the database under test.

    Its read-only queries retry while the server is down or restarting, so a
    test can keep watching through a restart; writes are not retried (a
    commit whose acknowledgement was lost would be repeated).
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine: Engine = create_engine(url, pool_pre_ping=True, pool_size=2)

    def close(self) -> None:
        """Dispose of the engine."""
        self.engine.dispose()

    def __enter__(self) -> Probe:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _retrying(self, fn: Callable[[], T], timeout: float = 30.0) -> T:
        deadline = time.monotonic() + timeout
        while True:
            try:
                return fn()
            except DBAPIError as exc:
                transient = exc.connection_invalidated or _is_transient(exc)
                if not transient or time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def rows(self, sql: str, **params: object) -> list[Any]:
        """All rows of ``sql`` (retried on connection failures)."""

        def run() -> list[Any]:
            with self.engine.connect() as conn:
                return list(conn.execute(text(sql), params).all())

        return self._retrying(run)

    def scalar(self, sql: str, **params: object) -> Any:
        """The single value of ``sql``."""
        rows = self.rows(sql, **params)
        return rows[0][0] if rows else None

    def execute(self, sql: str, **params: object) -> None:
        """Run ``sql`` in its own committed transaction (not retried: it may write)."""
        with self.engine.begin() as conn:
            conn.execute(text(sql), params)

    def enqueue(
        self, count: int, kind: str = "ledger", payload: dict[str, Any] | None = None
    ) -> float:
        """Insert ``count`` tasks in one transaction; return ``time.time()`` after the commit."""
        body = json.dumps(payload or {})
        self.execute(
            "INSERT INTO pgotask_task (kind, payload) "
            "SELECT :kind, CAST(:payload AS jsonb) FROM generate_series(1, :count)",
            kind=kind,
            payload=body,
            count=count,
        )
        return time.time()

    def enqueue_one(self, kind: str = "ledger", payload: dict[str, Any] | None = None) -> int:
        """Insert one task, return its id."""
        task_id: int = self.scalar_tx(
            "INSERT INTO pgotask_task (kind, payload) VALUES (:kind, CAST(:payload AS jsonb)) "
            "RETURNING id",
            kind=kind,
            payload=json.dumps(payload or {}),
        )
        return task_id

    def scalar_tx(self, sql: str, **params: object) -> Any:
        """The single value of ``sql``, run in its own committed transaction (not retried)."""
        with self.engine.begin() as conn:
            return conn.execute(text(sql), params).scalar_one()

    def count(self, where: str = "TRUE", **params: object) -> int:
        """Tasks matching ``where``."""
        return int(self.scalar(f"SELECT count(*) FROM pgotask_task WHERE {where}", **params))

    def unfinished(self) -> int:
        """Tasks still pending or running."""
        return self.count("status IN ('pending', 'running')")

    def running_ids(self) -> list[int]:
        """Ids of the running tasks."""
        return [row[0] for row in self.rows("SELECT id FROM pgotask_task WHERE status = 'running'")]

    def done_at(self, ids: Sequence[int]) -> float | None:
        """When the last of ``ids`` finished (``None`` if one has not)."""
        if not ids:
            return None
        pending, last = self.rows(
            "SELECT count(*) FILTER (WHERE finished_at IS NULL), max(finished_at) "
            "FROM pgotask_task WHERE id = ANY(:ids)",
            ids=list(ids),
        )[0]
        return None if pending else epoch(last)

    def first_finished_after(self, moment: float) -> float | None:
        """When the first task finished after ``moment`` (``time.time()`` seconds)."""
        value = self.scalar(
            "SELECT min(finished_at) FROM pgotask_task WHERE finished_at > to_timestamp(:t)",
            t=moment,
        )
        return epoch(value)

    def last_finished(self) -> float | None:
        """When the last task finished."""
        return epoch(self.scalar("SELECT max(finished_at) FROM pgotask_task"))

    def backends(self, query_like: str | None = None) -> list[int]:
        """Pids of the other client backends of this database (query LIKE ``query_like``)."""
        sql = (
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid <> pg_backend_pid() AND backend_type = 'client backend'"
        )
        if query_like is not None:
            sql += " AND query LIKE :pattern"
        return [row[0] for row in self.rows(sql, pattern=query_like)]

    def terminate(self, query_like: str | None = None) -> int:
        """``pg_terminate_backend`` the other backends of this database; return how many."""
        sql = (
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid() "
            "AND backend_type = 'client backend'"
        )
        if query_like is not None:
            sql += " AND query LIKE :pattern"
        return int(self.scalar(sql, pattern=query_like))


def _is_transient(exc: DBAPIError) -> bool:
    message = str(exc.orig).lower() if exc.orig is not None else str(exc).lower()
    return any(
        word in message
        for word in ("terminat", "shutting down", "starting up", "recovery", "closed", "connection")
    )


# -- network -------------------------------------------------------------------

_hosts = itertools.count()


class NamespacesNotPermitted(Exception):
    """This process may not create network namespaces (not root, or a restricted container)."""


class IsolatedHost:
    """A network namespace joined to this one by a veth pair: a worker host whose link can be cut.

    Both ends get addresses of the loopback range, a ``/30`` chosen from the
    pid (``127.<100..163>.<0..255>.1`` here, ``.2`` inside), so no packet can
    ever be addressed outside this machine.  Linux refuses loopback-range
    addresses on other interfaces unless ``route_localnet`` is on, so it is
    turned on for the two veth ends, and for nothing else.  A process run
    under :attr:`prefix` sees only the veth end inside (its own ``lo`` stays
    down), so it reaches :attr:`host_address`, not this host's 127.0.0.1.

    :meth:`cut` takes the inside end down: the inside's packets go nowhere
    (a new connection fails at once with "Network is unreachable"; an open
    one waits, its data retransmitted), and this side's packets to it are
    dropped without an answer, so the server learns nothing.  :meth:`heal`
    brings it back up, and open connections resume where they were.
    :meth:`close` deletes the pair and the namespace, whatever state they
    are in.
    """

    def __init__(self) -> None:
        n = (os.getpid() * 8 + next(_hosts)) % (64 * 256)
        self.name = f"pgotask-fault{n}"
        # Interface names have at most 15 characters.
        self.host_if = f"pgf{n}h"
        self.inner_if = f"pgf{n}n"
        subnet = f"127.{100 + n // 256}.{n % 256}"
        self.host_address = f"{subnet}.1"
        self.address = f"{subnet}.2"
        self._created = False

    @property
    def prefix(self) -> tuple[str, ...]:
        """The command prefix that runs a program inside (it execs: same pid)."""
        return ("ip", "netns", "exec", self.name)

    def create(self) -> IsolatedHost:
        """Create the namespace and the link; raise :class:`NamespacesNotPermitted` if refused."""
        if shutil.which("ip") is None:
            raise AssertionError("this scenario needs the ip command (Debian package iproute2)")
        added = _ip("netns", "add", self.name, check=False)
        if added.returncode != 0:
            if any(w in added.stderr for w in ("not permitted", "Permission denied")):
                raise NamespacesNotPermitted(added.stderr.strip())
            raise AssertionError(f"ip netns add {self.name} failed: {added.stderr.strip()}")
        self._created = True
        try:
            inside = ("-n", self.name)
            _ip(
                *f"link add {self.host_if} type veth peer name {self.inner_if}".split(),
                "netns",
                self.name,
            )
            _ip("addr", "add", f"{self.host_address}/30", "dev", self.host_if)
            Path(f"/proc/sys/net/ipv4/conf/{self.host_if}/route_localnet").write_text("1")
            _ip("link", "set", self.host_if, "up")
            _ip(*inside, "addr", "add", f"{self.address}/30", "dev", self.inner_if)
            # /proc/sys/net shows the namespace of the process reading it.
            localnet = f"/proc/sys/net/ipv4/conf/{self.inner_if}/route_localnet"
            _run([*self.prefix, "sh", "-c", f"echo 1 > {localnet}"])
            _ip(*inside, "link", "set", self.inner_if, "up")
        except BaseException:
            self.close()
            raise
        return self

    def wait_reaches(self, url: str, timeout: float = 15.0) -> None:
        """Wait until a connection from inside to the server of ``url`` succeeds.

        The server reloads ``pg_hba.conf`` on a signal: until it has, it turns
        a client from inside away, and a worker started then would exit.
        """
        parsed = make_url(url)
        probe = (
            "import sys, time, psycopg\n"
            f"deadline = time.monotonic() + {timeout}\n"
            "while True:\n"
            "    try:\n"
            "        psycopg.connect(host=sys.argv[1], port=sys.argv[2], user=sys.argv[3],\n"
            "                        dbname=sys.argv[4], connect_timeout=2).close()\n"
            "        break\n"
            "    except psycopg.OperationalError:\n"
            "        if time.monotonic() > deadline:\n"
            "            raise\n"
            "        time.sleep(0.05)\n"
        )
        args = [str(parsed.host), str(parsed.port), str(parsed.username), str(parsed.database)]
        _run([*self.prefix, sys.executable, "-c", probe, *args])

    def cut(self) -> float:
        """Take the link down; return ``time.time()`` of the cut."""
        _ip("-n", self.name, "link", "set", self.inner_if, "down")
        return time.time()

    def heal(self) -> float:
        """Bring the link back up; return ``time.time()`` of the heal."""
        _ip("-n", self.name, "link", "set", self.inner_if, "up")
        return time.time()

    def close(self) -> None:
        """Delete the veth pair and the namespace (errors ignored: each may be gone already)."""
        if not self._created:
            return
        _ip("link", "del", self.host_if, check=False)
        _ip("netns", "del", self.name, check=False)
        self._created = False


def _run(cmd: Sequence[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()}")
    return done


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return _run(["ip", *args], check=check)


def allow_clients_from(server: EmbeddedPostgres, address: str) -> None:
    """Let clients from ``address`` in (trust, as for 127.0.0.1), then reload the server."""
    hba = server.directory / "data" / "pg_hba.conf"
    with hba.open("a") as f:
        f.write(f"host all all {address}/32 trust\n")
    admin_execute(server.url, "SELECT pg_reload_conf()")


# -- waiting -----------------------------------------------------------------


def wait_for(
    predicate: Callable[[], T],
    timeout: float,
    *,
    interval: float = 0.05,
    message: str = "condition",
    tick: Callable[[], object] | None = None,
) -> T:
    """Call ``predicate`` (and ``tick``, e.g. respawning dead workers) until it is truthy."""
    deadline = time.monotonic() + timeout
    while True:
        if tick is not None:
            tick()
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.1f}s waiting for {message}")
        time.sleep(interval)


# -- worker processes ----------------------------------------------------------


class Fleet:
    """Worker processes of the faulty app, killed and respawned by a test.

    Every process ends with the fleet (SIGKILL if still alive).  Their logs
    are printed only when the block exits with an exception, so that
    ``pytest -s`` shows the scenario summaries, not thousands of log lines.
    """

    def __init__(
        self,
        database_url: str,
        log_dir: Path,
        *args: str,
        scheduler: str = SCHEDULER,
        prefix: Sequence[str] = (),
    ) -> None:
        self.database_url = database_url
        self.log_dir = log_dir
        self.args = args
        self.scheduler = scheduler
        #: Run each worker under this command (``ip netns exec NAME``, say); it must exec the
        #: worker in its own process, so that the pid is the worker's.
        self.prefix = tuple(prefix)
        self.all: list[WorkerProcess] = []
        self.spawned = 0

    def __enter__(self) -> Fleet:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close(show_logs=exc_type is not None)

    @property
    def alive(self) -> list[WorkerProcess]:
        """The processes still running."""
        return [w for w in self.all if w.alive()]

    def spawn(self) -> WorkerProcess:
        """Start one more worker (without waiting for it to start)."""
        log_path = self.log_dir / f"worker{self.spawned}.log"
        self.spawned += 1
        with log_path.open("wb") as log_file:
            process = subprocess.Popen(
                [*self.prefix, pgotask_executable(), "worker", self.scheduler, *self.args],
                cwd=PROJECT_ROOT,
                env=pgotask_env(self.database_url),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        worker = WorkerProcess(process, log_path)
        self.all.append(worker)
        return worker

    def start(self, count: int, *, timeout: float = 30.0) -> list[WorkerProcess]:
        """Start ``count`` workers and wait until each is claiming."""
        workers = [self.spawn() for _ in range(count)]
        for worker in workers:
            worker.wait_started(timeout)
        return workers

    def kill9(self, worker: WorkerProcess) -> float:
        """SIGKILL ``worker`` and reap it; return ``time.time()`` of the kill.

        Reaping keeps the process table clean between kills (the pid check
        counts a zombie as dead either way).
        """
        moment = time.time()
        worker.send(signal.SIGKILL)
        worker.wait(10)
        return moment

    def respawn_dead(self, target: int) -> list[WorkerProcess]:
        """Reap dead workers and start new ones until ``target`` are alive; return the dead."""
        dead = [w for w in self.all if w.process.returncode is None and not w.alive()]
        for _ in range(target - len(self.alive)):
            self.spawn()
        return dead

    def wait_started(self, timeout: float = 30.0) -> None:
        """Wait until every live worker is claiming (a SIGTERM before that just kills it)."""
        for worker in self.alive:
            worker.wait_started(timeout)

    def stop(self, timeout: float = 30.0) -> list[int]:
        """SIGTERM every live worker once it has started; return their exit codes.

        A worker just respawned may still be starting its interpreter, before
        any signal handler exists: a SIGTERM then simply kills it (-15).
        """
        self.wait_started(timeout)
        workers = self.alive
        for worker in workers:
            worker.send(signal.SIGTERM)
        return [worker.wait(timeout) for worker in workers]

    def logs(self) -> str:
        """Every worker's log."""
        return "\n".join(
            f"----- {w.log_path.name} (pid {w.pid}, exit {w.process.returncode}) -----\n{w.log()}"
            for w in self.all
        )

    def close(self, *, show_logs: bool = False) -> None:
        """Kill what still runs; print the logs if asked."""
        for worker in self.all:
            if worker.alive():
                worker.process.kill()
            worker.process.wait()
        if show_logs:
            print(self.logs())


# -- end-of-run checks -----------------------------------------------------------


@dataclass
class LedgerCheck:
    """What the task table and the ledger say at the end of a run."""

    tasks: int
    by_status: dict[str, int]
    ledger_rows: int
    ledger_tasks: int
    #: Ledger rows of tasks that did not succeed (a write committed without its completion).
    orphan_rows: int
    #: Succeeded tasks without a ledger row.
    missing_rows: int
    #: Attempts that hit the ledger's UNIQUE constraint: a second run of a committed task.
    unique_violations: int
    running: int
    over_attempts: int
    #: Tasks that needed more than one attempt.
    rerun: int
    max_attempts_seen: int
    errors_by_type: dict[str, int]

    @property
    def succeeded(self) -> int:
        """Tasks that succeeded."""
        return self.by_status.get("succeeded", 0)

    @property
    def lost(self) -> int:
        """Tasks that did not succeed."""
        return self.tasks - self.succeeded

    @property
    def duplicated(self) -> int:
        """Ledger rows beyond one per task, plus second runs caught by the constraint."""
        return self.ledger_rows - self.ledger_tasks + self.unique_violations

    def assert_clean(self, expected_tasks: int) -> None:
        """Every task succeeded exactly once; nothing running; attempts within bounds."""
        problems = []
        if self.tasks != expected_tasks:
            problems.append(f"{self.tasks} tasks, expected {expected_tasks}")
        if self.succeeded != self.tasks:
            problems.append(f"not all succeeded: {self.by_status}")
        if self.ledger_rows != self.tasks or self.ledger_tasks != self.tasks:
            problems.append(
                f"ledger has {self.ledger_rows} rows for {self.ledger_tasks} tasks, "
                f"expected {self.tasks}"
            )
        for name in ("orphan_rows", "missing_rows", "unique_violations", "running"):
            if getattr(self, name):
                problems.append(f"{name} = {getattr(self, name)}")
        if self.over_attempts:
            problems.append(f"{self.over_attempts} tasks have attempts > max_attempts")
        assert not problems, "; ".join(problems) + f" ({self})"


def check_ledger(probe: Probe, kinds: Sequence[str] = ("ledger",)) -> LedgerCheck:
    """Read the end-of-run state of the tasks of ``kinds`` and their ledger rows."""
    kind_list = list(kinds)
    by_status = {
        status: count
        for status, count in probe.rows(
            "SELECT status, count(*) FROM pgotask_task WHERE kind = ANY(:kinds) GROUP BY status",
            kinds=kind_list,
        )
    }
    (
        tasks,
        running,
        over,
        rerun,
        max_seen,
    ) = probe.rows(
        "SELECT count(*), count(*) FILTER (WHERE status = 'running'), "
        "count(*) FILTER (WHERE attempts > max_attempts), "
        "count(*) FILTER (WHERE attempts > 1), coalesce(max(attempts), 0) "
        "FROM pgotask_task WHERE kind = ANY(:kinds)",
        kinds=kind_list,
    )[0]
    ledger_rows, ledger_tasks, orphans = probe.rows(
        "SELECT count(*), count(DISTINCT l.task_id), "
        "count(*) FILTER (WHERE t.status IS DISTINCT FROM 'succeeded') "
        "FROM fault_ledger l LEFT JOIN pgotask_task t ON t.id = l.task_id "
        "WHERE t.kind = ANY(:kinds) OR t.id IS NULL",
        kinds=kind_list,
    )[0]
    missing = probe.scalar(
        "SELECT count(*) FROM pgotask_task t WHERE t.kind = ANY(:kinds) "
        "AND t.status = 'succeeded' "
        "AND NOT EXISTS (SELECT 1 FROM fault_ledger l WHERE l.task_id = t.id)",
        kinds=kind_list,
    )
    errors = Counter(
        {
            kind: count
            for kind, count in probe.rows(
                "SELECT e.exception_type, count(*) FROM pgotask_task_error e "
                "JOIN pgotask_task t ON t.id = e.task_id WHERE t.kind = ANY(:kinds) "
                "GROUP BY e.exception_type",
                kinds=kind_list,
            )
        }
    )
    unique = probe.scalar(
        "SELECT count(*) FROM pgotask_task_error e JOIN pgotask_task t ON t.id = e.task_id "
        "WHERE t.kind = ANY(:kinds) AND (e.exception_type ILIKE '%IntegrityError%' "
        "OR e.message ILIKE '%fault_ledger_task_id_key%')",
        kinds=kind_list,
    )
    return LedgerCheck(
        tasks=tasks,
        by_status=dict(sorted(by_status.items())),
        ledger_rows=ledger_rows,
        ledger_tasks=ledger_tasks,
        orphan_rows=orphans,
        missing_rows=missing,
        unique_violations=unique,
        running=running,
        over_attempts=over,
        rerun=rerun,
        max_attempts_seen=max_seen,
        errors_by_type=dict(sorted(errors.items())),
    )


# -- reporting -----------------------------------------------------------------


@dataclass
class ScenarioResult:
    """The figures of one scenario run."""

    scenario: str
    tasks: int
    faults: int
    lost: int
    duplicated: int
    #: Seconds to recover from the worst fault (what is measured: ``recover_what``).
    recover_s: float | None
    total_s: float
    recover_what: str = ""
    #: Anything else worth reporting (latencies, throughput, attempts, ...).
    extra: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        """The one-line summary."""
        recover = "-" if self.recover_s is None else f"{self.recover_s:.2f}s"
        extra = " ".join(f"{k}={_fmt(v)}" for k, v in self.extra.items())
        return (
            f"[fault] {self.scenario}: tasks={self.tasks} faults={self.faults} "
            f"lost={self.lost} duplicated={self.duplicated} recover={recover} "
            f"total={self.total_s:.1f}s {extra}"
        ).rstrip()


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, list):
        return "[" + ",".join(_fmt(v) for v in value) + "]"
    return str(value)


def report(result: ScenarioResult) -> None:
    """Print the summary line; append it as JSON to ``$PGOTASK_FAULT_RESULTS`` if set."""
    print("\n" + result.line())
    path = os.environ.get(RESULTS_ENV)
    if path:
        record = asdict(result)
        record["recorded_at"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def summary(values: Sequence[float]) -> dict[str, float]:
    """Median and max of ``values`` (rounded, for reports)."""
    if not values:
        return {}
    return {"median": round(statistics.median(values), 3), "max": round(max(values), 3)}


def render_table(records: Sequence[dict[str, Any]]) -> str:
    """The Markdown table of ``docs/reliability.md``: the latest record of each scenario.

    Scenario names start with their number, so sorting by name orders them.
    """
    latest: dict[str, dict[str, Any]] = {}
    for record in records:
        latest[record["scenario"]] = record
    lines = [
        "| scenario | tasks | faults injected | lost | duplicated | time to recover | total |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in sorted(latest.items()):
        recover = "-" if r["recover_s"] is None else f"{r['recover_s']:.2f} s"
        if r.get("recover_what"):
            recover += f" ({r['recover_what']})"
        lines.append(
            f"| {name} | {r['tasks']} | {r['faults']} | {r['lost']} | {r['duplicated']} "
            f"| {recover} | {r['total_s']:.1f} s |"
        )
    return "\n".join(lines)


@contextlib.contextmanager
def stopwatch() -> Iterator[Callable[[], float]]:
    """``with stopwatch() as elapsed: ...``; ``elapsed()`` is seconds since the block began."""
    start = time.monotonic()
    yield lambda: time.monotonic() - start


def main(argv: Sequence[str]) -> int:
    """``python -m tests.helpers.faults RESULTS.jsonl``: print the Markdown table."""
    if len(argv) != 1:
        print("usage: python -m tests.helpers.faults RESULTS.jsonl", file=sys.stderr)
        return 2
    with open(argv[0], encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    print(render_table(records))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
