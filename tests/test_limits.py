"""Fleet-wide limits: max_running and rate limits per kind and per queue, enforced in SQL."""

from __future__ import annotations

import datetime as dt
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from contextlib import ExitStack
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import Engine, func, select, text, update
from sqlalchemy.orm import Session, sessionmaker

from sqla_pgotask import (
    ConfigurationError,
    QueueLimit,
    RateLimit,
    Scheduler,
    Task,
    TaskStatus,
)
from sqla_pgotask.config.limits import MAX_RATE_COUNT
from sqla_pgotask.engine import rows as claim_module
from sqla_pgotask.engine.claims import LimitedClaims, claim_limited
from sqla_pgotask.engine.limit_plan import plan_limits
from sqla_pgotask.models import LimitState
from tests.helpers import claim_within_limits, wait_until
from tests.helpers.apps.limited_app import RunLog, create_run_log, make_scheduler
from tests.helpers.processes import PROJECT_ROOT, WorkerProcess, pgotask_env, pgotask_worker

LIMITED_APP = "tests.helpers.apps.limited_app:scheduler"


def _noop(session: Session, task: Task) -> None:
    return None


def _held_by_another_worker(session_factory: sessionmaker[Session], task_id: int) -> None:
    """Mark ``task_id`` running under another worker's lease, an hour long."""
    with session_factory.begin() as session:
        session.execute(
            update(Task)
            .where(Task.id == task_id)
            .values(
                status=TaskStatus.RUNNING,
                locked_by="w",
                lease_expires_at=func.now() + dt.timedelta(hours=1),
            )
        )


def _enqueue(
    session_factory: sessionmaker[Session], kind: str, count: int, **values: object
) -> list[int]:
    with session_factory.begin() as session:
        tasks = [Task(kind=kind, **values) for _ in range(count)]
        session.add_all(tasks)
        session.flush()
        return [task.id for task in tasks]


def _counts(session_factory: sessionmaker[Session]) -> Counter[tuple[str, str]]:
    with session_factory() as session:
        return Counter(
            {
                (kind, str(status)): n
                for kind, status, n in session.execute(
                    select(Task.kind, Task.status, func.count()).group_by(Task.kind, Task.status)
                )
            }
        )


