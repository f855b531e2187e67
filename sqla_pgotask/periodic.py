"""Periodic tasks: schedules, their slots, and enqueueing each slot exactly once.

A *schedule* names a task kind and when it runs: a cron expression (5
fields, or 6 with seconds first) in a time zone, or a plain interval
(``every=``, whole seconds, aligned to the Unix epoch).  Each instant it
fires is a *slot*.  Every worker that runs the schedule's kind enqueues its
due slots as tasks carrying ``schedule`` and ``slot``; the unique index on
``(schedule, slot)`` is the fence that makes one task per slot, however many
workers (on however many hosts) enqueue it at once.  ``pgotask_schedule``
keeps, per schedule, the last slot enqueued, so that slots missed while no
worker ran are handled by the schedule's ``missed`` policy, and so that
slots whose tasks were pruned never come back.

::

    @scheduler.periodic("0 3 * * *", timezone="Europe/Paris")
    @scheduler.handler("nightly_report")
    def nightly_report(session, task):
        build_report(session, day=task.slot.date())

    scheduler.periodic(every=30, kind="refresh_rates", payload={"source": "ecb"})
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterBadDateError, croniter
from sqlalchemy.orm import Session, sessionmaker

from sqla_pgotask._queries import query
from sqla_pgotask.errors import ConfigurationError
from sqla_pgotask.handlers import Handler
from sqla_pgotask.models import TASK_BIND, encode_json

logger = logging.getLogger("sqla_pgotask.periodic")

#: What a schedule does with slots that came due while no worker ran.
MissedPolicy = Literal["skip", "once", "backfill"]
MISSED_POLICIES: tuple[MissedPolicy, ...] = ("skip", "once", "backfill")
#: What the decorator form of :meth:`Scheduler.periodic` returns.
HandlerDecorator = Callable[[Handler], Handler]

#: How late (seconds) a slot may be enqueued and still be on time, unless
#: the schedule sets ``grace``.
DEFAULT_GRACE = 60.0
#: The most slots ``missed="backfill"`` may catch up at once.
MAX_BACKFILL = 10_000
#: Missed slots are counted (for the log) up to this many.
_COUNT_CAP = 1_000

UTC = dt.timezone.utc
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = dt.timedelta(microseconds=1)
# A standalone H or R in a field: croniter's hashed and random values, which
# would differ between workers (H needs an id; R is random per process).
_NOT_DETERMINISTIC = re.compile(r"(?<![A-Za-z])[HhRr](?![A-Za-z])")


# -- slots -------------------------------------------------------------------


class _Timing(Protocol):
    """How a schedule's slots are computed.  Every instant is timezone-aware (UTC)."""

    def backwards(self, until: dt.datetime) -> Iterator[dt.datetime]:
        """Slots at or before ``until``, newest first."""

    def forwards(self, after: dt.datetime) -> Iterator[dt.datetime]:
        """Slots strictly after ``after``, oldest first."""


