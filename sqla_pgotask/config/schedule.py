"""Periodic schedules: when a task kind runs (cron or interval), and the slots it fires at.

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
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from sqla_pgotask.config.handlers import Handler
from sqla_pgotask.errors import ConfigurationError
from sqla_pgotask.models import encode_json

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
        from croniter import croniter  # here: a worker without schedules never loads it

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
        from croniter import CroniterBadDateError

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
    from croniter import CroniterBadDateError, croniter

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
