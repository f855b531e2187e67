"""Behind a real PgBouncer, in session and in transaction pool mode.

Enqueueing, wake-ups, retention, cancellation, limits and periodic tasks
end to end, with the application's engine pointed at PgBouncer.  In session
mode the worker listens through PgBouncer too; in transaction mode it
listens on a direct connection or a session-mode alias
(``Scheduler(listen=URL)``), or not at all.  The server's own view
(``pg_locks``, task rows) is read on a direct connection.  The tests that
start a pgbouncer are marked ``slow``; ``-s`` prints the figures quoted in
``docs/reliability.md``.

PgBouncer 1.18 (Debian 12) keeps no prepared statements across server
connections, so the transaction-mode engine turns psycopg's off.
"""

from __future__ import annotations

import datetime as dt
import logging
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine
from sqlalchemy.orm import Session, sessionmaker

from sqla_pgotask import (
    ConfigurationError,
    Retention,
    Scheduler,
    Task,
    TaskStatus,
    add_many,
    current_attempt,
)
from sqla_pgotask.worker.connections import behind_pooler, notifications_arrive
from sqla_pgotask.worker.pruning import RETENTION_LOCK, apply_retention
from tests.helpers import add_tasks, running, wait_until
from tests.helpers.pgbouncer import (
    POOL_MODES,
    PgBouncer,
    PoolMode,
    advisory_lock_holders,
    direct,
    pgbouncer_binary,
)

UNHEARD = "LISTEN hears no notifications through this connection"
# What PgBouncer logs when a server connection in its pool, linked to no
# client, receives a notification: a LISTEN left behind on it.
STRAY_NOTIFICATION = "got packet 'A' from server when not linked"


@pytest.fixture(params=POOL_MODES)
def pool_mode(request: pytest.FixtureRequest) -> PoolMode:
    mode: PoolMode = request.param
    return mode


@pytest.fixture
def bouncer(tmp_path: Path, database_url: str, pool_mode: PoolMode) -> Iterator[PgBouncer]:
    if pgbouncer_binary() is None:
        pytest.skip("pgbouncer is not installed (apt-get install pgbouncer; CI installs it)")
    with PgBouncer(tmp_path, database_url, pool_mode) as started:
        # A busy pool: each transaction may land on another server connection.
        started.warm(database_url, servers=4)
        yield started


@pytest.fixture
def app_engine(bouncer: PgBouncer, database_url: str, pool_mode: PoolMode) -> Iterator[Engine]:
    """The application's engine, through PgBouncer."""
    connect_args = {"prepare_threshold": None} if pool_mode == "transaction" else {}
    engine = create_engine(bouncer.url(database_url), connect_args=connect_args, pool_size=10)
    yield engine
    engine.dispose()


