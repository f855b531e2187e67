"""Fleet-wide limits, enforced: what a worker claims under them, and how.

The limits are declared with the types of :mod:`sqla_pgotask.limits` and
enforced in SQL, across every worker that declares them (see
``sql/limits.sql`` and ``docs/limits.md``).  Tasks subject to no limit are
claimed exactly as before, by the one-statement claim of :mod:`._claim`;
tasks subject to a limit go through a short locked transaction in which the
claimers of a limit take turns.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import psycopg
from sqlalchemy import Connection, Engine
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import Session, sessionmaker

from sqla_pgotask._claim import (
    Claimed,
    Claimer,
    claim_cursor,
    claim_tasks,
    driver_connection,
    take_claimed,
)
from sqla_pgotask._connections import driver_sql
from sqla_pgotask.limits import QueueLimit, RateLimit
from sqla_pgotask.models import Task

if TYPE_CHECKING:
    from sqla_pgotask.handlers import Handler

logger = logging.getLogger("sqla_pgotask.worker")

# Seconds after a full rate window frees a start that an idle worker claims again.
_RETRY_MARGIN = 0.005


# -- what a worker claims, and how ---------------------------------------------


@dataclass(frozen=True)
class Limit:
    """One limit: its row's key, what it applies to, and its settings."""

    key: str
    kind: str | None
    queue: str | None
    max_running: int | None
    rate: RateLimit | None


@dataclass(frozen=True)
class LimitPlan:
    """How a worker claims when some of what it serves is limited.

    Limited tasks (of a limited kind, or in a limited queue) are claimed by
    the locked claim; every other task by the usual one-statement claim
    (``fast_kinds`` and ``fast_queues``), or, when the worker serves every
    queue and some queues are limited, by that claim without those queues.
    """

    limits: tuple[Limit, ...]
    kinds: Mapping[str, int]
    queues: tuple[str, ...] | None
    fast_kinds: Mapping[str, int]
    fast_queues: tuple[str, ...] | None
    excluded_queues: tuple[str, ...]

    @property
    def keys(self) -> list[str]:
        """The keys of the limit rows, sorted (the order they are locked in)."""
        return [limit.key for limit in self.limits]

    @property
    def fast(self) -> bool:
        """Whether some tasks this worker serves are subject to no limit."""
        return bool(self.fast_kinds) and (self.fast_queues is None or bool(self.fast_queues))

    def claim_params(self, worker_id: str, limit: int, lease_seconds: float) -> dict[str, object]:
        """The parameters of ``limits_claim``."""
        return {
            "keys": self.keys,
            "key_kinds": [limit.kind for limit in self.limits],
            "key_queues": [limit.queue for limit in self.limits],
            "max_running": [limit.max_running for limit in self.limits],
            "rate_counts": [None if lm.rate is None else lm.rate.count for lm in self.limits],
            "rate_pers": [None if lm.rate is None else lm.rate.per for lm in self.limits],
            "kinds": list(self.kinds),
            "max_attempts": list(self.kinds.values()),
            "queues": None if self.queues is None else list(self.queues),
            "limit": limit,
            "worker": worker_id,
            "lease_seconds": float(lease_seconds),
        }


def plan_limits(
    handlers: Mapping[str, Handler],
    queue_limits: Mapping[str, QueueLimit],
    queues: Sequence[str] | None,
) -> LimitPlan | None:
    """The plan of a worker serving ``handlers`` and ``queues``; ``None`` if nothing is limited."""
    kinds = {kind: h.max_attempts for kind, h in sorted(handlers.items())}
    served = None if queues is None else tuple(queues)
    limits: list[Limit] = []
    for kind, handler in sorted(handlers.items()):
        if handler.max_running is not None or handler.rate_limit is not None:
            limits.append(
                Limit(f"kind:{kind}", kind, None, handler.max_running, handler.rate_limit)
            )
    limited_queues = sorted(q for q in queue_limits if served is None or q in served)
    for name in limited_queues:
        ql = queue_limits[name]
        limits.append(Limit(f"queue:{name}", None, name, ql.max_running, ql.rate_limit))
    if not limits:
        return None
    limits.sort(key=lambda limit: limit.key)
    limited_kinds = {limit.kind for limit in limits if limit.kind is not None}
    return LimitPlan(
        limits=tuple(limits),
        kinds=kinds,
        queues=served,
        fast_kinds={k: m for k, m in kinds.items() if k not in limited_kinds},
        fast_queues=None if served is None else tuple(q for q in served if q not in queue_limits),
        excluded_queues=tuple(limited_queues) if served is None else (),
    )


