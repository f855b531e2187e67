"""The ``pgotask`` command line, on top of everything else (nothing else imports it).

- :mod:`~sqla_pgotask.cli.pgotask`: the parser, :func:`main` and the
  ``prune``, ``queue``, ``migrate`` and ``demo`` commands;
- :mod:`~sqla_pgotask.cli.worker`: ``pgotask worker``;
- :mod:`~sqla_pgotask.cli.admin`: ``stats``, ``list``, ``show``, ``retry``,
  ``cancel``, ``check`` and ``enqueue``, over :mod:`sqla_pgotask.admin`;
- :mod:`~sqla_pgotask.cli.alembic_setup`: ``pgotask alembic setup``;
- :mod:`~sqla_pgotask.cli.metrics`: ``--metrics-port`` (Prometheus);
- :mod:`~sqla_pgotask.cli.arguments`, :mod:`~sqla_pgotask.cli.database` and
  :mod:`~sqla_pgotask.cli.output`: checked arguments, the database URL and
  its errors, and what is printed.

Exit codes scripts can rely on: 0 success, 2 usage, 3 database unreachable,
4 database schema missing or outdated, 1 anything else.
"""

from sqla_pgotask._exit_codes import (
    EXIT_ERROR,
    EXIT_OK,
    EXIT_SCHEMA,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    UsageError,
)
from sqla_pgotask.cli.pgotask import build_parser, cmd_demo, cmd_migrate, cmd_prune, cmd_queue, main
from sqla_pgotask.cli.worker import cmd_worker, load_scheduler, split_scheduler_path

__all__ = [
    "EXIT_ERROR",
    "EXIT_OK",
    "EXIT_SCHEMA",
    "EXIT_UNREACHABLE",
    "EXIT_USAGE",
    "UsageError",
    "build_parser",
    "cmd_demo",
    "cmd_migrate",
    "cmd_prune",
    "cmd_queue",
    "cmd_worker",
    "load_scheduler",
    "main",
    "split_scheduler_path",
]
