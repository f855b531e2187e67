"""Enqueueing many tasks at once.

``session.add(Task(...))`` is the way to enqueue; for thousands of tasks in one
transaction, :func:`add_many` inserts them with a single statement::

    from sqla_pgotask import Task, add_many

    with Session.begin() as session:
        add_many(session, [Task(kind="resize", payload={"image": i}) for i in ids])

The tasks exist exactly when the transaction commits, as with ``session.add``,
and workers are woken once per queue, not once per task.  The ``Task``
objects are only read: they are not added to the Session and get no ids.
"""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy.orm import Session

from sqla_pgotask._queries import query
from sqla_pgotask.errors import InvalidPayloadError
from sqla_pgotask.models import Task, dump_payload


def add_many(session: Session, tasks: Iterable[Task]) -> int:
    """Insert ``tasks`` in ``session``'s transaction with one statement; return how many.

    Payloads are checked as at flush: one that is not JSON-serialisable raises
    :class:`~sqla_pgotask.InvalidPayloadError` naming its kind, and nothing is
    inserted.  A duplicate live ``(kind, dedup_key)`` fails the statement like
    a duplicate ``session.add`` fails the flush.
    """
    columns: dict[str, list[object]] = {
        "kinds": [],
        "queues": [],
        "payloads": [],
        "priorities": [],
        "run_ats": [],
        "max_attempts": [],
        "dedup_keys": [],
    }
    for task in tasks:
        if not isinstance(task, Task):
            raise TypeError(f"add_many() takes Task objects, not {type(task).__name__}")
        if not task.kind:
            raise InvalidPayloadError("add_many(): every task needs a kind")
        columns["kinds"].append(task.kind)
        columns["queues"].append(task.queue)
        payload = task.payload
        columns["payloads"].append(None if payload is None else dump_payload(task.kind, payload))
        columns["priorities"].append(task.priority)
        columns["run_ats"].append(task.run_at)
        columns["max_attempts"].append(task.max_attempts)
        columns["dedup_keys"].append(task.dedup_key)
    count = len(columns["kinds"])
    if count:
        session.execute(query("bulk_insert"), columns)
    return count
