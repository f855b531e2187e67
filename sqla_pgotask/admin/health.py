"""The health check: is the fleet running, keeping up, and able to run what is queued?"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from sqla_pgotask._queries import query
from sqla_pgotask.errors import SchemaError
from sqla_pgotask.models import TASK_BIND
from sqla_pgotask.schema import check_schema

# -- health --------------------------------------------------------------------


@dataclass(frozen=True)
class HealthCheck:
    """One check of :func:`health`: its name, whether it passed, and what it found."""

    name: str
    ok: bool
    detail: str
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class HealthReport:
    """Every check :func:`health` ran; ``ok`` when all passed."""

    checks: list[HealthCheck]

    @property
    def ok(self) -> bool:
        """True when every check passed."""
        return all(check.ok for check in self.checks)

    @property
    def schema_ok(self) -> bool:
        """False when the schema is missing or outdated (the other checks did not run)."""
        return all(check.ok for check in self.checks if check.name == "schema")

    @property
    def problems(self) -> list[HealthCheck]:
        """The checks that failed."""
        return [check for check in self.checks if not check.ok]


def health(
    session_factory: sessionmaker[Session],
    *,
    worker_timeout: float | None = 60.0,
    stuck_after: float = 60.0,
    max_age: float | None = None,
) -> HealthReport:
    """Check the schema, live workers, stuck tasks and (optionally) the backlog's age.

    - ``schema``: at the revision this library expects (if not, nothing else is checked);
    - ``workers``: at least one registered worker with a heartbeat in the
      last ``worker_timeout`` seconds (``None`` skips this check);
    - ``handlers``: when there are live workers, every due task has one that
      would claim it: a handler for its kind, serving its queue (skipped with
      the ``workers`` check, and when no worker is live: that check fails);
    - ``slots``: when there are live workers, none has had every handler
      thread stuck (in a handler far past its ``timeout``) for more than
      ``stuck_after`` seconds; threads stuck on a worker that has free ones
      are reported, not failed;
    - ``stuck``: no running task whose lease expired more than
      ``stuck_after`` seconds ago;
    - ``backlog``: with ``max_age``, no due pending task waiting longer than that.
    """
    for name, value in (("worker_timeout", worker_timeout), ("max_age", max_age)):
        if value is not None and not value > 0:
            raise ValueError(f"{name} must be > 0 seconds, got {value!r}")
    if not stuck_after >= 0:
        raise ValueError(f"stuck_after must be 0 seconds or more, got {stuck_after!r}")
    try:
        check_schema(session_factory)
    except SchemaError as exc:
        return HealthReport([HealthCheck("schema", False, str(exc))])
    checks = [HealthCheck("schema", True, "schema at the expected revision")]
    with session_factory() as session:
        if worker_timeout is not None:
            workers = session.execute(
                query("admin_live_workers"),
                {"timeout_seconds": worker_timeout},
                bind_arguments=TASK_BIND,
            ).all()
            ids = [w.id for w in workers]
            checks.append(
                HealthCheck(
                    "workers",
                    bool(workers),
                    f"{len(workers)} live worker(s)"
                    if workers
                    else f"no worker has sent a heartbeat in the last {worker_timeout:g}s",
                    {"live": len(ids), "ids": ids},
                )
            )
            if workers:
                checks.append(_handlers_check(session, worker_timeout))
                checks.append(_slots_check(session, worker_timeout, stuck_after))
        stuck = session.execute(
            query("admin_stuck_tasks"),
            {"stuck_seconds": stuck_after, "limit": 10},
            bind_arguments=TASK_BIND,
        ).all()
        count = int(stuck[0].total) if stuck else 0
        sample = [s.id for s in stuck]
        checks.append(
            HealthCheck(
                "stuck",
                not stuck,
                "no stuck task"
                if not stuck
                else f"{count} running task(s) with a lease expired over {stuck_after:g}s ago "
                f"(ids {', '.join(map(str, sample))}{', ...' if count > len(sample) else ''})",
                {"count": count, "ids": sample},
            )
        )
        if max_age is not None:
            oldest = session.execute(
                query("admin_oldest_due"), bind_arguments=TASK_BIND
            ).one_or_none()
            age = None if oldest is None else float(oldest.age_seconds)
            late = age is not None and age > max_age
            checks.append(
                HealthCheck(
                    "backlog",
                    not late,
                    "no due task waiting"
                    if oldest is None
                    else f"oldest due task {oldest.id} ({oldest.kind}, queue {oldest.queue}) "
                    f"has waited {_waited(age)}"
                    + (f", over the {max_age:g}s allowed" if late else ""),
                    {"oldest_due_seconds": age, "task_id": None if oldest is None else oldest.id},
                )
            )
    return HealthReport(checks)


def _waited(age: float | None) -> str:
    if age is None:
        return "-"
    # A run_at of '-infinity' (plain SQL may insert one) is an infinite age.
    return "forever" if math.isinf(age) else f"{age:.0f}s"


def _slots_check(session: Session, worker_timeout: float, stuck_after: float) -> HealthCheck:
    """``slots``: no live worker has had all its handler threads stuck for over ``stuck_after``."""
    rows = session.execute(
        query("admin_stuck_slots"), {"timeout_seconds": worker_timeout}, bind_arguments=TASK_BIND
    ).all()
    workers = [
        {
            "id": r.id,
            "stuck_slots": int(r.stuck_slots),
            "concurrency": int(r.concurrency),
            "all_stuck_seconds": r.all_stuck_seconds,
        }
        for r in rows
    ]
    if not rows:
        return HealthCheck("slots", True, "no handler thread is stuck", {"workers": []})
    failing = [
        r for r in rows if r.all_stuck_seconds is not None and r.all_stuck_seconds > stuck_after
    ]
    described = "; ".join(
        f"worker {r.id}: {r.stuck_slots} of {r.concurrency} handler threads stuck"
        + (
            f", all of them for {r.all_stuck_seconds:.0f}s"
            if r.all_stuck_seconds is not None
            else ""
        )
        for r in rows
    )
    return HealthCheck(
        "slots",
        not failing,
        described
        + (
            f" (no free thread for over {stuck_after:g}s: restart the worker)"
            if failing
            else " (handlers far past their timeout; the other threads run tasks)"
        ),
        {"workers": workers},
    )


def _handlers_check(session: Session, worker_timeout: float, *, sample: int = 10) -> HealthCheck:
    """``handlers``: the due tasks that no live worker would claim, per kind and queue."""
    rows = session.execute(
        query("admin_unhandled_due"),
        {"timeout_seconds": worker_timeout, "limit": sample},
        bind_arguments=TASK_BIND,
    ).all()
    unhandled = [{"kind": r.kind, "queue": r.queue, "due": int(r.due)} for r in rows]
    if not rows:
        return HealthCheck(
            "handlers", True, "every due task has a live worker to run it", {"unhandled": []}
        )
    found = ", ".join(
        f"kind {r.kind!r} in queue {r.queue!r} ({r.due} due task{'s' if r.due != 1 else ''})"
        for r in rows
    )
    more = int(rows[0].total) - len(rows)
    return HealthCheck(
        "handlers",
        False,
        f"no live worker handles {found}"
        + (f", and {more} more kind and queue pair(s)" if more > 0 else ""),
        {"unhandled": unhandled},
    )