@pytest.fixture
def app(app_engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(app_engine)


@pytest.fixture
def listen(pool_mode: PoolMode, database_url: str) -> bool | str:
    """The worker's ``listen``: through PgBouncer in session mode, direct in transaction mode."""
    return True if pool_mode == "session" else database_url


def _add_finished(database_url: str, count: int, hours_ago: float = 48) -> None:
    with direct(database_url) as conn:
        conn.execute(
            "INSERT INTO pgotask_task (kind, status, attempts, finished_at) "
            "SELECT 'k', 'succeeded', 1, now() - make_interval(secs => %s * 3600) "
            "FROM generate_series(1, %s)",
            (hours_ago, count),
        )


def _task_count(database_url: str) -> int:
    with direct(database_url) as conn:
        row = conn.execute("SELECT count(*) FROM pgotask_task").fetchone()
    assert row is not None
    return int(row[0])


def _statuses(database_url: str, ids: list[int]) -> list[str]:
    with direct(database_url) as conn:
        rows = conn.execute(
            "SELECT status FROM pgotask_task WHERE id = ANY(%s) ORDER BY id", (ids,)
        ).fetchall()
    return [row[0] for row in rows]


# -- enqueue ---------------------------------------------------------------------


@pytest.mark.slow  # a pgbouncer process
def test_enqueue_commits_with_the_application_transaction(
    app: sessionmaker[Session], database_url: str
) -> None:
    with app() as session:
        session.add(Task(kind="k"))
        session.flush()
        session.rollback()
    assert _task_count(database_url) == 0
    # More than psycopg's prepare threshold (5) of the same statements.
    for n in range(8):
        with app.begin() as session:
            session.add(Task(kind="k", payload={"n": n}))
    with app.begin() as session:
        assert add_many(session, "k", [{"n": n} for n in range(8, 12)]) == 4
    with direct(database_url) as conn:
        payloads = conn.execute("SELECT payload FROM pgotask_task ORDER BY id").fetchall()
    assert [row[0] for row in payloads] == [{"n": n} for n in range(12)]


# -- wake-ups ----------------------------------------------------------------------


@pytest.mark.slow  # a pgbouncer process
def test_notifications_arrive_only_where_a_session_is_kept(
    bouncer: PgBouncer, database_url: str, app_engine: Engine, pool_mode: PoolMode
) -> None:
    with direct(database_url) as conn:
        assert not behind_pooler(conn)
        assert notifications_arrive(conn, app_engine)
    with bouncer.connect(database_url, autocommit=True) as conn:
        assert behind_pooler(conn)
        assert notifications_arrive(conn, app_engine, timeout=1) is (pool_mode == "session")


@pytest.mark.slow  # a pgbouncer process
@pytest.mark.parametrize(
    ("pool_mode", "route"),
    [("session", "PgBouncer"), ("transaction", "direct"), ("transaction", "a session-mode alias")],
)
def test_an_idle_worker_wakes_promptly_on_commit(
    app: sessionmaker[Session],
    bouncer: PgBouncer,
    database_url: str,
    pool_mode: PoolMode,
    route: str,
) -> None:
    routes: dict[str, bool | str] = {
        "PgBouncer": True,  # the application's engine, through PgBouncer
        "direct": database_url,
        "a session-mode alias": bouncer.url(database_url, session=True),
    }
    listen = routes[route]
    # poll_interval is 30 s: only a notification starts the tasks in time.
    scheduler = Scheduler(app, poll_interval=30, listen=listen)
    started: dict[int, float] = {}

    @scheduler.handler("ping")
    def ping(session: Session, task: Task) -> None:
        started[task.id] = time.monotonic()

    latencies: list[float] = []
    with running(scheduler):
        for _ in range(10):
            time.sleep(0.1)  # the worker is idle, waiting
            (task_id,) = add_tasks(app, Task(kind="ping"))
            committed = time.monotonic()
            wait_until(lambda: task_id in started, 5, "the task to start")  # noqa: B023
            latencies.append(max(0.0, started[task_id] - committed))
    median, worst = statistics.median(latencies) * 1000, max(latencies) * 1000
    print(
        f"wake-up, {pool_mode} mode, LISTEN through {route}: "
        f"median {median:.1f} ms, max {worst:.1f} ms"
    )
    # Far below the 30 s poll (a few ms; the bound allows for a stalled machine).
    assert max(latencies) < 3.0


@pytest.mark.slow  # a pgbouncer process
def test_limited_and_periodic_tasks_run(
    app: sessionmaker[Session], listen: bool | str, database_url: str
) -> None:
    # Their claims and enqueues use connections of their own: a locked claim
    # in one pipelined transaction, and the periodic thread's transactions.
    scheduler = Scheduler(app, poll_interval=0.2, listen=listen)
    ran: list[str] = []

    @scheduler.handler("limited", max_running=1, rate_limit=(100, 1))
    def limited(session: Session, task: Task) -> None:
        ran.append(task.kind)

    @scheduler.periodic(every=1)
    @scheduler.handler("tick")
    def tick(session: Session, task: Task) -> None:
        ran.append(task.kind)

    with running(scheduler):
        ids = add_tasks(app, *(Task(kind="limited") for _ in range(3)))
        wait_until(lambda: ran.count("limited") == 3 and "tick" in ran, 10, "the tasks to run")
    assert _statuses(database_url, ids) == ["succeeded"] * 3


# -- retention -------------------------------------------------------------------


@pytest.mark.slow  # a pgbouncer process
def test_a_retention_pass_leaves_no_lock_on_any_server_connection(
    bouncer: PgBouncer, database_url: str
) -> None:
    # Passes of one batch and of several: the statements outside a
    # transaction go to the four server connections in turn.
    for count, batch_size in [(5, 10), (3, 2), (4, 2)]:
        _add_finished(database_url, count)
        with bouncer.connect(database_url, autocommit=True) as worker:
            assert apply_retention(worker, Retention(batch_size=batch_size)) == count
        assert advisory_lock_holders(database_url, RETENTION_LOCK) == 0

    # Another worker's pass is not blocked, whichever server connection it gets.
    _add_finished(database_url, 2)
    with direct(database_url) as other:
        assert apply_retention(other, Retention()) == 2
    assert _task_count(database_url) == 0


@pytest.mark.slow  # a pgbouncer process
def test_workers_prune_finished_tasks_and_leave_no_lock(
    app: sessionmaker[Session], listen: bool | str, database_url: str
) -> None:
    retention = Retention(succeeded=dt.timedelta(hours=1), interval=0.2)

    def worker() -> Scheduler:
        scheduler = Scheduler(app, retention=retention, maintenance_interval=0.2, listen=listen)

        @scheduler.handler("k")
        def handle(session: Session, task: Task) -> None:
            pass

        return scheduler

    _add_finished(database_url, 3, hours_ago=2)
    _add_finished(database_url, 1, hours_ago=0.5)  # kept
    with running(worker()):
        wait_until(lambda: _task_count(database_url) == 1, 10, "retention to delete 3 tasks")
    assert advisory_lock_holders(database_url, RETENTION_LOCK) == 0
    # The next worker's retention is not blocked by anything the first left.
    _add_finished(database_url, 2, hours_ago=2)
    with running(worker()):
        wait_until(lambda: _task_count(database_url) == 1, 10, "retention to delete 2 more")
    assert advisory_lock_holders(database_url, RETENTION_LOCK) == 0


# -- cancellation ------------------------------------------------------------------


def _spinning(scheduler: Scheduler, started: set[int]) -> None:
    @scheduler.handler("spin", batch=False)
    def spin(session: Session, task: Task) -> None:
        started.add(task.id)
        while True:
            current_attempt().check()
            time.sleep(0.01)


@pytest.mark.slow  # a pgbouncer process
def test_a_running_task_cancelled_ends_cancelled(
    app: sessionmaker[Session], listen: bool | str, database_url: str, pool_mode: PoolMode
) -> None:
    scheduler = Scheduler(app, lease_seconds=3, listen=listen)  # heartbeats every 0.5 s
    started: set[int] = set()
    _spinning(scheduler, started)
    with running(scheduler):
        by_method = add_tasks(app, Task(kind="spin"))[0]
        by_sql = add_tasks(app, Task(kind="spin"))[0]
        wait_until(lambda: started == {by_method, by_sql}, 10, "both tasks to start")
        with app.begin() as session:
            assert scheduler.cancel(session, by_method) is TaskStatus.RUNNING
        with direct(database_url) as conn:
            conn.execute(
                "UPDATE pgotask_task SET cancel_requested_at = now() WHERE id = %s", (by_sql,)
            )
        requested = time.monotonic()
        wait_until(
            lambda: _statuses(database_url, [by_method, by_sql]) == ["cancelled"] * 2,
            10,
            "both tasks to end cancelled",
        )
        print(f"cancel, {pool_mode} mode: {(time.monotonic() - requested) * 1000:.0f} ms")


# -- a worker whose LISTEN would go through a transaction pool ---------------------


@pytest.mark.slow  # a pgbouncer process
@pytest.mark.parametrize("pool_mode", ["transaction"])
def test_listening_through_a_transaction_pool_warns_and_the_worker_polls(
    app: sessionmaker[Session],
    bouncer: PgBouncer,
    database_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    scheduler = Scheduler(app, poll_interval=0.2, lease_seconds=3)  # listen=True: via PgBouncer
    started: set[int] = set()
    _spinning(scheduler, started)

    @scheduler.handler("k")
    def handle(session: Session, task: Task) -> None:
        pass

    with (
        caplog.at_level(logging.WARNING, logger="sqla_pgotask"),
        running(scheduler, listening=False),
    ):
        wait_until(lambda: UNHEARD in caplog.text, 10, "the listener's warning")
        strays = bouncer.log.read_text().count(STRAY_NOTIFICATION)
        # Tasks still start (by polling), and cancellation still arrives (by heartbeats).
        ids = add_tasks(app, Task(kind="k"), Task(kind="k"), Task(kind="spin"))
        wait_until(lambda: ids[2] in started, 5, "the spinning task to start")
        with direct(database_url) as conn:
            conn.execute(
                "UPDATE pgotask_task SET cancel_requested_at = now() WHERE id = %s", (ids[2],)
            )
        wait_until(
            lambda: _statuses(database_url, ids) == ["succeeded", "succeeded", "cancelled"],
            10,
            "the tasks to finish",
        )
    assert caplog.text.count(UNHEARD) == 1
    # No server connection in the pool listens on the worker's channels: the
    # enqueues' notifications reached none of them.
    assert bouncer.log.read_text().count(STRAY_NOTIFICATION) == strays


@pytest.mark.slow  # a pgbouncer process
@pytest.mark.parametrize("pool_mode", ["transaction"])
def test_listen_false_polls_without_listening(
    app: sessionmaker[Session], database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    scheduler = Scheduler(app, poll_interval=0.2, lease_seconds=3, listen=False)
    started: set[int] = set()
    _spinning(scheduler, started)
    with (
        caplog.at_level(logging.WARNING, logger="sqla_pgotask"),
        running(scheduler, listening=False),
    ):
        time.sleep(0.3)  # idle
        (task_id,) = add_tasks(app, Task(kind="spin"))
        committed = time.monotonic()
        wait_until(lambda: task_id in started, 5, "the task to start by polling")
        start = time.monotonic() - committed
        with app.begin() as session:
            scheduler.cancel(session, task_id)
        requested = time.monotonic()
        wait_until(
            lambda: _statuses(database_url, [task_id]) == ["cancelled"],
            10,
            "the task to end cancelled (through heartbeats)",
        )
        cancel = time.monotonic() - requested
        print(
            f"listen=False: started after {start * 1000:.0f} ms, cancelled {cancel * 1000:.0f} ms"
        )
        worker = scheduler.running_worker
        assert worker is not None
        assert not worker.listener.wait_connected(0)
    assert UNHEARD not in caplog.text


def test_listen_takes_a_bool_a_url_or_an_engine(session_factory: sessionmaker[Session]) -> None:
    assert Scheduler(session_factory).settings.listen is True
    assert Scheduler(session_factory, listen=False).settings.listen is False
    assert Scheduler(session_factory, listen="postgresql+psycopg://h/db").settings.listen is True
    sqlite = create_engine("sqlite://")
    for bad, message in [
        ("not a url", r"listen: not a database URL"),
        ("postgresql+psycopg2://h/db", r"listen: .* psycopg 3 driver .*, not postgresql\+psycopg2"),
        ("sqlite://", r"listen: .* psycopg 3 driver .*, not sqlite\+pysqlite"),
        ("nosuchdb://h/db", r"listen: not a database URL"),
        (sqlite, r"listen: .* psycopg 3 driver .*, not sqlite\+pysqlite"),
        (5, r"listen must be True, False, a database URL or an Engine, not int"),
    ]:
        with pytest.raises(ConfigurationError, match=message):
            Scheduler(session_factory, listen=bad)  # type: ignore[arg-type]
