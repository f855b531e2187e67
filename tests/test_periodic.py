"""Periodic tasks: registration, slots, the enqueue step, and worker processes."""

from __future__ import annotations

import datetime as dt
import itertools
import signal
import threading
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, func, select, text, update
from sqlalchemy.orm import Session, sessionmaker

from sqla_pgotask import ConfigurationError, Schedule, Scheduler, Task, TaskStatus
from sqla_pgotask._queries import query
from sqla_pgotask.config.schedule import make_schedule, runnable_schedules
from sqla_pgotask.models import ScheduleState
from sqla_pgotask.worker.periodic import enqueue_due
from tests.helpers import wait_until
from tests.helpers.apps import periodic_app
from tests.helpers.apps.periodic_app import PeriodicRun, create_tables
from tests.helpers.processes import WorkerProcess, pgotask_worker

UTC = dt.timezone.utc
T0 = dt.datetime(2030, 1, 1, 12, 0, 30, tzinfo=UTC)  # half a minute past a minute slot
SECOND = dt.timedelta(seconds=1)
MINUTE = dt.timedelta(minutes=1)


def utc(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0
) -> dt.datetime:
    return dt.datetime(year, month, day, hour, minute, second, tzinfo=UTC)


def noop(session: Session, task: Task) -> object:
    return None


@pytest.fixture
def offline() -> Scheduler:
    """A Scheduler whose engine is never connected to."""
    return Scheduler(sessionmaker(create_engine("postgresql+psycopg:///pgotask_never_used")))


# -- registration ------------------------------------------------------------


@pytest.mark.parametrize(
    ("expression", "reason"),
    [
        ("61 * * * *", "out of range"),
        ("* * *", "3 fields"),
        ("0 0 1 1 * 2030 *", "7 fields"),
        ("0 0 31 2 *", "never fires"),
        ("*/0 * * * *", "step"),
        ("R * * * *", "random"),
        ("H/5 * * * *", "hashed"),
        ("0 0 * * FOO", "not acceptable"),
    ],
)
def test_bad_cron_expression_fails_at_registration(
    offline: Scheduler, expression: str, reason: str
) -> None:
    with pytest.raises(ConfigurationError) as info:
        offline.periodic(expression, kind="report")
    message = str(info.value)
    assert f"bad cron expression {expression!r}" in message
    assert reason in message
    assert offline.schedules == {}


def test_bad_cron_expression_fails_in_decorator_form_before_decorating(
    offline: Scheduler,
) -> None:
    with pytest.raises(ConfigurationError, match="bad cron expression '99 \\* \\* \\* \\*'"):
        offline.periodic("99 * * * *")


def test_unknown_time_zone(offline: Scheduler) -> None:
    with pytest.raises(ConfigurationError, match="unknown time zone 'Mars/Olympus_Mons'"):
        offline.periodic("0 3 * * *", kind="report", timezone="Mars/Olympus_Mons")
    with pytest.raises(ConfigurationError, match="timezone must be an IANA zone name"):
        offline.periodic("0 3 * * *", kind="report", timezone=5)  # type: ignore[call-overload]


def test_expression_or_every_but_not_both(offline: Scheduler) -> None:
    with pytest.raises(ConfigurationError, match="not both"):
        offline.periodic("* * * * *", every=60, kind="report")
    with pytest.raises(ConfigurationError, match="not neither"):
        offline.periodic(kind="report")


@pytest.mark.parametrize(
    "every", [0, -5, 1.5, True, "5", dt.timedelta(milliseconds=500), float("nan")]
)
def test_every_must_be_whole_seconds(offline: Scheduler, every: Any) -> None:
    with pytest.raises(ConfigurationError, match="every must be"):
        offline.periodic(every=every, kind="report")


def test_every_takes_no_time_zone(offline: Scheduler) -> None:
    with pytest.raises(ConfigurationError, match="timezone applies to cron expressions only"):
        offline.periodic(every=60, kind="report", timezone="Europe/Paris")