# -- the locked claim ----------------------------------------------------------

_PIPELINE = psycopg.Pipeline.is_supported()


def claim_limited(
    conn: psycopg.Connection[Any],
    dialect: Dialect,
    plan: LimitPlan,
    *,
    worker_id: str,
    limit: int,
    lease_seconds: float,
    own_transaction: bool = True,
) -> Claimed:
    """Claim up to ``limit`` limited tasks on ``conn``; return them and when to try again.

    ``conn`` is in autocommit mode (``own_transaction``): the claim is its
    own READ COMMITTED transaction, its statements sent together in one
    round trip (pipeline mode, where libpq supports it).  Otherwise the
    statements join the transaction ``conn`` is in, and its end releases
    the locks.  The result's ``retry_in`` is the seconds until a full rate
    window frees a start, or ``None``.
    """
    keys = {"keys": plan.keys}
    params = plan.claim_params(worker_id, limit, lease_seconds)
    batch: AbstractContextManager[object] = conn.pipeline() if _PIPELINE else nullcontext()
    cursor = claim_cursor(conn)
    try:
        with batch:
            if own_transaction:
                conn.execute("BEGIN ISOLATION LEVEL READ COMMITTED")
            conn.execute(driver_sql("limits_ensure"), keys)
            conn.execute(driver_sql("limits_lock"), keys)
            cursor.execute(driver_sql("limits_claim"), params)
            if own_transaction:
                conn.execute("COMMIT")
        rows = cursor.fetchall()
    except BaseException:
        if own_transaction and conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            try:
                conn.execute("ROLLBACK")
            except Exception:
                logger.debug("rolling back a failed limited claim failed", exc_info=True)
        raise
    return take_claimed(conn, cursor, rows, dialect, worker_id)


def claim_tasks_within_limits(
    session_factory: sessionmaker[Session],
    plan: LimitPlan,
    *,
    worker_id: str,
    limit: int,
    lease_seconds: float,
) -> Claimed:
    """As :func:`~sqla_pgotask._claim.claim_tasks`, for a scheduler with limits.

    The limited tasks are claimed first; the rest of ``limit`` goes to the
    usual claim.  Used by ``run_until_idle()``, which never waits for a
    limit: a task held back by one is left for a later call.
    """
    if limit <= 0:
        return Claimed()
    with session_factory() as session:
        bind = session.get_bind(mapper=Task.__mapper__)
        standalone = not isinstance(bind, Connection)
        options = {"isolation_level": "AUTOCOMMIT"} if standalone else {}
        connection = session.connection(execution_options=options)
        tasks = claim_limited(
            driver_connection(connection),
            connection.dialect,
            plan,
            worker_id=worker_id,
            limit=limit,
            lease_seconds=lease_seconds,
            own_transaction=standalone,
        )

        rest = limit - len(tasks) - tasks.refused
        if rest > 0 and plan.fast:
            tasks = tasks.extend_claim(
                claim_tasks(
                    session_factory,
                    worker_id=worker_id,
                    kinds=plan.fast_kinds,
                    queues=plan.fast_queues,
                    limit=rest,
                    lease_seconds=lease_seconds,
                    excluded_queues=plan.excluded_queues,
                )
            )
        session.commit()
    return tasks


# -- a worker's limited claims --------------------------------------------------


class _Notice(threading.Event):
    """The event the listener sets on a notification: wakes the claim loop, opens the gate."""

    def __init__(self, wake: threading.Event, on_notice: Callable[[], None]) -> None:
        super().__init__()
        self._wake = wake
        self._on_notice = on_notice

    def set(self) -> None:
        self._on_notice()
        super().set()
        self._wake.set()


