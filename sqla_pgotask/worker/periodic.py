"""Enqueueing the due slots of periodic schedules, exactly once per slot.

Every worker that runs a schedule's kind enqueues its due slots as tasks
carrying ``schedule`` and ``slot``; the unique index on ``(schedule, slot)``
is the fence that makes one task per slot, however many workers enqueue it
at once.  ``pgotask_schedule`` keeps, per schedule, the last slot enqueued,
so that slots missed while no worker ran are handled by the schedule's
``missed`` policy (see :mod:`sqla_pgotask.config.schedule`).  The statements
are in ``sql/periodic.sql``.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from sqlalchemy.orm import Session, sessionmaker

from sqla_pgotask._queries import query
from sqla_pgotask.config.schedule import _COUNT_CAP, Schedule, _aware
from sqla_pgotask.models import TASK_BIND, encode_json

logger = logging.getLogger("sqla_pgotask.periodic")


# -- what is due -------------------------------------------------------------


@dataclass(frozen=True)
class ScheduleRow:
    """A schedule's row in ``pgotask_schedule``, as locked."""

    name: str
    kind: str
    expression: str
    timezone: str
    last_slot: dt.datetime | None


@dataclass(frozen=True)
class Plan:
    """What one tick does for one schedule."""

    #: Slots to enqueue, oldest first.
    slots: list[dt.datetime]
    #: The row's new ``last_slot``.
    last_slot: dt.datetime | None
    #: Due slots the policy dropped (counted up to a thousand).
    dropped: int = 0
    #: The row had another expression or time zone (the schedule changed).
    changed: bool = False
    #: The row had no ``last_slot``: the schedule starts from now.
    fresh: bool = False


def plan(schedule: Schedule, row: ScheduleRow, now: dt.datetime) -> Plan:
    """Which slots of ``schedule`` to enqueue at ``now``, given its row.

    * No ``last_slot`` (a new schedule, or reset by hand): start afresh from
      ``now``: nothing is enqueued, the next slot after ``now`` is the first.
    * Another expression or time zone in the row (the schedule changed):
      the new definition starts from ``now`` too, but its latest slot still
      runs if it is on time (at most ``grace`` late and after the row's
      ``last_slot``), so a slot is not lost to the change itself.  Nothing
      is backfilled across a change.
    * Otherwise the due slots are those in ``(last_slot, now]``:
      ``once`` enqueues the latest; ``backfill`` the latest ``backfill``;
      ``skip`` the latest if it is on time.  The others are dropped.

    ``last_slot`` then moves to the latest due slot (never backwards).
    """
    changed = (row.expression, row.timezone) != (schedule.expression, schedule.timezone)
    latest = schedule.latest_slot(now)
    if row.last_slot is None:
        return Plan([], latest or now, changed=changed, fresh=True)
    if latest is None or latest <= row.last_slot:
        return Plan([], row.last_slot, changed=changed)
    if changed:
        on_time = (now - latest).total_seconds() <= schedule.grace
        return Plan([latest] if on_time else [], latest, changed=True)
    if schedule.missed == "backfill":
        assert schedule.backfill is not None
        slots = schedule.slots(row.last_slot, now, limit=schedule.backfill)
    elif schedule.missed == "once" or (now - latest).total_seconds() <= schedule.grace:
        slots = [latest]
    else:  # skip, and late
        slots = []
    dropped = 0
    if not slots or schedule.next_slot(row.last_slot) < slots[0]:
        dropped = max(0, schedule._count(row.last_slot, now) - len(slots))
    return Plan(slots, latest, dropped=dropped)


# -- enqueueing --------------------------------------------------------------


class Execute(Protocol):
    """Run a named statement of ``sql/periodic.sql`` and return its rows (none for no result)."""

    def __call__(self, name: str, params: Mapping[str, Any]) -> Sequence[Sequence[Any]]: ...


@dataclass
class Tick:
    """What one enqueue step did."""

    #: The database clock during the step (or the ``now`` it was given).
    now: dt.datetime
    #: ``time.monotonic()`` when the database clock was read.
    monotonic: float
    #: The slots enqueued, by schedule name (slots another worker had
    #: enqueued already are left out).
    enqueued: dict[str, list[dt.datetime]] = field(default_factory=dict)
    #: Names of the schedules whose rows this step held (the others were
    #: being handled by another worker at that moment).
    handled: list[str] = field(default_factory=list)


_warned: set[tuple[str, str, str, str]] = set()