def test_missed_policy_arguments(offline: Scheduler) -> None:
    with pytest.raises(
        ConfigurationError, match="missed must be one of 'skip', 'once', 'backfill'"
    ):
        offline.periodic(every=60, kind="report", missed="all")  # type: ignore[call-overload]
    with pytest.raises(ConfigurationError, match="missed='backfill' needs backfill=N"):
        offline.periodic(every=60, kind="report", missed="backfill")
    with pytest.raises(ConfigurationError, match="missed='backfill' needs backfill=N"):
        offline.periodic(every=60, kind="report", missed="backfill", backfill=0)
    with pytest.raises(ConfigurationError, match="applies only with missed='backfill'"):
        offline.periodic(every=60, kind="report", backfill=3)
    with pytest.raises(ConfigurationError, match="grace must be >= 0"):
        offline.periodic(every=60, kind="report", missed="skip", grace=-1)


def test_duplicate_schedule_names(offline: Scheduler) -> None:
    @offline.periodic(every=60)
    @offline.handler("report")
    def report(session: Session, task: Task) -> object:
        return None

    with pytest.raises(ConfigurationError, match="schedule named 'report' is already registered"):
        offline.periodic("0 3 * * *", kind="report")
    # Another name: a second schedule of the same kind.
    nightly = offline.periodic("0 3 * * *", kind="report", name="nightly_report")
    assert isinstance(nightly, Schedule)
    assert set(offline.schedules) == {"report", "nightly_report"}
    assert offline.schedules["report"].expression == "@every 60s"
    assert offline.schedules["nightly_report"].kind == "report"


def test_decorator_needs_a_registered_handler(offline: Scheduler) -> None:
    decorate = offline.periodic(every=60)
    with pytest.raises(ConfigurationError, match=r"put it above\s+@scheduler.handler"):
        decorate(noop)  # type: ignore[arg-type]


def test_payload_must_be_json(offline: Scheduler) -> None:
    with pytest.raises(ConfigurationError, match="payload is not JSON-serialisable"):
        offline.periodic(every=60, kind="report", payload={"when": dt.date(2030, 1, 1)})


def test_schedule_without_handler_is_refused_when_enqueueing(offline: Scheduler) -> None:
    offline.handler("other")(noop)
    offline.periodic(every=60, kind="report")
    with pytest.raises(ConfigurationError, match="no handler is registered for its kind 'report'"):
        offline.enqueue_periodic()
    with pytest.raises(ConfigurationError, match="no handler is registered for its kind 'report'"):
        offline.run()


def test_schedules_follow_the_queues_a_worker_serves(offline: Scheduler) -> None:
    offline.handler("report", queue="reports")(noop)
    offline.handler("ping")(noop)
    offline.periodic(every=60, kind="report")
    offline.periodic(every=60, kind="ping", queue="urgent")
    handlers = offline.handlers
    schedules = list(offline.schedules.values())
    assert {s.name: s.queue for s in runnable_schedules(schedules, handlers, None)} == {
        "report": "reports",
        "ping": "urgent",
    }
    assert [s.name for s in runnable_schedules(schedules, handlers, ["reports"])] == ["report"]
    assert runnable_schedules(schedules, handlers, ["default"]) == []


# -- slots -------------------------------------------------------------------


