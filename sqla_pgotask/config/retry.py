"""When a failed task runs again: backoff strategies for handlers.

``@scheduler.handler("kind", retry=...)`` takes any of:

* ``ExponentialBackoff(base=1.0, factor=2.0, max_delay=3600.0, jitter=0.5)``
  (the default): ``base * factor ** (attempt - 1)`` seconds, capped, with
  random jitter so tasks that failed together do not retry together;
* ``ConstantBackoff(30.0)``, or simply a number of seconds;
* any callable ``(attempt) -> seconds``.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, TypeAlias, Union, runtime_checkable

from sqla_pgotask.errors import ConfigurationError


@runtime_checkable
class RetryStrategy(Protocol):
    """Anything that says how long to wait before the next attempt."""

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        ...


@dataclass(frozen=True)
class ExponentialBackoff:
    """Exponential backoff with jitter: the delay doubles (``factor``) each attempt."""

    base: float = 1.0
    factor: float = 2.0
    max_delay: float = 3600.0
    #: Fraction of the delay that is random: 0.5 waits between 50% and 100%.
    jitter: float = 0.5

    def __post_init__(self) -> None:
        if self.base < 0 or self.factor < 1 or self.max_delay < 0:
            raise ConfigurationError(
                "ExponentialBackoff needs base >= 0, factor >= 1 and max_delay >= 0"
            )
        if not 0 <= self.jitter <= 1:
            raise ConfigurationError("ExponentialBackoff.jitter must be between 0 and 1")

    def delay(self, attempt: int) -> float:
        """``min(max_delay, base * factor ** (attempt - 1))``, less up to ``jitter`` of it."""
        exponent = max(attempt - 1, 0)
        try:
            raw = self.base * self.factor**exponent
        except OverflowError:
            raw = self.max_delay
        capped = min(self.max_delay, raw)
        return capped * (1 - self.jitter * random.random())


@dataclass(frozen=True)
class ConstantBackoff:
    """The same delay after every failed attempt."""

    seconds: float

    def __post_init__(self) -> None:
        if self.seconds < 0:
            raise ConfigurationError("ConstantBackoff.seconds must be >= 0")

    def delay(self, attempt: int) -> float:
        """Always ``seconds``."""
        return self.seconds


@dataclass(frozen=True)
class CallableBackoff:
    """A user function ``(attempt) -> seconds`` as a strategy."""

    func: Callable[[int], float]

    def delay(self, attempt: int) -> float:
        """What the function returns, never negative."""
        return max(0.0, float(self.func(attempt)))


#: What ``handler(retry=...)`` accepts.
RetrySpec: TypeAlias = Union[RetryStrategy, Callable[[int], float], float, None]  # noqa: UP007

DEFAULT_RETRY = ExponentialBackoff()


def as_strategy(spec: RetrySpec) -> RetryStrategy:
    """Turn what ``handler(retry=...)`` accepts into a strategy."""
    if spec is None:
        return DEFAULT_RETRY
    if isinstance(spec, bool):
        raise ConfigurationError(f"retry must be a strategy, a callable or seconds, not {spec!r}")
    if isinstance(spec, int | float):
        return ConstantBackoff(float(spec))
    if isinstance(spec, RetryStrategy):
        return spec
    if callable(spec):
        return CallableBackoff(spec)
    raise ConfigurationError(f"retry must be a strategy, a callable or seconds, not {spec!r}")