def _max_overlap(intervals: Iterable[tuple[dt.datetime, dt.datetime]]) -> int:
    """The most intervals open at one instant (one ending as another starts do not overlap)."""
    events = sorted(
        [(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals],
        key=lambda e: (e[0], e[1]),
    )
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    return peak


def _max_in_window(starts: list[dt.datetime], period: float) -> int:
    """The most starts within any half-open window of ``period`` seconds."""
    starts = sorted(starts)
    peak = 0
    first = 0
    for last, at in enumerate(starts):
        while (at - starts[first]).total_seconds() >= period:
            first += 1
        peak = max(peak, last - first + 1)
    return peak


# -- declaring limits ------------------------------------------------------------


def test_limits_are_declared_on_handlers_and_queues(
    session_factory: sessionmaker[Session],
) -> None:
    scheduler = Scheduler(session_factory)
    a = scheduler.handler("a", max_running=2, rate_limit=(10, 60))(_noop)
    b = scheduler.handler("b", rate_limit=RateLimit(5, 0.5))(_noop)
    c = scheduler.handler("c")(_noop)
    assert (a.max_running, a.rate_limit) == (2, RateLimit(10, 60.0))
    assert (b.max_running, b.rate_limit) == (None, RateLimit(5, 0.5))
    assert (c.max_running, c.rate_limit) == (None, None)
    emails = scheduler.limit_queue("emails", max_running=5, rate_limit=(100, 1))
    assert emails == QueueLimit(max_running=5, rate_limit=RateLimit(100, 1.0))
    assert dict(scheduler.queue_limits) == {"emails": emails}
    assert scheduler.limit_queue("bulk", rate_limit=RateLimit(1, 2)).max_running is None


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"max_running": 0}, "handler 'k': max_running must be an integer >= 1 (or None), not 0"),
        ({"max_running": True}, "max_running must be an integer >= 1"),
        ({"max_running": 1.5}, "max_running must be an integer >= 1"),
        ({"rate_limit": (0, 1)}, "handler 'k': a rate limit's count must be an integer >= 1"),
        ({"rate_limit": (1.5, 1)}, "a rate limit's count must be an integer >= 1, not 1.5"),
        ({"rate_limit": (1, 0)}, "a rate limit's period must be a number of seconds > 0"),
        ({"rate_limit": (1, -2)}, "a rate limit's period must be a number of seconds > 0"),
        ({"rate_limit": (1, float("inf"))}, "period must be a number of seconds > 0"),
        ({"rate_limit": (1, "1s")}, "period must be a number of seconds > 0, not '1s'"),
        ({"rate_limit": "3/s"}, "rate_limit must be RateLimit(count, per) or a (count, "),
        ({"rate_limit": (1, 2, 3)}, "rate_limit must be RateLimit(count, per)"),
        ({"rate_limit": 3}, "rate_limit must be RateLimit(count, per)"),
        ({"rate_limit": (MAX_RATE_COUNT + 1, 3600)}, "count must be at most 10,000"),
    ],
)
def test_invalid_handler_limits_are_rejected(
    session_factory: sessionmaker[Session], options: dict[str, object], message: str
) -> None:
    scheduler = Scheduler(session_factory)
    with pytest.raises(ConfigurationError) as caught:
        scheduler.handler("k", **options)(_noop)  # type: ignore[arg-type]
    assert message in str(caught.value)
    assert "k" not in scheduler.handlers


def test_invalid_queue_limits_are_rejected(session_factory: sessionmaker[Session]) -> None:
    scheduler = Scheduler(session_factory)
    with pytest.raises(ConfigurationError, match="queue must be a non-empty string"):
        scheduler.limit_queue("", max_running=1)
    with pytest.raises(ConfigurationError, match="queue 'q': a queue limit needs max_running"):
        scheduler.limit_queue("q")
    with pytest.raises(ConfigurationError, match="queue 'q': max_running must be an integer"):
        scheduler.limit_queue("q", max_running=-1)
    with pytest.raises(ConfigurationError, match="queue 'q': a rate limit's period"):
        scheduler.limit_queue("q", rate_limit=(1, 0))
    assert not scheduler.queue_limits
    scheduler.limit_queue("q", max_running=1)
    with pytest.raises(ConfigurationError, match="queue 'q' already has a limit"):
        scheduler.limit_queue("q", max_running=2)
    with pytest.raises(ConfigurationError, match="a rate limit's count"):
        RateLimit(0, 1)
    with pytest.raises(ConfigurationError, match="a queue limit needs"):
        QueueLimit()


def test_plan_splits_limited_from_unlimited(session_factory: sessionmaker[Session]) -> None:
    scheduler = Scheduler(session_factory)
    scheduler.handler("a", max_running=1)(_noop)
    scheduler.handler("b")(_noop)
    assert plan_limits(scheduler.handlers, {}, None) is not None
    scheduler_without = Scheduler(session_factory)
    scheduler_without.handler("b")(_noop)
    assert plan_limits(scheduler_without.handlers, {}, None) is None  # the usual claim, as is
    scheduler.limit_queue("q", max_running=1)
    plan = plan_limits(scheduler.handlers, scheduler.queue_limits, None)
    assert plan is not None
    assert plan.keys == ["kind:a", "queue:q"]
    assert dict(plan.fast_kinds) == {"b": 5}
    assert (plan.fast_queues, plan.excluded_queues) == (None, ("q",))
    served = plan_limits(scheduler.handlers, scheduler.queue_limits, ["q", "r"])
    assert served is not None
    assert (served.fast_queues, served.excluded_queues) == (("r",), ())
    # A limited queue the worker does not serve is not its business.
    other = plan_limits(scheduler.handlers, scheduler.queue_limits, ["r"])
    assert other is not None
    assert other.keys == ["kind:a"]