def test_cron_slots_in_a_time_zone_across_daylight_saving_changes() -> None:
    daily = make_schedule("30 2 * * *", kind="k", timezone="Europe/Paris")
    # Spring forward (2026-03-29, 02:00 -> 03:00): 02:30 does not exist and
    # the slot is at the first minute that does.
    assert daily.slots(utc(2026, 3, 27), utc(2026, 3, 31)) == [
        utc(2026, 3, 27, 1, 30),  # 02:30 +01:00
        utc(2026, 3, 28, 1, 30),
        utc(2026, 3, 29, 1, 0),  # 03:00 +02:00
        utc(2026, 3, 30, 0, 30),  # 02:30 +02:00
    ]
    # Fall back (2026-10-25, 03:00 -> 02:00): 02:30 happens twice; a
    # fixed-hour schedule fires at the first one only, as cron does.
    assert daily.slots(utc(2026, 10, 23), utc(2026, 10, 27)) == [
        utc(2026, 10, 23, 0, 30),
        utc(2026, 10, 24, 0, 30),
        utc(2026, 10, 25, 0, 30),  # 02:30 +02:00
        utc(2026, 10, 26, 1, 30),  # 02:30 +01:00
    ]
    hourly = make_schedule("0 * * * *", kind="k", timezone="Europe/Paris")
    # Local days: 23 hours in spring, 25 in autumn; an hourly schedule fires every hour.
    spring = hourly.slots(utc(2026, 3, 28, 23, 0), utc(2026, 3, 29, 22, 0) - SECOND)
    autumn = hourly.slots(utc(2026, 10, 24, 22, 0), utc(2026, 10, 25, 23, 0) - SECOND)
    assert len(spring) == 22  # after local midnight: 23 slots in the day, minus midnight
    assert len(autumn) == 24
    assert utc(2026, 10, 25, 0, 0) in autumn and utc(2026, 10, 25, 1, 0) in autumn  # 02:00 twice
    assert all(b - a == dt.timedelta(hours=1) for a, b in itertools.pairwise(autumn))
    # next_slot is strictly after; latest_slot is at or before.
    assert daily.next_slot(utc(2026, 3, 29, 1, 0)) == utc(2026, 3, 30, 0, 30)
    assert daily.latest_slot(utc(2026, 3, 29, 1, 0)) == utc(2026, 3, 29, 1, 0)
    ny = make_schedule("0 9 * * MON-FRI", kind="k", timezone="America/New_York")
    assert ny.next_slot(utc(2026, 11, 27, 15, 0)) == utc(2026, 11, 30, 14, 0)  # Fri -> Mon, EST
    assert ny.next_slot(utc(2026, 7, 3, 12, 0)) == utc(2026, 7, 3, 13, 0)  # EDT


def test_cron_with_seconds_first() -> None:
    quarter = make_schedule("*/15 * * * * *", kind="k")
    assert quarter.expression == "*/15 * * * * *"
    assert quarter.slots(utc(2030, 1, 1, 12, 0, 0), utc(2030, 1, 1, 12, 1, 0)) == [
        utc(2030, 1, 1, 12, 0, 15),
        utc(2030, 1, 1, 12, 0, 30),
        utc(2030, 1, 1, 12, 0, 45),
        utc(2030, 1, 1, 12, 1, 0),
    ]
    thirty = make_schedule("30 0 * * * *", kind="k")  # second 30 of minute 0 of every hour
    assert thirty.next_slot(utc(2030, 1, 1, 12, 0, 30)) == utc(2030, 1, 1, 13, 0, 30)
    # Whitespace is normalised: the same schedule, not a change.
    assert make_schedule("  0  3 * *   * ", kind="k").expression == "0 3 * * *"
    assert make_schedule("@daily", kind="k").next_slot(T0) == utc(2030, 1, 2)


def test_every_slots_are_aligned_to_the_epoch() -> None:
    ninety = make_schedule(every=90, kind="k")
    assert ninety.expression == "@every 90s" and ninety.timezone == "UTC"
    assert ninety.next_slot(utc(2030, 1, 1, 12, 0, 0)) == utc(2030, 1, 1, 12, 1, 30)
    assert ninety.latest_slot(utc(2030, 1, 1, 12, 1, 30)) == utc(2030, 1, 1, 12, 1, 30)
    five = make_schedule(every=dt.timedelta(minutes=5), kind="k")
    assert five.expression == "@every 300s"
    assert five.slots(utc(2030, 1, 1, 12, 2), utc(2030, 1, 1, 12, 20)) == [
        utc(2030, 1, 1, 12, 5),
        utc(2030, 1, 1, 12, 10),
        utc(2030, 1, 1, 12, 15),
        utc(2030, 1, 1, 12, 20),
    ]
    assert five.slots(utc(2030, 1, 1, 12, 2), utc(2030, 1, 1, 12, 20), limit=2) == [
        utc(2030, 1, 1, 12, 15),
        utc(2030, 1, 1, 12, 20),
    ]
    second = make_schedule(every=1, kind="k")
    moment = dt.datetime(2030, 1, 1, 12, 0, 0, 999_999, tzinfo=UTC)
    assert second.latest_slot(moment) == utc(2030, 1, 1, 12, 0, 0)
    assert second.next_slot(moment) == utc(2030, 1, 1, 12, 0, 1)
    with pytest.raises(ValueError, match="timezone-aware"):
        second.next_slot(dt.datetime(2030, 1, 1))


# -- the enqueue step --------------------------------------------------------


