"""The ``pgotask`` command.

Exit codes scripts can rely on: 0 success, 2 bad arguments or a bad
``module:attribute`` (usage), 3 database unreachable, 4 database schema
missing or outdated, 1 anything else.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from types import FrameType

from sqlalchemy.exc import ArgumentError, OperationalError

from sqla_pgotask.errors import ConfigurationError, SchemaError
from sqla_pgotask.scheduler import Scheduler

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_SCHEMA = 4

DATABASE_URL_ENV = "PGOTASK_DATABASE_URL"

logger = logging.getLogger("sqla_pgotask.cli")


class UsageError(Exception):
    """Bad command-line input: exit code 2."""


def load_scheduler(path: str) -> Scheduler:
    """Import ``module:attribute`` (from the current directory too) and check it is a Scheduler."""
    module_name, sep, attr_path = path.partition(":")
    if not sep or not module_name or not attr_path:
        raise UsageError(
            f"expected 'module:attribute' (like 'myapp.tasks:scheduler'), got {path!r}"
        )
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and module_name.startswith(exc.name):
            raise UsageError(
                f"cannot import module {module_name!r}: no module named {exc.name!r}"
            ) from exc
        raise UsageError(f"importing module {module_name!r} failed: {exc}") from exc
    except Exception as exc:
        raise UsageError(
            f"importing module {module_name!r} failed: {type(exc).__name__}: {exc}"
        ) from exc
    obj: object = module
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise UsageError(f"module {module_name!r} has no attribute {attr_path!r}") from None
    if not isinstance(obj, Scheduler):
        raise UsageError(f"{path!r} is of type {type(obj).__name__}, not a sqla_pgotask.Scheduler")
    return obj


class _StoppedBeforeStart(BaseException):
    """A stop signal arrived before the worker was running: there is nothing to wait for.

    A BaseException, like KeyboardInterrupt, so that no ``except Exception``
    on the way (connecting, checking the schema) swallows or wraps it.
    """


def _install_stop_signals(scheduler: Callable[[], Scheduler | None]) -> None:
    """SIGINT/SIGTERM stop gracefully; a second one exits at once."""
    received: list[int] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if received:
            logger.warning("second %s: exiting now", signal.Signals(signum).name)
            os._exit(128 + signum)
        received.append(signum)
        logger.warning(
            "%s: stopping after in-flight tasks (send it again to exit now)",
            signal.Signals(signum).name,
        )
        current = scheduler()
        if current is None or current.running_worker is None:
            # Still starting (importing, connecting, checking the schema):
            # Scheduler.stop() would be a no-op and the worker would start anyway.
            raise _StoppedBeforeStart
        current.stop()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)


def cmd_worker(args: argparse.Namespace) -> int:
    """Run a worker for the scheduler at ``module:attribute`` until SIGINT/SIGTERM."""
    loaded: list[Scheduler] = []
    # Before importing the application: a signal while it loads stops cleanly too.
    _install_stop_signals(lambda: loaded[0] if loaded else None)
    try:
        loaded.append(load_scheduler(args.scheduler))
        stats = loaded[0].run(
            concurrency=args.concurrency,
            queues=args.queue or None,
            poll_interval=args.poll_interval,
            shutdown_grace=args.shutdown_grace,
        )
    except _StoppedBeforeStart:
        logger.info("worker stopped before it started")
        return EXIT_OK
    logger.info("worker done: %s", stats)
    return EXIT_OK


def cmd_migrate(args: argparse.Namespace) -> int:
    """Install or upgrade the library's tables with its standalone Alembic environment."""
    from sqlalchemy import create_engine
    from sqlalchemy.orm import sessionmaker

    from sqla_pgotask.migrate import upgrade
    from sqla_pgotask.schema import schema_revision

    engine = create_engine(_database_url(args))
    try:
        upgrade(engine, args.revision)
        print(f"sqla_pgotask schema at revision {schema_revision(sessionmaker(engine))}")
    finally:
        engine.dispose()
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    """Run the demo (on an embedded PostgreSQL when no database URL is given)."""
    from sqla_pgotask.demo import run_demo

    return run_demo(args.database_url or os.environ.get(DATABASE_URL_ENV))


def _database_url(args: argparse.Namespace) -> str:
    url: str | None = args.database_url or os.environ.get(DATABASE_URL_ENV)
    if not url:
        raise UsageError(f"no database URL: pass --database-url or set {DATABASE_URL_ENV}")
    return url


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {number}")
    return number


def _positive_float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {value!r}") from None
    if not number > 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {value}")
    return number


def _non_negative_float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {value!r}") from None
    if not number >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return number


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
        type=_positive_int,
        default=None,
        help="handler threads (default: the Scheduler's setting)",
    )
    worker.add_argument(
        "--queue",
        action="append",
        metavar="Q",
        help="serve this queue (repeatable; default: the Scheduler's queues, else all)",
    )
    worker.add_argument(
        "--poll-interval",
        type=_positive_float,
        default=None,
        help="seconds between polls when no notification arrives",
    )
    worker.add_argument(
        "--shutdown-grace",
        type=_non_negative_float,
        default=None,
        help="seconds running tasks get to finish after SIGTERM/SIGINT "
        "(default: the Scheduler's setting)",
    )
    worker.set_defaults(func=cmd_worker)

    migrate = commands.add_parser(
        "migrate",
        help="install or upgrade the tables without your own Alembic",
        description=cmd_migrate.__doc__,
    )
    migrate.add_argument("--database-url", help=f"SQLAlchemy URL (default: ${DATABASE_URL_ENV})")
    migrate.add_argument("--revision", default="heads", help="target revision (default: heads)")
    migrate.set_defaults(func=cmd_migrate)

    demo = commands.add_parser("demo", help="see it work", description=cmd_demo.__doc__)
    demo.add_argument(
        "--database-url",
        help=f"SQLAlchemy URL (default: ${DATABASE_URL_ENV}, else an embedded PostgreSQL)",
    )
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pgotask`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.log_level != "DEBUG":
        logging.getLogger("alembic").setLevel(logging.WARNING)
    try:
        code: int = args.func(args)
    except UsageError as exc:
        parser.exit(EXIT_USAGE, f"pgotask: error: {exc}\n")
    except ConfigurationError as exc:
        parser.exit(EXIT_USAGE, f"pgotask: error: {exc}\n")
    except SchemaError as exc:
        parser.exit(EXIT_SCHEMA, f"pgotask: error: {exc}\n")
    except ArgumentError as exc:
        parser.exit(EXIT_USAGE, f"pgotask: error: {exc}\n")
    except OperationalError as exc:
        reason = str(exc.orig).strip() if exc.orig is not None else str(exc)
        parser.exit(EXIT_UNREACHABLE, f"pgotask: error: cannot use the database: {reason}\n")
    return code


if __name__ == "__main__":
    sys.exit(main())
