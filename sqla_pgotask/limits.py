"""Fleet-wide limits, now :mod:`sqla_pgotask.config.limits`."""

from sqla_pgotask.config.limits import (
    MAX_RATE_COUNT,
    QueueLimit,
    RateLimit,
    RateLimitSpec,
    as_rate_limit,
    check_max_running,
)

__all__ = [
    "MAX_RATE_COUNT",
    "QueueLimit",
    "RateLimit",
    "RateLimitSpec",
    "as_rate_limit",
    "check_max_running",
]