def _scheduler(session_factory: sessionmaker[Session], **options: Any) -> Scheduler:
    """A Scheduler with a ``report`` handler in the ``reports`` queue and one schedule."""
    scheduler = Scheduler(session_factory)
    scheduler.handler("report", queue="reports")(noop)
    options.setdefault("every", 60)
    options.setdefault("kind", "report")
    scheduler.periodic(**options)
    return scheduler


def _row(session_factory: sessionmaker[Session], name: str = "report") -> ScheduleState:
    with session_factory() as session:
        row = session.get(ScheduleState, name)
        assert row is not None
        return row


def _tasks(session_factory: sessionmaker[Session], schedule: str = "report") -> list[Task]:
    with session_factory() as session:
        return list(
            session.scalars(select(Task).where(Task.schedule == schedule).order_by(Task.slot))
        )


def _slots(session_factory: sessionmaker[Session], schedule: str = "report") -> list[dt.datetime]:
    return [t.slot for t in _tasks(session_factory, schedule) if t.slot is not None]


def _set_last_slot(
    session_factory: sessionmaker[Session], value: dt.datetime | None, name: str = "report"
) -> None:
    with session_factory.begin() as session:
        session.execute(
            update(ScheduleState).where(ScheduleState.name == name).values(last_slot=value)
        )


def at(base: dt.datetime, **delta: float) -> dt.datetime:
    return base + dt.timedelta(**delta)


def test_a_new_schedule_starts_at_the_next_slot(session_factory: sessionmaker[Session]) -> None:
    seen: list[tuple[str | None, dt.datetime | None]] = []
    scheduler = Scheduler(session_factory)

    @scheduler.periodic(every=60, payload={"to": "ops"}, priority=7)
    @scheduler.handler("report", queue="reports")
    def report(session: Session, task: Task) -> object:
        seen.append((task.schedule, task.slot))
        return None

    assert scheduler.enqueue_periodic(now=T0) == {}  # first sight: nothing at deploy time
    row = _row(session_factory)
    assert (row.kind, row.expression, row.timezone) == ("report", "@every 60s", "UTC")
    assert row.last_slot == utc(2030, 1, 1, 12, 0)
    assert scheduler.enqueue_periodic(now=at(T0, seconds=20)) == {}  # 12:00:50: not yet
    assert scheduler.enqueue_periodic(now=at(T0, seconds=30)) == {
        "report": [utc(2030, 1, 1, 12, 1)]
    }
    assert scheduler.enqueue_periodic(now=at(T0, seconds=45)) == {}
    (task,) = _tasks(session_factory)
    assert (task.kind, task.queue, task.payload, task.priority) == (
        "report",
        "reports",
        {"to": "ops"},
        7,
    )
    assert (task.schedule, task.slot, task.status) == (
        "report",
        utc(2030, 1, 1, 12, 1),
        TaskStatus.PENDING,
    )
    assert _row(session_factory).last_slot == utc(2030, 1, 1, 12, 1)
    assert scheduler.run_until_idle() == 1
    assert seen == [("report", utc(2030, 1, 1, 12, 1))]


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"missed": "once"}, [(12, 10)]),
        ({"missed": "backfill", "backfill": 3}, [(12, 8), (12, 9), (12, 10)]),
        ({"missed": "backfill", "backfill": 50}, [(12, m) for m in range(2, 11)]),
        ({"missed": "skip"}, [(12, 10)]),  # 12:10 is 30 s late: within the 60 s grace
        ({"missed": "skip", "grace": 20}, []),  # 30 s late: more than the grace
    ],
)
def test_missed_slots_after_a_pause(
    session_factory: sessionmaker[Session],
    options: dict[str, Any],
    expected: list[tuple[int, int]],
) -> None:
    scheduler = _scheduler(session_factory, **options)
    scheduler.enqueue_periodic(now=T0)  # starts: last_slot 12:00
    scheduler.enqueue_periodic(now=at(T0, seconds=40))  # 12:01:10: 12:01 runs on time
    # No worker from 12:01:10 to 12:10:30: 12:02 ... 12:10 were missed.
    enqueued = scheduler.enqueue_periodic(now=at(T0, minutes=10))
    slots = [utc(2030, 1, 1, h, m) for h, m in expected]
    assert enqueued == ({"report": slots} if slots else {})
    assert _slots(session_factory) == [utc(2030, 1, 1, 12, 1), *slots]
    # Whatever the policy, the schedule goes on from the latest due slot.
    assert _row(session_factory).last_slot == utc(2030, 1, 1, 12, 10)
    assert scheduler.enqueue_periodic(now=at(T0, minutes=10, seconds=40)) == {
        "report": [utc(2030, 1, 1, 12, 11)]
    }