class LimitedClaims:
    """A worker's claims when some of what it serves is limited.

    Each claim of the claim loop first claims limited tasks (a short locked
    transaction on a connection of its own, outside the pool), then fills
    the rest of the free capacity with the usual claim.  After a limited
    claim that took less than it asked for, the next one waits (so a worker
    whose limits are reached does not take their locks in a loop) until the
    first of:

    * a notification of a new task in a served queue;
    * a limited task of this worker finishing (its slot is free);
    * a full rate window freeing a start (``retry_in`` of the claim);
    * a delayed task falling due (see :meth:`next_due`);
    * ``poll_interval`` (slots freed by other workers, which those workers
      usually take themselves).
    """

    def __init__(
        self,
        engine: Engine,
        plan: LimitPlan,
        *,
        poll_interval: float,
        wake: threading.Event,
    ) -> None:
        self.engine = engine
        self.plan = plan
        self.poll_interval = poll_interval
        self.notice: threading.Event = _Notice(wake, self._kick)
        #: Locked claims made (for tests and diagnostics).
        self.limited_claims = 0
        self._lock = threading.Lock()
        self._open_at = 0.0
        self._kicked = False
        self._mine: set[int] = set()
        # A connection of its own, kept like the usual claim's.
        self._own = Claimer(engine)

    def _kick(self) -> None:
        with self._lock:
            self._kicked = True

    def finished(self, task_ids: Iterable[int]) -> None:
        """Tasks of this worker ended: if one was limited, its slot is free."""
        with self._lock:
            freed = False
            for task_id in task_ids:
                if task_id in self._mine:
                    self._mine.discard(task_id)
                    freed = True
            if freed:
                self._kicked = True

    def wait_hint(self) -> float | None:
        """Seconds until the next limited claim is due by time alone, if it waits."""
        with self._lock:
            if self._kicked:
                return 0.0
            left = self._open_at - time.monotonic()
        return left if left > 0 else None

    def _due(self) -> bool:
        with self._lock:
            if self._kicked or time.monotonic() >= self._open_at:
                self._kicked = False
                return True
            return False

    def _claimed(self, tasks: Claimed, wanted: int) -> None:
        retry_in = tasks.retry_in
        with self._lock:
            self._mine.update(task.id for task in tasks)
            if len(tasks) + tasks.refused >= wanted:
                self._open_at = 0.0  # held back by the worker's capacity only
                return
            wait = self.poll_interval
            if retry_in is not None:
                wait = min(wait, max(retry_in, 0.0) + _RETRY_MARGIN)
            self._open_at = time.monotonic() + wait

    def _connection(self) -> Session:
        return self._own.session()

    def claim(
        self,
        claimer: Claimer,
        *,
        worker_id: str,
        limit: int,
        lease_seconds: float,
    ) -> Claimed:
        """Claim up to ``limit`` tasks: limited ones first (when due), then the others."""
        if limit <= 0:
            return Claimed()
        plan = self.plan
        tasks = Claimed()
        if self._due():
            session = self._connection()
            try:
                bind = session.connection()
                tasks = claim_limited(
                    driver_connection(bind),
                    bind.dialect,
                    plan,
                    worker_id=worker_id,
                    limit=limit,
                    lease_seconds=lease_seconds,
                )
            except Exception:
                self._kick()  # try again at the next claim
                self.close()
                raise
            self.limited_claims += 1
            self._claimed(tasks, limit)

        rest = limit - len(tasks) - tasks.refused
        if rest <= 0 or not plan.fast:
            return tasks
        return tasks.extend_claim(
            claimer.claim(
                worker_id=worker_id,
                kinds=plan.fast_kinds,
                queues=plan.fast_queues,
                limit=rest,
                lease_seconds=lease_seconds,
                excluded_queues=plan.excluded_queues,
            )
        )

    def next_due(self, kinds: Mapping[str, int], queues: Sequence[str] | None) -> float | None:
        """Seconds until the next delayed task of ``kinds`` becomes due, or ``None``."""
        seconds = self._own.next_due(kinds, queues)
        if seconds is None:
            return None
        due = time.monotonic() + max(seconds, 0.0) + _RETRY_MARGIN
        with self._lock:  # a delayed limited task is claimed when it falls due
            self._open_at = min(self._open_at, due)
        return seconds

    def close(self) -> None:
        """Give the connection back (after a failure, or when the worker stops)."""
        self._own.close()
