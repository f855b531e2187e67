"""Fleet-wide limits, declared: concurrently running tasks and starts per period.

::

    @scheduler.handler("geocode", max_running=2, rate_limit=(10, 60))
    def geocode(session, task): ...

    scheduler.limit_queue("emails", max_running=5, rate_limit=RateLimit(100, 1.0))

These are the settings alone, checked when they are made; workers enforce
them in SQL, per kind or queue, across the fleet (``docs/limits.md``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Union

from sqla_pgotask.errors import ConfigurationError

__all__ = ["MAX_RATE_COUNT", "QueueLimit", "RateLimit", "RateLimitSpec"]

#: The most starts a rate limit may count: its row keeps one timestamp per
#: start within the period, rewritten by every claim.
MAX_RATE_COUNT = 10_000


@dataclass(frozen=True)
class RateLimit:
    """At most ``count`` task starts in any ``per`` seconds (a sliding window), fleet-wide.

    ``RateLimit(10, 60)``: ten starts a minute.  A start is a claim: a retry
    is a new start, and a claimed task given back unstarted at shutdown still
    counts.
    """

    count: int
    per: float

    def __post_init__(self) -> None:
        count, per = self.count, self.per
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ConfigurationError(f"a rate limit's count must be an integer >= 1, not {count!r}")
        if count > MAX_RATE_COUNT:
            raise ConfigurationError(
                f"a rate limit's count must be at most {MAX_RATE_COUNT:,} (each start in the "
                f"window is kept in the limit's row), not {count!r}: state a shorter period "
                "with a proportionally smaller count"
            )
        if (
            isinstance(per, bool)
            or not isinstance(per, int | float)
            or not per > 0
            or not math.isfinite(per)
        ):
            raise ConfigurationError(
                f"a rate limit's period must be a number of seconds > 0, not {per!r}"
            )
        object.__setattr__(self, "per", float(per))


#: What ``rate_limit=`` accepts: a :class:`RateLimit`, a ``(count, per_seconds)``
#: tuple, or ``None`` for no rate limit.
RateLimitSpec = Union[RateLimit, tuple[int, float], None]  # noqa: UP007 (a runtime alias on 3.10)


@dataclass(frozen=True)
class QueueLimit:
    """The fleet-wide limits of one queue (see :meth:`Scheduler.limit_queue`).

    ``max_running``: at most this many tasks of the queue running at once,
    whatever their kind.  ``rate_limit``: at most ``count`` starts per
    ``per`` seconds.
    """

    max_running: int | None = None
    rate_limit: RateLimit | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "max_running", check_max_running(self.max_running, "queue limit"))
        rate = as_rate_limit(self.rate_limit, "queue limit")
        object.__setattr__(self, "rate_limit", rate)
        if self.max_running is None and rate is None:
            raise ConfigurationError("a queue limit needs max_running, rate_limit or both")


def check_max_running(value: object, where: str) -> int | None:
    """``value`` as a ``max_running`` setting, or :class:`ConfigurationError`."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(
            f"{where}: max_running must be an integer >= 1 (or None), not {value!r}"
        )
    return value


def as_rate_limit(value: object, where: str) -> RateLimit | None:
    """``value`` (a :class:`RateLimit`, a ``(count, per)`` tuple or ``None``) as a RateLimit."""
    if value is None or isinstance(value, RateLimit):
        return value
    if isinstance(value, tuple) and len(value) == 2:
        try:
            return RateLimit(*value)
        except ConfigurationError as exc:
            raise ConfigurationError(f"{where}: {exc}") from None
    raise ConfigurationError(
        f"{where}: rate_limit must be RateLimit(count, per) or a (count, per_seconds) "
        f"tuple, not {value!r}"
    )