def test_skip_runs_a_late_slot_within_the_grace_only(
    session_factory: sessionmaker[Session],
) -> None:
    scheduler = _scheduler(session_factory, expression="0 * * * *", every=None, missed="skip")
    scheduler.enqueue_periodic(now=utc(2030, 1, 1, 9, 30))
    # Workers back at 12:00:45: the 12:00 slot is 45 s late, it runs; 10:00 and 11:00 do not.
    assert scheduler.enqueue_periodic(now=utc(2030, 1, 1, 12, 0, 45)) == {
        "report": [utc(2030, 1, 1, 12)]
    }
    # Back at 15:05: 15:00 is five minutes late, nothing runs.
    assert scheduler.enqueue_periodic(now=utc(2030, 1, 1, 15, 5)) == {}
    assert _row(session_factory).last_slot == utc(2030, 1, 1, 15)
    assert scheduler.enqueue_periodic(now=utc(2030, 1, 1, 16, 0, 1)) == {
        "report": [utc(2030, 1, 1, 16)]
    }


def test_a_pause_by_the_database_clock(session_factory: sessionmaker[Session]) -> None:
    scheduler = _scheduler(session_factory, every=1, missed="backfill", backfill=4)
    assert scheduler.enqueue_periodic() == {}
    with session_factory() as session:
        db_now = session.execute(text("SELECT clock_timestamp()")).scalar_one()
    _set_last_slot(session_factory, db_now - dt.timedelta(seconds=30))  # as if down for 30 s
    enqueued = scheduler.enqueue_periodic()["report"]
    assert len(enqueued) == 4
    assert all(b - a == SECOND for a, b in itertools.pairwise(enqueued))
    assert db_now - SECOND <= enqueued[-1] <= db_now + 5 * SECOND
    assert _row(session_factory).last_slot == enqueued[-1]


def test_a_changed_schedule_starts_afresh(session_factory: sessionmaker[Session]) -> None:
    old = _scheduler(session_factory, every=60, missed="backfill", backfill=100)
    old.enqueue_periodic(now=T0)
    old.enqueue_periodic(now=at(T0, minutes=1))  # 12:01
    # Deployed at 12:20:10 with another expression: nothing before the change
    # is backfilled; its slot that just came due (10 s ago) runs.
    new = _scheduler(
        session_factory, every=None, expression="*/5 * * * *", missed="backfill", backfill=100
    )
    assert new.enqueue_periodic(now=utc(2030, 1, 1, 12, 20, 10)) == {
        "report": [utc(2030, 1, 1, 12, 20)]
    }
    row = _row(session_factory)
    assert (row.expression, row.last_slot) == ("*/5 * * * *", utc(2030, 1, 1, 12, 20))
    assert new.enqueue_periodic(now=utc(2030, 1, 1, 12, 40, 10)) == {
        "report": [utc(2030, 1, 1, 12, m) for m in (25, 30, 35, 40)]
    }
    # A time zone change is a change too; this time the last slot is 3 minutes late.
    paris = _scheduler(
        session_factory,
        every=None,
        expression="*/5 * * * *",
        timezone="Asia/Kolkata",  # +05:30: its */5 slots are the same instants...
        missed="backfill",
        backfill=100,
    )
    assert paris.enqueue_periodic(now=utc(2030, 1, 1, 13, 3)) == {}  # ...but 13:00 is late
    row = _row(session_factory)
    assert (row.timezone, row.last_slot) == ("Asia/Kolkata", utc(2030, 1, 1, 13, 0))
    # A new kind under the same name is not a change of timing.
    other = Scheduler(session_factory)
    other.handler("report_v2")(noop)
    other.periodic(
        "*/5 * * * *", kind="report_v2", name="report", timezone="Asia/Kolkata", missed="once"
    )
    assert other.enqueue_periodic(now=utc(2030, 1, 1, 13, 16)) == {
        "report": [utc(2030, 1, 1, 13, 15)]
    }
    assert _row(session_factory).kind == "report_v2"
    assert [t.kind for t in _tasks(session_factory)][-1] == "report_v2"


