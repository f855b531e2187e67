"""Task handlers, now :mod:`sqla_pgotask.config.handlers`."""

from sqla_pgotask.config.handlers import (
    DEFAULT_MAX_ATTEMPTS,
    Handler,
    HandlerFunc,
    make_handler,
)

__all__ = [
    "DEFAULT_MAX_ATTEMPTS",
    "Handler",
    "HandlerFunc",
    "make_handler",
]
