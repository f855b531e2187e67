"""Running due tasks in the caller's thread until none is left: ``Scheduler.run_until_idle()``.

The engine's loop (:mod:`sqla_pgotask.engine.loop`) with claims through the
application's ``sessionmaker``: no handler threads, no heartbeats, no
``LISTEN``.  For tests, scripts and cron jobs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from sqlalchemy import Connection, Engine
from sqlalchemy.orm import Session, sessionmaker

from sqla_pgotask.config.handlers import Handler
from sqla_pgotask.config.limits import QueueLimit
from sqla_pgotask.engine.claims import SessionConnection, claim_source
from sqla_pgotask.engine.limit_plan import plan_limits
from sqla_pgotask.engine.loop import TaskLoop
from sqla_pgotask.engine.run import BatchLimits, BatchRunner
from sqla_pgotask.middleware import Hooks
from sqla_pgotask.worker.settings import task_bind
from sqla_pgotask.worker.threaded import WorkerSettings, new_worker_id


def run_until_idle(
    session_factory: sessionmaker[Session],
    handlers: Mapping[str, Handler],
    settings: WorkerSettings,
    *,
    queues: Sequence[str] | None,
    queue_limits: Mapping[str, QueueLimit],
    hooks: Hooks,
    batch_size: int,
    max_tasks: int | None,
) -> int:
    """Run the due tasks of ``queues`` (``None``: all) until none is left; how many attempts ran."""
    limits = BatchLimits(
        size=batch_size,
        window=settings.batch.window,
        savepoints=settings.batch.savepoints,
        slow=settings.batch.slow,
    )
    loop = session_loop(
        session_factory,
        task_bind(session_factory),
        handlers,
        new_worker_id(),
        limits,
        queues=queues,
        queue_limits=queue_limits,
        lease_seconds=settings.timing.lease,
        hooks=hooks,
    )
    return loop.run_until_idle(batch_size=batch_size, max_tasks=max_tasks)


def session_loop(
    session_factory: sessionmaker[Session],
    bind: Engine | Connection,
    handlers: Mapping[str, Handler],
    worker_id: str,
    limits: BatchLimits,
    *,
    queues: Sequence[str] | None,
    queue_limits: Mapping[str, QueueLimit],
    lease_seconds: float,
    hooks: Hooks,
) -> TaskLoop:
    """The engine's loop in the caller's thread, claiming through ``session_factory``.

    Fleet-wide limits hold as in a worker, and are never waited for (the
    claims are not gated).  :func:`run_until_idle` and ``testing.drain()``
    drive it.
    """
    runner = BatchRunner(session_factory, bind, handlers, worker_id, limits, hooks=hooks)
    source = claim_source(
        SessionConnection(session_factory),
        worker_id=worker_id,
        kinds={kind: h.max_attempts for kind, h in handlers.items()},
        queues=queues,
        lease_seconds=lease_seconds,
        plan=plan_limits(handlers, queue_limits, queues),
    )
    return TaskLoop(source, runner, handlers)
