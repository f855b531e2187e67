"""Backoffs between attempts, now :mod:`sqla_pgotask.config.retry`."""

from sqla_pgotask.config.retry import (
    DEFAULT_RETRY,
    CallableBackoff,
    ConstantBackoff,
    ExponentialBackoff,
    RetrySpec,
    RetryStrategy,
    as_strategy,
)

__all__ = [
    "DEFAULT_RETRY",
    "CallableBackoff",
    "ConstantBackoff",
    "ExponentialBackoff",
    "RetrySpec",
    "RetryStrategy",
    "as_strategy",
]
