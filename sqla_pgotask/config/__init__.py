"""The public configuration types: plain values, checked when made, with no I/O.

- :mod:`~sqla_pgotask.config.handlers`: :class:`Handler`, what runs a task kind;
- :mod:`~sqla_pgotask.config.limits`: :class:`QueueLimit` and :class:`RateLimit`;
- :mod:`~sqla_pgotask.config.retry`: the backoffs between attempts;
- :mod:`~sqla_pgotask.config.retention`: :class:`Retention`, how long
  finished tasks are kept;
- :mod:`~sqla_pgotask.config.schedule`: :class:`Schedule`, periodic tasks'
  cron expressions and intervals.
"""

from sqla_pgotask.config.handlers import Handler
from sqla_pgotask.config.limits import QueueLimit, RateLimit
from sqla_pgotask.config.retention import Retention
from sqla_pgotask.config.retry import ConstantBackoff, ExponentialBackoff, RetryStrategy
from sqla_pgotask.config.schedule import Schedule

__all__ = [
    "ConstantBackoff",
    "ExponentialBackoff",
    "Handler",
    "QueueLimit",
    "RateLimit",
    "Retention",
    "RetryStrategy",
    "Schedule",
]
