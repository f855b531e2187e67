"""``pgotask worker --metrics-port``: the Prometheus endpoint of a worker, or of a supervisor.

One worker process serves its own metrics.  Under a supervisor
(``--processes N``), the worker processes write theirs in a directory the
supervisor made (prometheus_client's multiprocess mode, passed to them with
the hidden ``--metrics-dir``) and the supervisor serves them all on the one
port.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import ModuleType

from sqla_pgotask.scheduler import Scheduler

logger = logging.getLogger("sqla_pgotask.cli")

#: Hidden option of ``pgotask worker``: the supervisor's multiprocess metrics directory.
METRICS_DIR_OPTION = "--metrics-dir"


class MetricsError(Exception):
    """The metrics endpoint cannot be had: a usage error (exit code 2)."""


class MetricsUnavailableError(MetricsError):
    """The ``prometheus`` extra is not installed."""


def wanted(args: argparse.Namespace) -> bool:
    """Whether this ``pgotask worker`` serves or writes metrics."""
    return args.metrics_port is not None or args.metrics_dir is not None


def load(args: argparse.Namespace) -> ModuleType:
    """:mod:`sqla_pgotask.prometheus`, set up for this process (before the application loads).

    A worker process of a supervisor switches prometheus_client to
    multiprocess mode first: it reads the environment once, when imported.
    """
    if args.metrics_dir is not None:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = args.metrics_dir
    try:
        from sqla_pgotask import prometheus
    except ImportError as exc:
        if exc.name is None or not exc.name.startswith("prometheus_client"):
            raise
        raise MetricsUnavailableError(
            "--metrics-port needs prometheus_client: pip install 'sqla-pgotask[prometheus]'"
        ) from exc
    return prometheus


def instrument(prometheus: ModuleType, scheduler: Scheduler) -> None:
    """Count the scheduler's attempts, unless the application already does."""
    if not prometheus.is_instrumented(scheduler):
        prometheus.instrument(scheduler)


def serve(prometheus: ModuleType, args: argparse.Namespace, registry: object = None) -> None:
    """Serve ``/metrics`` on ``--metrics-host``:``--metrics-port``; :class:`MetricsError` if not."""
    try:
        server, _ = prometheus.start_http_server(args.metrics_port, args.metrics_host, registry)
    except OSError as exc:
        raise MetricsError(
            f"cannot serve metrics on {args.metrics_host}:{args.metrics_port}: {exc}"
        ) from exc
    logger.info("serving metrics on http://%s:%d/metrics", args.metrics_host, server.server_port)


@contextmanager
def supervisor_metrics(
    args: argparse.Namespace,
) -> Iterator[tuple[list[str], Callable[[int], None] | None]]:
    """For a supervisor: the worker processes' extra arguments, and what to call when one exits.

    Serves the directory's metrics for as long as the block runs, and removes
    the directory afterwards.
    """
    if args.metrics_port is None:
        yield [], None
        return
    prometheus = load(args)
    path = tempfile.mkdtemp(prefix="pgotask-metrics-")
    try:
        serve(prometheus, args, prometheus.multiprocess_registry(path))

        def exited(pid: int) -> None:
            prometheus.mark_process_dead(pid, path)

        yield [f"{METRICS_DIR_OPTION}={path}"], exited
    finally:
        shutil.rmtree(path, ignore_errors=True)