def test_a_reset_row_starts_afresh_and_a_removed_schedule_stays_inert(
    session_factory: sessionmaker[Session],
) -> None:
    scheduler = _scheduler(session_factory)
    scheduler.enqueue_periodic(now=T0)
    scheduler.enqueue_periodic(now=at(T0, minutes=1))
    _set_last_slot(session_factory, None)
    assert scheduler.enqueue_periodic(now=at(T0, minutes=30)) == {}
    assert _row(session_factory).last_slot == utc(2030, 1, 1, 12, 30)
    # The schedule removed from the code: its row stays, nothing enqueues it.
    gone = Scheduler(session_factory)
    gone.handler("report")(noop)
    assert gone.enqueue_periodic(now=at(T0, minutes=40)) == {}
    assert _row(session_factory).last_slot == utc(2030, 1, 1, 12, 30)
    assert len(_tasks(session_factory)) == 1


def test_a_paused_queue_enqueues_nothing_and_misses_its_slots(
    session_factory: sessionmaker[Session],
) -> None:
    scheduler = _scheduler(session_factory, missed="backfill", backfill=2)
    scheduler.enqueue_periodic(now=T0)
    with session_factory.begin() as session:
        session.execute(text("SELECT pgotask_pause_queue('reports')"))
    assert scheduler.enqueue_periodic(now=at(T0, minutes=5)) == {}
    assert _row(session_factory).last_slot == utc(2030, 1, 1, 12, 0)
    with session_factory.begin() as session:
        session.execute(text("SELECT pgotask_resume_queue('reports')"))
    # Resumed at 12:05:40: five slots came due; backfill=2 runs the latest two.
    assert scheduler.enqueue_periodic(now=at(T0, minutes=5, seconds=10)) == {
        "report": [utc(2030, 1, 1, 12, 4), utc(2030, 1, 1, 12, 5)]
    }


def test_the_fence_holds_when_last_slot_goes_back(session_factory: sessionmaker[Session]) -> None:
    scheduler = _scheduler(session_factory, missed="backfill", backfill=10)
    scheduler.enqueue_periodic(now=T0)
    first = scheduler.enqueue_periodic(now=at(T0, minutes=5))["report"]
    assert len(first) == 5
    _set_last_slot(session_factory, utc(2030, 1, 1, 12, 0))  # as if the row had been restored
    assert scheduler.enqueue_periodic(now=at(T0, minutes=6)) == {"report": [utc(2030, 1, 1, 12, 6)]}
    assert _slots(session_factory) == [utc(2030, 1, 1, 12, m) for m in range(1, 7)]


def _run_together(count: int, work: Callable[[int], None]) -> None:
    errors: list[BaseException] = []

    def run(n: int) -> None:
        try:
            work(n)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(n,)) for n in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors


def test_concurrent_enqueue_makes_one_task_per_slot(
    engine: Engine, session_factory: sessionmaker[Session]
) -> None:
    threads, steps = 6, 24
    schedulers = [
        _scheduler(session_factory, every=1, missed="backfill", backfill=3) for _ in range(threads)
    ]
    barrier = threading.Barrier(threads)
    results: list[list[dt.datetime]] = [[] for _ in range(threads)]

    def work(n: int) -> None:
        for step in range(steps):
            barrier.wait(30)
            found = schedulers[n].enqueue_periodic(now=at(T0, seconds=step * 0.5))
            results[n].extend(found.get("report", []))

    _run_together(threads, work)
    slots = _slots(session_factory)
    # 12:00:31 ... 12:00:41, each once; each reported by the one thread that enqueued it.
    assert slots == [at(utc(2030, 1, 1, 12, 0, 31), seconds=n) for n in range(11)]
    assert sorted(s for found in results for s in found) == slots