# -- claims ---------------------------------------------------------------------


def _claim_in_threads(
    session_factory: sessionmaker[Session],
    scheduler: Scheduler,
    *,
    threads: int,
    check: Callable[[Session], None],
    deadline: float = 60.0,
) -> Counter[int]:
    """Threads claim (through limits) and complete tasks until none is left.

    After each claim commits, ``check`` runs on a new snapshot.  Returns how
    often each task was claimed.
    """
    plan = plan_limits(scheduler.handlers, scheduler.queue_limits, None)
    assert plan is not None
    claimed: Counter[int] = Counter()
    errors: list[BaseException] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + deadline

    def left() -> int:
        with session_factory() as session:
            return (
                session.scalar(
                    select(func.count())
                    .select_from(Task)
                    .where(Task.status != TaskStatus.SUCCEEDED)
                )
                or 0
            )

    def work(n: int) -> None:
        rng = random.Random(n)
        try:
            while time.monotonic() < stop_at:
                tasks = claim_within_limits(
                    session_factory, plan, worker_id=f"t{n}", limit=3, lease_seconds=30
                )
                with session_factory() as session:
                    check(session)
                if not tasks:
                    if not left():
                        return
                    time.sleep(rng.uniform(0.001, 0.01))
                    continue
                with lock:
                    claimed.update(task.id for task in tasks)
                time.sleep(rng.uniform(0.0, 0.02))
                with session_factory.begin() as session:
                    session.execute(
                        update(Task)
                        .where(Task.id.in_([task.id for task in tasks]))
                        .values(status=TaskStatus.SUCCEEDED, finished_at=func.clock_timestamp())
                    )
        except BaseException as exc:
            errors.append(exc)

    workers = [threading.Thread(target=work, args=(n,)) for n in range(threads)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()
    if errors:
        raise errors[0]
    return claimed


def _running(session: Session, *conditions: object) -> int:
    return (
        session.scalar(
            select(func.count())
            .select_from(Task)
            .where(Task.status == TaskStatus.RUNNING, *conditions)  # type: ignore[arg-type]
        )
        or 0
    )


def test_concurrent_claims_never_exceed_max_running(
    session_factory: sessionmaker[Session],
) -> None:
    scheduler = Scheduler(session_factory)
    scheduler.handler("k", max_running=3)(_noop)
    scheduler.handler("free")(_noop)
    ids = _enqueue(session_factory, "k", 60)
    free = _enqueue(session_factory, "free", 30)
    peak = 0

    def check(session: Session) -> None:
        nonlocal peak
        running = _running(session, Task.kind == "k")
        peak = max(peak, running)
        assert running <= 3

    claimed = _claim_in_threads(session_factory, scheduler, threads=8, check=check)
    assert claimed == Counter(ids + free)  # every task once
    assert peak == 3  # the limit was reached, not merely respected
    with session_factory() as session:
        state = session.get(LimitState, "kind:k")
        assert state is not None and state.recent_starts == []  # no rate limit, no log


def test_simultaneous_claims_take_turns(session_factory: sessionmaker[Session]) -> None:
    """Eight connections claim at the same instant, round after round: 2 tasks in all each time.

    Each serves a queue of its own, so they compete for the kind's limit, not
    for the same task rows (which SKIP LOCKED alone would share out).
    """
    scheduler = Scheduler(session_factory)
    scheduler.handler("k", max_running=2)(_noop)
    threads, rounds = 8, 15
    plans = [plan_limits(scheduler.handlers, {}, [f"q{n}"]) for n in range(threads)]
    for n in range(threads):
        _enqueue(session_factory, "k", 2 * rounds, queue=f"q{n}")
    barrier = threading.Barrier(threads)
    claimed: list[list[int]] = [[] for _ in range(rounds)]
    lock = threading.Lock()
    errors: list[BaseException] = []

    def work(n: int) -> None:
        plan = plans[n]
        assert plan is not None
        try:
            for r in range(rounds):
                barrier.wait(30)  # all claim at once
                tasks = claim_within_limits(
                    session_factory, plan, worker_id=f"t{n}", limit=2, lease_seconds=30
                )
                with lock:
                    claimed[r] += [task.id for task in tasks]
                if barrier.wait(30) == 0:  # one thread ends the round's tasks
                    with session_factory.begin() as session:
                        session.execute(
                            update(Task)
                            .where(Task.status == TaskStatus.RUNNING)
                            .values(status=TaskStatus.SUCCEEDED)
                        )
                barrier.wait(30)
        except BaseException as exc:
            errors.append(exc)
            barrier.abort()

    workers = [threading.Thread(target=work, args=(n,)) for n in range(threads)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()
    if errors:
        raise errors[0]
    assert [len(ids) for ids in claimed] == [2] * rounds


def test_queue_and_kind_limits_hold_together(session_factory: sessionmaker[Session]) -> None:
    """``single`` (max 1) runs in queue ``narrow`` (max 2, shared with ``plain``) and elsewhere."""
    scheduler = Scheduler(session_factory)
    scheduler.handler("single", max_running=1)(_noop)
    scheduler.handler("plain")(_noop)
    scheduler.limit_queue("narrow", max_running=2)
    ids = (
        _enqueue(session_factory, "single", 15, queue="narrow")
        + _enqueue(session_factory, "single", 15)
        + _enqueue(session_factory, "plain", 20, queue="narrow")
        + _enqueue(session_factory, "plain", 20)
    )
    peaks = Counter[str]()

    def check(session: Session) -> None:
        single = _running(session, Task.kind == "single")
        narrow = _running(session, Task.queue == "narrow")
        assert single <= 1
        assert narrow <= 2
        peaks["single"] = max(peaks["single"], single)
        peaks["narrow"] = max(peaks["narrow"], narrow)

    claimed = _claim_in_threads(session_factory, scheduler, threads=6, check=check)
    assert claimed == Counter(ids)
    assert peaks == {"single": 1, "narrow": 2}


def test_limited_claim_loads_tasks_like_the_orm(session_factory: sessionmaker[Session]) -> None:
    scheduler = Scheduler(session_factory)
    scheduler.handler("k", max_running=5, max_attempts=7)(_noop)
    plan = plan_limits(scheduler.handlers, {}, None)
    assert plan is not None
    _enqueue(session_factory, "k", 1, payload={"x": [1, "two"]}, priority=3, dedup_key="d")
    (task,) = claim_within_limits(session_factory, plan, worker_id="w", limit=5, lease_seconds=30)
    with session_factory() as session:
        loaded = session.get_one(Task, task.id)
        for column in Task.__table__.columns:
            assert getattr(task, column.key) == getattr(loaded, column.key), column.key
    assert task.status is TaskStatus.RUNNING
    assert (task.attempts, task.max_attempts, task.locked_by) == (1, 7, "w")
    # Detached and clean: the handler's Session takes it as it is.
    with session_factory() as session:
        session.add(task)
        assert not session.dirty
        assert task.errors == []


def test_a_limited_claim_is_one_round_trip(engine: Engine, tmp_path: Path) -> None:
    """BEGIN, the lock, the claim and COMMIT go out together; the answers come back together."""
    if not psycopg.Pipeline.is_supported():
        pytest.skip("libpq without pipeline mode")
    scheduler = Scheduler(sessionmaker(engine))
    scheduler.handler("k", max_running=2, rate_limit=(5, 10))(_noop)
    plan = plan_limits(scheduler.handlers, {}, None)
    assert plan is not None
    _enqueue(sessionmaker(engine), "k", 3)
    raw = engine.raw_connection()
    try:
        conn = raw.driver_connection
        assert isinstance(conn, psycopg.Connection)
        conn.autocommit = True
        trace = tmp_path / "trace.txt"
        with trace.open("w") as out:
            conn.pgconn.trace(out.fileno())
            conn.pgconn.set_trace_flags(psycopg.pq.Trace.SUPPRESS_TIMESTAMPS)
            tasks = claim_limited(
                conn, engine.dialect, plan, worker_id="w", limit=5, lease_seconds=30
            )
            conn.pgconn.untrace()
    finally:
        raw.close()
    assert len(tasks) == 2
    directions = [line[0] for line in trace.read_text().splitlines() if line[:2] in ("F\t", "B\t")]
    turns = [d for n, d in enumerate(directions) if n == 0 or d != directions[n - 1]]
    assert turns == ["F", "B"]  # everything sent, then everything received: one round trip


_FRESH_PROCESS = """
import os
from sqlalchemy import create_engine, text
from sqlalchemy.orm import sessionmaker
from sqla_pgotask import Scheduler
from sqla_pgotask.engine.claims import LimitedClaims, SessionConnection
from sqla_pgotask.engine.limit_plan import plan_limits

engine = create_engine(os.environ["PGOTASK_DATABASE_URL"])
with engine.begin() as conn:  # no ORM use before the claim
    conn.execute(text("INSERT INTO pgotask_task (kind) VALUES ('k')"))
scheduler = Scheduler(sessionmaker(engine))
scheduler.handler("k", max_running=1)(lambda session, task: None)
plan = plan_limits(scheduler.handlers, {}, None)
conns = SessionConnection(sessionmaker(engine))
source = LimitedClaims(conns, plan, worker_id="w", lease_seconds=30)
tasks = source.claim(5)
print([(task.kind, task.status.value, task.attempts) for task in tasks])
"""


def test_the_first_claim_of_a_new_process_loads_its_tasks(database_url: str) -> None:
    """No ORM use before it: the claim configures the mappers itself."""
    done = subprocess.run(
        [sys.executable, "-c", _FRESH_PROCESS],
        cwd=PROJECT_ROOT,
        env=pgotask_env(database_url),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[('k', 'running', 1)]"


def test_claimed_tasks_go_back_if_they_cannot_be_loaded(
    session_factory: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    scheduler = Scheduler(session_factory)
    scheduler.handler("k", max_running=5)(_noop)
    plan = plan_limits(scheduler.handlers, {}, None)
    assert plan is not None
    _enqueue(session_factory, "k", 3)

    def broken(*args: object) -> None:
        raise RuntimeError("cannot load")

    monkeypatch.setattr(claim_module, "_tasks", broken)
    with pytest.raises(RuntimeError, match="cannot load"):
        claim_within_limits(session_factory, plan, worker_id="w", limit=5, lease_seconds=30)
    with session_factory() as session:
        rows = session.execute(select(Task.status, Task.attempts, Task.locked_by)).all()
    assert rows == [(TaskStatus.PENDING, 0, None)] * 3


# -- run_until_idle ---------------------------------------------------------------


def test_run_until_idle_respects_max_running(session_factory: sessionmaker[Session]) -> None:
    scheduler = Scheduler(session_factory)
    scheduler.handler("k", max_running=1)(_noop)
    scheduler.handler("free")(_noop)
    busy, *_ = _enqueue(session_factory, "k", 3)
    _enqueue(session_factory, "free", 2)
    _held_by_another_worker(session_factory, busy)  # another worker is running one
    assert scheduler.run_until_idle(batch_size=10) == 2  # the unlimited ones only
    with session_factory.begin() as session:
        session.execute(update(Task).where(Task.id == busy).values(status=TaskStatus.SUCCEEDED))
    assert scheduler.run_until_idle() == 2
    assert _counts(session_factory)[("k", "succeeded")] == 3


def test_run_until_idle_respects_rate_limits(session_factory: sessionmaker[Session]) -> None:
    scheduler = Scheduler(session_factory)
    scheduler.handler("k", rate_limit=(2, 60))(_noop)
    _enqueue(session_factory, "k", 5)
    assert scheduler.run_until_idle() == 2  # never waits for the window
    assert scheduler.run_until_idle(batch_size=5) == 0
    with session_factory() as session:
        state = session.get_one(LimitState, "kind:k")
        assert len(state.recent_starts) == 2
        started = [s for s in session.scalars(select(Task.started_at)) if s is not None]
        assert sorted(state.recent_starts) == sorted(started)
    with session_factory.begin() as session:  # a minute later
        session.execute(
            text(
                "UPDATE pgotask_limit SET recent_starts = ARRAY(SELECT s - interval '61 s' "
                "FROM unnest(recent_starts) AS s)"
            )
        )
    assert scheduler.run_until_idle(batch_size=5) == 2
    assert scheduler.run_until_idle() == 0
    with session_factory() as session:
        assert len(session.get_one(LimitState, "kind:k").recent_starts) == 2  # trimmed


def test_run_until_idle_respects_queue_limits(session_factory: sessionmaker[Session]) -> None:
    """A queue limit binds every kind in the queue; the usual claim leaves its tasks alone."""
    scheduler = Scheduler(session_factory)
    seen: list[int] = []

    @scheduler.handler("plain")
    def plain(session: Session, task: Task) -> None:
        seen.append(_running(session, Task.queue == "narrow"))

    scheduler.limit_queue("narrow", max_running=2)
    _enqueue(session_factory, "plain", 7, queue="narrow")
    _enqueue(session_factory, "plain", 5)
    assert scheduler.run_until_idle(batch_size=10) == 12
    assert len(seen) == 12 and max(seen) == 2
    # Serving only the limited queue:
    _enqueue(session_factory, "plain", 3, queue="narrow")
    seen.clear()
    assert scheduler.run_until_idle(queues=["narrow"], batch_size=10) == 3
    assert max(seen) == 2


# -- workers ------------------------------------------------------------------------


def _run_worker(scheduler: Scheduler, seconds: float) -> threading.Thread:
    thread = threading.Thread(target=scheduler.run, daemon=True)
    thread.start()
    threading.Timer(seconds, scheduler.stop).start()
    return thread


def _run_log(session_factory: sessionmaker[Session]) -> list[RunLog]:
    with session_factory() as session:
        rows = list(session.scalars(select(RunLog).order_by(RunLog.started)))
        session.expunge_all()
        return rows


def test_worker_threads_respect_max_running(
    engine: Engine, session_factory: sessionmaker[Session]
) -> None:
    create_run_log(engine)
    scheduler = make_scheduler(session_factory, concurrency=4, poll_interval=0.2)
    ids = _enqueue(session_factory, "limited", 8, payload={"seconds": 0.1})
    thread = threading.Thread(target=scheduler.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: len(_run_log(session_factory)) == 8, 30, message="8 tasks run")
    finally:
        scheduler.stop()
        thread.join(30)
    rows = _run_log(session_factory)
    assert sorted(row.task_id for row in rows) == sorted(ids)
    assert _max_overlap([(row.started, row.ended) for row in rows]) <= 2


def test_worker_waits_for_the_rate_window_without_spinning(
    engine: Engine, session_factory: sessionmaker[Session]
) -> None:
    """Rate-limited: the worker claims again when the window frees a start, not in a loop.

    The poll interval is long, so starting the second pair on time takes the
    wake-up at the window's end.
    """
    create_run_log(engine)
    scheduler = Scheduler(session_factory, concurrency=2, poll_interval=5.0)
    scheduler.handler("k", rate_limit=(2, 1.0))(_noop)
    _enqueue(session_factory, "k", 4)
    thread = threading.Thread(target=scheduler.run, daemon=True)
    thread.start()
    try:
        wait_until(
            lambda: _counts(session_factory)[("k", "succeeded")] == 4,
            15,
            message="4 tasks run",
        )
        worker = scheduler.running_worker
        assert worker is not None and isinstance(worker.source, LimitedClaims)
        claims = worker.source.limited_claims
    finally:
        scheduler.stop()
        thread.join(30)
    with session_factory() as session:
        starts = sorted(s for s in session.scalars(select(Task.started_at)) if s is not None)
    assert len(starts) == 4
    assert _max_in_window(starts, 1.0) <= 2
    gap = (starts[2] - starts[0]).total_seconds()
    assert 1.0 <= gap < 3.0  # on time (the poll interval is 5 s): the window's wake-up
    assert claims <= 8  # a few claims, not a spin


def test_delayed_limited_task_starts_on_time(session_factory: sessionmaker[Session]) -> None:
    """After an empty limited claim, a delayed task's run_at wakes the locked claim too."""
    scheduler = Scheduler(session_factory, concurrency=2, poll_interval=5.0)
    scheduler.handler("k", max_running=1)(_noop)
    thread = threading.Thread(target=scheduler.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: scheduler.running_worker is not None, 10, message="a worker")
        time.sleep(0.3)  # its first claim found nothing: the locked claim waits
        with session_factory.begin() as session:
            task = Task(kind="k", run_at=func.now() + dt.timedelta(seconds=1))
            session.add(task)
            session.flush()
            task_id = task.id
        wait_until(
            lambda: _counts(session_factory)[("k", "succeeded")] == 1, 10, message="the task"
        )
    finally:
        scheduler.stop()
        thread.join(30)
    with session_factory() as session:
        row = session.get_one(Task, task_id)
        assert row.started_at is not None
        late = (row.started_at - row.run_at).total_seconds()
    assert 0 <= late < 2.0  # not the 5 s poll


def test_worker_at_its_limit_does_not_spin(
    engine: Engine, session_factory: sessionmaker[Session]
) -> None:
    scheduler = Scheduler(session_factory, concurrency=2, poll_interval=0.25)
    scheduler.handler("k", max_running=1)(_noop)
    busy, *_ = _enqueue(session_factory, "k", 3)
    _held_by_another_worker(session_factory, busy)
    thread = threading.Thread(target=scheduler.run, daemon=True)
    thread.start()
    try:
        time.sleep(1.5)
        worker = scheduler.running_worker
        assert worker is not None and isinstance(worker.source, LimitedClaims)
        claims = worker.source.limited_claims
        assert _counts(session_factory)[("k", "pending")] == 2
        # The slot frees: the next poll takes the next task.
        with session_factory.begin() as session:
            session.execute(update(Task).where(Task.id == busy).values(status=TaskStatus.SUCCEEDED))
        wait_until(lambda: _counts(session_factory)[("k", "succeeded")] == 3, 15, message="all run")
    finally:
        scheduler.stop()
        thread.join(30)
    assert 2 <= claims <= 12  # about one per poll interval


# -- worker processes ------------------------------------------------------------------


def _stop(workers: list[WorkerProcess]) -> None:
    for worker in workers:
        worker.send(signal.SIGTERM)
    for worker in workers:
        assert worker.wait(30) == 0


def _start_workers(
    stack: ExitStack, database_url: str, tmp_path: Path, count: int, *args: str
) -> list[WorkerProcess]:
    workers = [
        stack.enter_context(
            pgotask_worker(
                database_url,
                tmp_path,
                "--concurrency",
                "3",
                *args,
                scheduler=LIMITED_APP,
                name=f"worker{n}",
            )
        )
        for n in range(count)
    ]
    for worker in workers:
        worker.wait_started()
    return workers


@pytest.mark.slow
def test_four_worker_processes_never_run_more_than_max_running(
    database_url: str,
    engine: Engine,
    session_factory: sessionmaker[Session],
    tmp_path: Path,
) -> None:
    """``limited`` has max_running=2: 4 processes of 3 handler threads run at most 2 at once."""
    create_run_log(engine)
    with ExitStack() as stack:
        workers = _start_workers(stack, database_url, tmp_path, 4)
        # In ten commits: each one's notification sends every worker to the
        # locked claim at once.
        ids = []
        for _ in range(10):
            ids += _enqueue(session_factory, "limited", 2, payload={"seconds": 0.2})
            time.sleep(0.05)
        wait_until(
            lambda: len(_run_log(session_factory)) == 20,
            120,
            interval=0.2,
            message="every limited task to run",
        )
        _stop(workers)
    rows = _run_log(session_factory)
    assert sorted(row.task_id for row in rows) == sorted(ids)  # each once (task_id is unique)
    overlap = _max_overlap([(row.started, row.ended) for row in rows])
    print(f"max overlap {overlap}; by worker: {Counter(row.worker_pid for row in rows)}")
    assert overlap <= 2
    assert _counts(session_factory) == {("limited", "succeeded"): 20}
    with session_factory() as session:
        attempts = set(session.scalars(select(Task.attempts)))
    assert attempts == {1}


@pytest.mark.slow
def test_rate_limit_holds_across_worker_processes(
    database_url: str,
    engine: Engine,
    session_factory: sessionmaker[Session],
    tmp_path: Path,
) -> None:
    """``rated``: 3 starts per second, 3 processes: no 1 s window holds more than 3 starts."""
    create_run_log(engine)
    with ExitStack() as stack:
        workers = _start_workers(stack, database_url, tmp_path, 3)
        ids = _enqueue(session_factory, "rated", 10)
        wait_until(
            lambda: len(_run_log(session_factory)) == 10,
            120,
            interval=0.2,
            message="every rated task to run",
        )
        _stop(workers)
    rows = _run_log(session_factory)
    assert sorted(row.task_id for row in rows) == sorted(ids)
    with session_factory() as session:
        starts = [s for s in session.scalars(select(Task.started_at)) if s is not None]
    assert len(starts) == 10
    assert _max_in_window(starts, 1.0) <= 3
    # 10 starts at 3 per second take at least 3 s, and the limit was used.
    assert (max(starts) - min(starts)).total_seconds() >= 3.0
    assert _max_in_window(starts, 1.0) == 3


@pytest.mark.slow
def test_queue_limit_holds_across_worker_processes(
    database_url: str,
    engine: Engine,
    session_factory: sessionmaker[Session],
    tmp_path: Path,
) -> None:
    """Queue ``narrow`` (max 2) with ``single`` (max 1) and ``plain`` tasks, 3 processes."""
    create_run_log(engine)
    with ExitStack() as stack:
        workers = _start_workers(stack, database_url, tmp_path, 3)
        ids = (
            _enqueue(session_factory, "plain", 10, queue="narrow", payload={"seconds": 0.1})
            + _enqueue(session_factory, "single", 6, queue="narrow", payload={"seconds": 0.1})
            + _enqueue(session_factory, "plain", 10, payload={"seconds": 0.1})
        )
        wait_until(
            lambda: len(_run_log(session_factory)) == len(ids),
            120,
            interval=0.2,
            message="every task to run",
        )
        _stop(workers)
    rows = _run_log(session_factory)
    assert sorted(row.task_id for row in rows) == sorted(ids)
    narrow = [(r.started, r.ended) for r in rows if r.queue == "narrow"]
    single = [(r.started, r.ended) for r in rows if r.kind == "single"]
    unlimited = [(r.started, r.ended) for r in rows if r.queue != "narrow"]
    assert _max_overlap(narrow) <= 2
    assert _max_overlap(single) <= 1
    print(f"overlap of the unlimited tasks: {_max_overlap(unlimited)}")
