"""Pausing and resuming queues across the whole fleet.

A paused queue stays paused in the database (``pgotask_queue``), so every
worker on every host skips it from its next claim on, and a worker started
later skips it too, until it is resumed::

    from sqla_pgotask import pause_queue, resume_queue

    with Session.begin() as session:
        pause_queue(session, "emails")    # takes effect when this commits

    with Session.begin() as session:
        resume_queue(session, "emails")   # idle workers are woken at commit

Tasks can still be added to a paused queue; tasks already running finish.
The same from plain SQL: ``SELECT pgotask_pause_queue('emails')`` and
``SELECT pgotask_resume_queue('emails')``, or from the shell:
``pgotask queue pause emails``.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from sqla_pgotask.errors import ConfigurationError
from sqla_pgotask.models import QueueState

__all__ = ["pause_queue", "paused_queues", "resume_queue"]


def pause_queue(session: Session, queue: str) -> dt.datetime:
    """Pause ``queue`` fleet-wide, in ``session``'s transaction; return when it was paused.

    Pausing a paused queue keeps its original time.  Workers stop claiming
    its tasks once the transaction commits; running tasks finish.
    """
    _check_name(queue)
    paused: dt.datetime = session.execute(
        select(func.pgotask_pause_queue(queue)), bind_arguments={"mapper": QueueState}
    ).scalar_one()
    return paused


def resume_queue(session: Session, queue: str) -> bool:
    """Resume ``queue``, in ``session``'s transaction; ``False`` if it was not paused.

    At commit, the workers serving the queue are woken and claim its due tasks.
    """
    _check_name(queue)
    resumed = session.execute(
        select(func.pgotask_resume_queue(queue)), bind_arguments={"mapper": QueueState}
    ).scalar_one_or_none()
    return bool(resumed)


def paused_queues(session: Session) -> dict[str, dt.datetime]:
    """The paused queues, by name, with the time each was paused."""
    rows = session.execute(
        select(QueueState.name, QueueState.paused_at)
        .where(QueueState.paused_at.is_not(None))
        .order_by(QueueState.name)
    )
    return {name: paused_at for name, paused_at in rows if paused_at is not None}


def _check_name(queue: object) -> None:
    if not isinstance(queue, str) or not queue:
        raise ConfigurationError(f"a queue name must be a non-empty string, not {queue!r}")