def test_the_unique_index_is_the_guarantee_without_the_row_lock(
    engine: Engine, session_factory: sessionmaker[Session]
) -> None:
    """Even if every worker read the row without locking it, each slot gets one task."""
    schedules = runnable_schedules(
        list(
            _scheduler(session_factory, every=1, missed="backfill", backfill=5).schedules.values()
        ),
        {"report": Scheduler(session_factory).handler("report")(noop)},
        None,
    )
    threads = 6
    barrier = threading.Barrier(threads)
    inserted: list[dt.datetime] = []
    unlocked = text(
        "SELECT name, kind, expression, timezone, last_slot FROM pgotask_schedule "
        "WHERE name = ANY(CAST(:names AS text[]))"
    )

    def work(n: int) -> None:
        with engine.connect() as conn:
            for step in range(12):
                barrier.wait(30)

                def execute(name: str, params: Mapping[str, Any]) -> Sequence[Sequence[Any]]:
                    statement = unlocked if name == "periodic_lock_schedules" else query(name)
                    result = conn.execute(statement, dict(params))
                    return [tuple(r) for r in result] if result.returns_rows else []

                with conn.begin():
                    tick = enqueue_due(execute, schedules, now=at(T0, seconds=step))
                inserted.extend(tick.enqueued.get("report", []))

    _run_together(threads, work)
    slots = _slots(session_factory)
    # First sight at 12:00:30 (the first step) in some threads; then one task per slot.
    assert slots == sorted(set(slots))
    assert slots[-1] == utc(2030, 1, 1, 12, 0, 41)
    assert sorted(inserted) == slots
    with session_factory() as session:
        assert session.scalar(select(func.count()).select_from(Task)) == len(slots)


# -- worker processes ----------------------------------------------------------


def _runs(
    session_factory: sessionmaker[Session], schedule: str
) -> list[tuple[dt.datetime, dt.datetime]]:
    """(slot, created_at) of the schedule's tasks, oldest slot first."""
    with session_factory() as session:
        return [
            (row.slot, row.created_at)
            for row in session.execute(
                select(Task.slot, Task.created_at)
                .where(Task.schedule == schedule)
                .order_by(Task.slot)
            )
        ]


def _check_each_ran_once(session_factory: sessionmaker[Session]) -> None:
    """Every periodic task ran once, at its first attempt, and wrote one run row.

    A task enqueued as its worker was stopping may be left pending (never
    started): only the latest slots of a schedule.
    """
    with session_factory() as session:
        tasks = session.execute(
            select(Task.id, Task.schedule, Task.slot, Task.status, Task.attempts).where(
                Task.schedule.is_not(None)
            )
        ).all()
        runs = {
            row.task_id: (row.schedule, row.slot)
            for row in session.execute(
                select(PeriodicRun.task_id, PeriodicRun.schedule, PeriodicRun.slot)
            )
        }
    assert tasks
    last_run: dict[str | None, dt.datetime] = {}
    for task in tasks:
        if task.status == TaskStatus.PENDING:
            assert task.attempts == 0 and task.id not in runs, task
            continue
        assert (task.status, task.attempts) == (TaskStatus.SUCCEEDED, 1), task
        assert runs[task.id] == (task.schedule, task.slot)
        last_run[task.schedule] = max(last_run.get(task.schedule, task.slot), task.slot)
    for task in tasks:
        if task.status == TaskStatus.PENDING:
            assert task.slot > last_run[task.schedule], task
    assert set(runs) <= {task.id for task in tasks}


def _consecutive(slots: Sequence[dt.datetime], step: dt.timedelta = SECOND) -> bool:
    return all(b - a == step for a, b in itertools.pairwise(slots))


def _stop(workers: Sequence[WorkerProcess]) -> None:
    for worker in workers:
        worker.send(signal.SIGTERM)
    for worker in workers:
        assert worker.wait(30) == 0


def _db_now(session_factory: sessionmaker[Session]) -> dt.datetime:
    with session_factory() as session:
        value: dt.datetime = session.execute(text("SELECT clock_timestamp()")).scalar_one()
        return value


