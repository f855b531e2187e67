"""``pgotask worker``: load the application's Scheduler and run it, or N worker processes.

A signal (SIGINT, SIGTERM) stops the worker after its in-flight tasks; a
second one exits at once.  With ``--processes N`` (N > 1) the command runs a
supervisor (:mod:`sqla_pgotask.worker.supervisor`) instead, whose worker
processes are ``pgotask worker`` commands of their own.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
from collections.abc import Callable
from types import FrameType

from sqla_pgotask._exit_codes import EXIT_OK, UsageError
from sqla_pgotask.cli import metrics
from sqla_pgotask.scheduler import Scheduler
from sqla_pgotask.worker.supervisor import SUPERVISOR_PID_OPTION

logger = logging.getLogger("sqla_pgotask.cli")


def split_scheduler_path(path: str) -> tuple[str, str]:
    """``module:attribute`` as ``(module, attribute)``, or :class:`UsageError`."""
    module_name, sep, attr_path = path.partition(":")
    if not sep or not module_name or not attr_path:
        raise UsageError(
            f"expected 'module:attribute' (like 'myapp.tasks:scheduler'), got {path!r}"
        )
    return module_name, attr_path


def load_scheduler(path: str) -> Scheduler:
    """Import ``module:attribute`` (from the current directory too) and check it is a Scheduler."""
    module_name, attr_path = split_scheduler_path(path)
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


def _install_stop_signals(
    scheduler: Callable[[], Scheduler | None], *, supervised: bool = False
) -> None:
    """SIGINT/SIGTERM stop gracefully; a second one exits at once.

    Under a supervisor, a second signal changes nothing: the same signal may
    well arrive twice (from the terminal or systemd to the whole group, and
    forwarded by the supervisor), and the supervisor escalates with SIGKILL.
    """
    received: list[int] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if received:
            if supervised:
                logger.info(
                    "%s again: already stopping (the supervisor decides when to kill)",
                    signal.Signals(signum).name,
                )
                return
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
    if args.processes > 1:
        return _supervise(args)
    supervised = args.supervisor_pid is not None
    loaded: list[Scheduler] = []

    def current() -> Scheduler | None:
        return loaded[0] if loaded else None

    try:
        # Before importing the application: a signal while it loads stops cleanly
        # too. Inside the try: a signal may arrive the moment the handler is set.
        _install_stop_signals(current, supervised=supervised)
        if supervised:
            from sqla_pgotask.worker.supervisor import watch_supervisor

            watch_supervisor(args.supervisor_pid, args.ready_fd, current)
        prometheus = metrics.load(args) if metrics.wanted(args) else None
        loaded.append(load_scheduler(args.scheduler))
        if prometheus is not None:
            metrics.instrument(prometheus, loaded[0])
            if args.metrics_port is not None:
                metrics.serve(prometheus, args)
        stats = loaded[0].run(
            concurrency=args.concurrency,
            queues=_served_queues(args.queue, args.concurrency or loaded[0].settings.concurrency),
            poll_interval=args.poll_interval,
            shutdown_grace=args.shutdown_grace,
        )
    except _StoppedBeforeStart:
        logger.info("worker stopped before it started")
        return EXIT_OK
    logger.info("worker done: %s", stats)
    return EXIT_OK


def _served_queues(
    specs: list[tuple[str, int | None]] | None, concurrency: int
) -> list[str] | dict[str, int] | None:
    """``--queue`` values: names, or ``{name: concurrency}`` once one says ``NAME=N``."""
    if not specs:
        return None
    if all(n is None for _, n in specs):
        return list(dict.fromkeys(name for name, _ in specs))
    return {name: concurrency if n is None else n for name, n in specs}


def _supervise(args: argparse.Namespace) -> int:
    """``pgotask worker --processes N``: run N worker processes under a supervisor."""
    from sqla_pgotask.worker.supervisor import ChildFailedError, Supervisor

    if args.supervisor_pid is not None:
        raise UsageError(f"{SUPERVISOR_PID_OPTION} is for worker processes run by a supervisor")
    if not hasattr(signal, "SIGCHLD"):
        raise UsageError("--processes needs POSIX signals; run one 'pgotask worker' per process")
    split_scheduler_path(args.scheduler)  # fail now, not in N processes
    try:
        with metrics.supervisor_metrics(args) as (metrics_args, on_exit):
            worker_args = _worker_process_args(args) + metrics_args
            return Supervisor(worker_args, args.processes, on_exit=on_exit).run()
    except ChildFailedError as exc:
        print(f"pgotask: error: {exc}", file=sys.stderr)
        return exc.code


def _worker_process_args(args: argparse.Namespace) -> list[str]:
    """The arguments of one worker process: these, without ``--processes``
    (nor ``--metrics-port``: the supervisor serves the metrics).

    Every ``pgotask worker`` option must be passed on here.  ``--opt=value``
    keeps a value that starts with a dash (a queue name) from reading as an
    option.
    """
    argv = [f"--log-level={args.log_level}", "worker", args.scheduler]
    if args.concurrency is not None:
        argv.append(f"--concurrency={args.concurrency}")
    argv.extend(
        f"--queue={name}" if n is None else f"--queue={name}={n}" for name, n in args.queue or ()
    )
    if args.poll_interval is not None:
        argv.append(f"--poll-interval={args.poll_interval!r}")
    if args.shutdown_grace is not None:
        argv.append(f"--shutdown-grace={args.shutdown_grace!r}")
    return argv