class _Every:
    """Every ``seconds`` seconds, at whole multiples of it since the Unix epoch."""

    def __init__(self, seconds: int) -> None:
        self.period = dt.timedelta(seconds=seconds)

    def _floor(self, t: dt.datetime) -> dt.datetime:
        return _EPOCH + ((t - _EPOCH) // self.period) * self.period

    def backwards(self, until: dt.datetime) -> Iterator[dt.datetime]:
        slot = self._floor(until)
        while True:
            yield slot
            slot -= self.period

    def forwards(self, after: dt.datetime) -> Iterator[dt.datetime]:
        slot = self._floor(after)
        while True:
            slot += self.period
            yield slot


class _Cron:
    """A cron expression (through croniter) in a time zone.

    Local times that do not exist (the hour skipped when clocks go forward)
    fire at the first existing minute after them.  When clocks go back, an
    expression with a fixed hour fires once in the repeated hour (as cron
    does); one whose hour field is ``*`` or ``*/n`` fires in both.
    """

    def __init__(self, expression: str, tz: dt.tzinfo, *, seconds: bool) -> None:
        self.expression = expression
        self.tz = tz
        self.seconds = seconds
        fields = expression.split()
        if expression.startswith("@"):  # @daily, @weekly, ...: all but @hourly fix the hour
            self.fixed_hour = expression.lower() != "@hourly"
        else:
            self.fixed_hour = not fields[2 if seconds else 1].startswith("*")

    def _iter(self, start: dt.datetime, *, backwards: bool) -> Iterator[dt.datetime]:
        it = croniter(
            self.expression,
            start.astimezone(self.tz),
            ret_type=dt.datetime,
            second_at_beginning=self.seconds,
        )
        while True:
            local = it.get_prev() if backwards else it.get_next()
            slot = local.astimezone(UTC)
            if not self._repeated(slot):
                yield slot

    def _repeated(self, slot: dt.datetime) -> bool:
        """Whether ``slot`` is the second occurrence of a local time (and must not fire)."""
        if not self.fixed_hour:
            return False
        local = slot.astimezone(self.tz)
        return local.fold == 1 and local.replace(fold=0).utcoffset() != local.utcoffset()

    def backwards(self, until: dt.datetime) -> Iterator[dt.datetime]:
        # croniter's previous match is strictly before its start: start a hair later.
        return self._iter(until + _MICROSECOND, backwards=True)

    def forwards(self, after: dt.datetime) -> Iterator[dt.datetime]:
        return self._iter(after, backwards=False)


# -- schedules ---------------------------------------------------------------


@dataclass(frozen=True)
class Schedule:
    """A registered periodic schedule (see :meth:`Scheduler.periodic`).

    ``expression`` and ``timezone`` are what ``pgotask_schedule`` stores:
    the cron expression (whitespace normalised) or ``"@every <n>s"``, and the
    zone name (``"UTC"`` for ``every=``).
    """

    name: str
    kind: str
    expression: str
    timezone: str
    _timing: _Timing = field(repr=False, compare=False)
    missed: MissedPolicy = "once"
    #: With ``missed="backfill"``: the most missed slots run after a pause.
    backfill: int | None = None
    #: Seconds a slot may be late and still count as on time.
    grace: float = DEFAULT_GRACE
    payload: Any = None
    #: ``None``: the handler's queue.
    queue: str | None = None
    priority: int | None = None

    def next_slot(self, after: dt.datetime) -> dt.datetime:
        """The first slot strictly after ``after``."""
        return next(self._timing.forwards(_aware(after)))

    def latest_slot(self, until: dt.datetime) -> dt.datetime | None:
        """The last slot at or before ``until`` (``None`` if there is none)."""
        return next(iter(self._latest(_aware(until), None, 1)), None)

    def slots(
        self, after: dt.datetime, until: dt.datetime, *, limit: int | None = None
    ) -> list[dt.datetime]:
        """The slots in ``(after, until]``, oldest first (only the latest ``limit`` if given)."""
        after, until = _aware(after), _aware(until)
        if limit is not None:
            return self._latest(until, after, limit)
        found = []
        for slot in self._timing.forwards(after):
            if slot > until:
                break
            found.append(slot)
        return found

    def _latest(
        self, until: dt.datetime, after: dt.datetime | None, limit: int
    ) -> list[dt.datetime]:
        found: list[dt.datetime] = []
        try:
            for slot in self._timing.backwards(until):
                if (after is not None and slot <= after) or len(found) >= limit:
                    break
                found.append(slot)
        except CroniterBadDateError:  # nothing earlier within croniter's search window
            pass
        found.reverse()
        return found

    def _count(self, after: dt.datetime, until: dt.datetime) -> int:
        count = 0
        for slot in self._timing.forwards(after):
            if slot > until or count >= _COUNT_CAP:
                break
            count += 1
        return count


def make_schedule(
    expression: str | None = None,
    *,
    every: float | dt.timedelta | None = None,
    kind: str | None = None,
    name: str | None = None,
    payload: Any = None,
    timezone: str | dt.tzinfo | None = None,
    missed: str = "once",
    backfill: int | None = None,
    grace: float | dt.timedelta | None = None,
    queue: str | None = None,
    priority: int | None = None,
) -> Schedule:
    """Validate :meth:`Scheduler.periodic`'s arguments into a :class:`Schedule`.

    Raises :class:`ConfigurationError` with the reason.  Without ``kind`` the
    schedule's ``kind`` (and, unless given, its ``name``) are left empty, to
    be filled by :func:`for_handler`.
    """
    label = f"periodic schedule {name or kind or expression or every!r}"
    if (expression is None) == (every is None):
        raise ConfigurationError(
            f"{label}: give either a cron expression or every= (seconds), not "
            + ("both" if expression is not None else "neither")
        )
    timing: _Timing
    if expression is not None:
        stored, zone_name, timing = _cron(label, expression, timezone)
    else:
        if timezone is not None:
            raise ConfigurationError(
                f"{label}: timezone applies to cron expressions only; every= slots are "
                "whole multiples of the interval since the Unix epoch (UTC)"
            )
        seconds = _whole_seconds(label, "every", every)
        stored, zone_name, timing = f"@every {seconds}s", "UTC", _Every(seconds)
    if missed not in MISSED_POLICIES:
        raise ConfigurationError(
            f"{label}: missed must be one of {', '.join(map(repr, MISSED_POLICIES))}, "
            f"not {missed!r}"
        )
    if missed == "backfill":
        if (
            isinstance(backfill, bool)
            or not isinstance(backfill, int)
            or not 1 <= backfill <= MAX_BACKFILL
        ):
            raise ConfigurationError(
                f"{label}: missed='backfill' needs backfill=N, the most missed slots to "
                f"run after a pause (an integer from 1 to {MAX_BACKFILL}), not {backfill!r}"
            )
    elif backfill is not None:
        raise ConfigurationError(
            f"{label}: backfill={backfill!r} applies only with missed='backfill' "
            f"(missed is {missed!r})"
        )
    grace_seconds = DEFAULT_GRACE
    if grace is not None:
        grace_seconds = _seconds(label, "grace", grace)
        if grace_seconds < 0:
            raise ConfigurationError(f"{label}: grace must be >= 0 seconds, not {grace!r}")
    if kind is not None and (not isinstance(kind, str) or not kind):
        raise ConfigurationError(f"{label}: kind must be a non-empty string, not {kind!r}")
    if name is not None and (not isinstance(name, str) or not name):
        raise ConfigurationError(f"{label}: name must be a non-empty string, not {name!r}")
    if queue is not None and (not isinstance(queue, str) or not queue):
        raise ConfigurationError(f"{label}: queue must be a non-empty string, not {queue!r}")
    if priority is not None and (isinstance(priority, bool) or not isinstance(priority, int)):
        raise ConfigurationError(f"{label}: priority must be an integer, not {priority!r}")
    if payload is not None:
        try:
            encode_json(payload)
        except (TypeError, ValueError, RecursionError) as exc:
            raise ConfigurationError(f"{label}: payload is not JSON-serialisable: {exc}") from exc
    return Schedule(
        name=name or kind or "",
        kind=kind or "",
        expression=stored,
        timezone=zone_name,
        _timing=timing,
        missed=missed,
        backfill=backfill,
        grace=grace_seconds,
        payload=payload,
        queue=queue,
        priority=priority,
    )


def for_handler(schedule: Schedule, handler: object) -> Schedule:
    """The schedule of a decorator form, bound to the :class:`Handler` it decorates."""
    if not isinstance(handler, Handler):
        raise ConfigurationError(
            "@scheduler.periodic(...) decorates a registered handler: put it above "
            f"@scheduler.handler(...), or call it with kind=...; got {handler!r}"
        )
    return dataclasses.replace(schedule, kind=handler.kind, name=schedule.name or handler.kind)


def runnable_schedules(
    schedules: Sequence[Schedule],
    handlers: Mapping[str, Handler],
    queues: Sequence[str] | None,
) -> list[Schedule]:
    """The schedules a worker serving ``queues`` enqueues, each with its queue resolved.

    A schedule whose kind has no handler here is a :class:`ConfigurationError`.
    """
    found = []
    for schedule in schedules:
        handler = handlers.get(schedule.kind)
        if handler is None:
            raise ConfigurationError(
                f"periodic schedule {schedule.name!r}: no handler is registered for its "
                f"kind {schedule.kind!r}; schedules are enqueued by the workers that run them"
            )
        resolved = dataclasses.replace(schedule, queue=schedule.queue or handler.queue)
        if queues is None or resolved.queue in queues:
            found.append(resolved)
    return found


def _cron(
    label: str, expression: object, timezone: str | dt.tzinfo | None
) -> tuple[str, str, _Timing]:
    if not isinstance(expression, str):
        raise ConfigurationError(f"{label}: the cron expression must be a string")
    stored = " ".join(expression.split())
    fields = stored.split(" ")
    if not stored.startswith("@") and len(fields) not in (5, 6):
        raise ConfigurationError(
            f"{label}: bad cron expression {expression!r}: it has {len(fields)} fields; "
            "expected 5 (minute hour day-of-month month day-of-week), or 6 with seconds "
            "first (second minute hour day-of-month month day-of-week)"
        )
    if _NOT_DETERMINISTIC.search(stored):
        raise ConfigurationError(
            f"{label}: bad cron expression {expression!r}: hashed (H) and random (R) "
            "values are not supported: every worker must compute the same slots"
        )
    zone_name, tz = _zone(label, timezone)
    timing = _Cron(stored, tz, seconds=len(fields) == 6)
    try:
        croniter(stored, second_at_beginning=timing.seconds)
        next(timing.forwards(dt.datetime.now(UTC)))
    except CroniterBadDateError as exc:
        raise ConfigurationError(
            f"{label}: bad cron expression {expression!r}: it never fires ({exc})"
        ) from exc
    except Exception as exc:
        raise ConfigurationError(f"{label}: bad cron expression {expression!r}: {exc}") from exc
    return stored, zone_name, timing


def _zone(label: str, timezone: str | dt.tzinfo | None) -> tuple[str, dt.tzinfo]:
    if timezone is None or timezone == "UTC" or timezone is UTC:
        return "UTC", UTC
    if isinstance(timezone, ZoneInfo):
        return timezone.key, timezone
    if not isinstance(timezone, str):
        raise ConfigurationError(
            f"{label}: timezone must be an IANA zone name such as 'Europe/Paris', not {timezone!r}"
        )
    try:
        return timezone, ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ConfigurationError(
            f"{label}: unknown time zone {timezone!r} (an IANA name such as 'Europe/Paris' "
            f"is expected): {exc}"
        ) from exc


def _seconds(label: str, what: str, value: object) -> float:
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigurationError(
            f"{label}: {what} must be a number of seconds or a timedelta, not {value!r}"
        )
    return float(value)


def _whole_seconds(label: str, what: str, value: object) -> int:
    seconds = _seconds(label, what, value)
    if not seconds >= 1 or seconds != int(seconds):
        raise ConfigurationError(
            f"{label}: {what} must be a whole number of seconds >= 1, not {value!r}"
        )
    return int(seconds)


def _aware(t: dt.datetime) -> dt.datetime:
    if t.tzinfo is None or t.utcoffset() is None:
        raise ValueError(f"a timezone-aware datetime is needed, not {t!r}")
    return t


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