@pytest.mark.slow
def test_three_workers_run_each_slot_exactly_once(
    database_url: str,
    engine: Engine,
    session_factory: sessionmaker[Session],
    tmp_path: Path,
) -> None:
    create_tables(engine)
    with ExitStack() as stack:
        workers = [
            stack.enter_context(
                pgotask_worker(
                    database_url, tmp_path, scheduler=periodic_app.SCHEDULER, name=f"worker{n}"
                )
            )
            for n in range(3)
        ]
        for worker in workers:
            worker.wait_started()
            worker.wait_for_log("periodic: enqueueing 4 schedules")
        started = _db_now(session_factory)
        # Several slots after all three are up and racing for every slot.
        wait_until(
            lambda: (
                len(
                    [s for s, _ in _runs(session_factory, periodic_app.EVERY_SECOND) if s > started]
                )
                >= 6
            ),
            60,
            interval=0.2,
            message="six slots of the 1-second schedule",
        )
        _stop(workers)

    slots = [slot for slot, _ in _runs(session_factory, periodic_app.EVERY_SECOND)]
    print(f"{len(slots)} slots: {slots[0]} ... {slots[-1]}")
    assert len(slots) >= 6
    assert len(set(slots)) == len(slots)
    assert _consecutive(slots), slots  # none missed between the first and the last
    assert all(s.microsecond == 0 for s in slots)
    _check_each_ran_once(session_factory)
    with session_factory() as session:
        row = session.get(ScheduleState, periodic_app.EVERY_SECOND)
        assert row is not None and row.last_slot == slots[-1]


@pytest.mark.slow
def test_missed_policies_after_workers_were_stopped(
    database_url: str,
    engine: Engine,
    session_factory: sessionmaker[Session],
    tmp_path: Path,
) -> None:
    create_tables(engine)
    once, backfill, skip = periodic_app.ONCE, periodic_app.BACKFILL, periodic_app.SKIP
    skip_every = dt.timedelta(seconds=periodic_app.SKIP_EVERY)
    with pgotask_worker(
        database_url, tmp_path, scheduler=periodic_app.SCHEDULER, name="before"
    ) as worker:
        worker.wait_started()
        wait_until(
            lambda: len(_runs(session_factory, once)) >= 2 and _runs(session_factory, skip),
            60,
            interval=0.2,
            message="slots of every schedule before the pause",
        )
        _stop([worker])
    last = {name: _runs(session_factory, name)[-1][0] for name in (once, backfill, skip)}
    # The pause: at least 6 slots of the 1-second schedules, and the next
    # slot of the 4-second one more than its 1 s grace late at the restart.
    resume_at = max(last[once] + 6 * SECOND, last[skip] + skip_every + 1.5 * SECOND)
    wait_until(lambda: _db_now(session_factory) >= resume_at, 30, message="the pause")

    with pgotask_worker(
        database_url, tmp_path, scheduler=periodic_app.SCHEDULER, name="after"
    ) as worker:
        worker.wait_started()
        wait_until(
            lambda: (
                len([s for s, _ in _runs(session_factory, once) if s > last[once]]) >= 3
                and [s for s, _ in _runs(session_factory, skip) if s > last[skip] + skip_every]
            ),
            60,
            interval=0.2,
            message="slots of every schedule after the pause",
        )
        _stop([worker])
    _check_each_ran_once(session_factory)

    # once: one task for the latest missed slot, enqueued as the worker
    # started, none for the slots before it; then on time again.
    after = [(s, c) for s, c in _runs(session_factory, once) if s > last[once]]
    first_slot, first_created = after[0]
    assert first_slot - last[once] >= 5 * SECOND, (last[once], after)
    assert first_created - first_slot < SECOND + 0.5 * SECOND  # the latest due when it ran
    assert _consecutive([s for s, _ in after])

    # backfill=3: the first step after the restart enqueued the latest three
    # missed slots together (one transaction: one created_at); older ones dropped.
    after = [(s, c) for s, c in _runs(session_factory, backfill) if s > last[backfill]]
    together = [s for s, c in after if c == after[0][1]]
    assert len(together) == periodic_app.BACKFILL_N, after
    assert _consecutive(together)
    assert together[0] - last[backfill] >= 3 * SECOND, (last[backfill], after)
    assert _consecutive([s for s, _ in after])

    # skip: the slot that came due during the pause never ran; later ones did.
    slots = [s for s, _ in _runs(session_factory, skip)]
    assert last[skip] + skip_every not in slots
    assert [s for s in slots if s > last[skip] + skip_every]