def enqueue_due(
    execute: Execute, schedules: Sequence[Schedule], *, now: dt.datetime | None = None
) -> Tick:
    """Enqueue the due slots of ``schedules``; run it in a transaction of its own.

    Creates the rows of schedules the database does not know, locks the rows
    (``SKIP LOCKED``: a row another worker holds is that worker's to handle
    now), computes the due slots from the database clock (or ``now``),
    inserts their tasks with ``ON CONFLICT DO NOTHING`` on the
    ``(schedule, slot)`` fence, and saves each row's new ``last_slot``.
    A schedule whose queue is paused is left alone: its slots come due as
    if no worker ran, and its missed policy applies once the queue resumes.
    """
    by_name = {s.name: s for s in sorted(schedules, key=lambda s: s.name)}
    names = list(by_name)
    execute(
        "periodic_create_schedules",
        {
            "names": names,
            "kinds": [s.kind for s in by_name.values()],
            "expressions": [s.expression for s in by_name.values()],
            "timezones": [s.timezone for s in by_name.values()],
        },
    )
    rows = [ScheduleRow(*row) for row in execute("periodic_lock_schedules", {"names": names})]
    before = time.monotonic()
    db_now, paused = execute("periodic_now", {})[0]
    mono = (before + time.monotonic()) / 2
    tick = Tick(now=db_now if now is None else _aware(now), monotonic=mono)
    tasks: dict[str, list[Any]] = {
        "kinds": [],
        "queues": [],
        "payloads": [],
        "priorities": [],
        "schedules": [],
        "slots": [],
    }
    saved: dict[str, list[Any]] = {
        "names": [],
        "kinds": [],
        "expressions": [],
        "timezones": [],
        "last_slots": [],
    }
    for row in rows:
        schedule = by_name[row.name]
        tick.handled.append(row.name)
        if schedule.queue in paused:  # left as it is: slots come due, as if no worker ran
            continue
        step = plan(schedule, row, tick.now)
        _log(schedule, row, step, tick.now)
        payload = "{}" if schedule.payload is None else encode_json(schedule.payload)
        for slot in step.slots:
            tasks["kinds"].append(schedule.kind)
            tasks["queues"].append(schedule.queue or "default")
            tasks["payloads"].append(payload)
            tasks["priorities"].append(schedule.priority)
            tasks["schedules"].append(schedule.name)
            tasks["slots"].append(slot)
        if step.last_slot != row.last_slot or (row.kind, row.expression, row.timezone) != (
            schedule.kind,
            schedule.expression,
            schedule.timezone,
        ):
            saved["names"].append(schedule.name)
            saved["kinds"].append(schedule.kind)
            saved["expressions"].append(schedule.expression)
            saved["timezones"].append(schedule.timezone)
            saved["last_slots"].append(step.last_slot)
    if tasks["slots"]:
        for _task_id, name, slot in execute("periodic_insert_tasks", tasks):
            tick.enqueued.setdefault(name, []).append(slot)
        for slots in tick.enqueued.values():
            slots.sort()
    if saved["names"]:
        execute("periodic_save_schedules", saved)
    return tick


def _log(schedule: Schedule, row: ScheduleRow, step: Plan, now: dt.datetime) -> None:
    if step.fresh:
        logger.info(
            "periodic schedule %r (%s, %s) starts now: its first slot is %s",
            schedule.name,
            schedule.expression,
            schedule.timezone,
            schedule.next_slot(now),
        )
    if step.changed:
        key = (schedule.name, row.expression, row.timezone, schedule.expression)
        if key not in _warned:  # once per worker, not at every tick of a rolling deploy
            _warned.add(key)
            logger.warning(
                "periodic schedule %r changed from %r (%s) to %r (%s): it starts afresh "
                "from now (nothing missed before the change is run)",
                schedule.name,
                row.expression,
                row.timezone,
                schedule.expression,
                schedule.timezone,
            )
    if step.dropped > 0:
        more = "+" if step.dropped + len(step.slots) >= _COUNT_CAP else ""
        logger.info(
            "periodic schedule %r: %d%s slots came due since %s: enqueued %d (missed=%r)",
            schedule.name,
            step.dropped + len(step.slots),
            more,
            row.last_slot,
            len(step.slots),
            schedule.missed,
        )


def enqueue_periodic(
    session_factory: sessionmaker[Session],
    schedules: Sequence[Schedule],
    *,
    now: dt.datetime | None = None,
) -> dict[str, list[dt.datetime]]:
    """Enqueue the due slots of ``schedules`` in one transaction; return them by schedule."""
    if not schedules:
        return {}
    with session_factory.begin() as session:
        tick = enqueue_due(_session_execute(session), schedules, now=now)
    return tick.enqueued


def _session_execute(session: Session) -> Execute:
    def execute(name: str, params: Mapping[str, Any]) -> Sequence[Sequence[Any]]:
        connection = session.connection(bind_arguments=TASK_BIND)
        result = connection.execute(query(name), dict(params))
        return [tuple(row) for row in result] if result.returns_rows else []

    return execute
