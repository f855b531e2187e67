"""Claiming due tasks: one source interface, a plain and a limited implementation.

Every runner claims through a :class:`ClaimSource`:

* :class:`PlainClaims` runs the one-statement claim of ``sql/tasks.sql``
  (``claim``, or ``claim_in_queues``): its own short transaction, committed at
  once, so the row locks last for that statement only;
* :class:`LimitedClaims`, for a worker some of whose kinds or queues have a
  fleet-wide limit (see :mod:`.limit_plan`), first takes limited tasks in a
  short locked transaction in which the claimers of a limit take turns
  (``sql/limits.sql``), then fills the rest with the plain claim.

Where the statements run is a :class:`ClaimConnection`: the worker's is one
autocommit connection kept between claims (:class:`KeptConnection`);
``run_until_idle()`` and ``testing.drain()`` take one from the application's
``sessionmaker`` per claim (:class:`SessionConnection`), which, bound to a
Connection already in a transaction (a test's), claims inside it.  The rows
become ``Task`` objects in :mod:`.rows`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any, Protocol

import psycopg
from sqlalchemy import Connection, Engine
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import Session, sessionmaker

from sqla_pgotask._queries import driver_sql, query
from sqla_pgotask.engine.limit_plan import LimitPlan
from sqla_pgotask.engine.rows import Claimed, claim_cursor, driver_connection, take_claimed
from sqla_pgotask.models import Task

logger = logging.getLogger("sqla_pgotask.worker")

# Seconds after a full rate window frees a start that an idle worker claims again.
_RETRY_MARGIN = 0.005
_PIPELINE = psycopg.Pipeline.is_supported()
_AUTOCOMMIT = {"isolation_level": "AUTOCOMMIT"}


# -- where claims run ----------------------------------------------------------


class ClaimConnection(Protocol):
    """Where a source's statements run."""

    def connection(self) -> AbstractContextManager[tuple[Connection, bool]]:
        """A Connection, and whether each claim is its own transaction (autocommit)."""

    def close(self) -> None:
        """Give back what is held (after a failure, or at the end)."""


class KeptConnection:
    """A worker's claims: one autocommit connection, kept between claims.

    Saves a pool checkout, an isolation-level switch and a new Session per
    claim, which is most of a claim's client time when tasks trickle in.  The
    connection is detached from the pool, so it never takes a slot the
    handlers or the application need.  Closed after a failure, and opened
    again by the next claim.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._conn: Connection | None = None

    @contextmanager
    def connection(self) -> Iterator[tuple[Connection, bool]]:
        conn = self._conn
        if conn is None:
            conn = self.engine.connect()
            conn.detach()  # outside the pool, like the LISTEN and heartbeat connections
            # Each claim statement is its own transaction (psycopg autocommit):
            # no BEGIN or COMMIT round trips.
            driver_connection(conn).autocommit = True
            self._conn = conn
        try:
            yield conn, True
        except BaseException:
            self.close()
            raise
        else:
            if conn.in_transaction():  # SQLAlchemy's own bookkeeping: nothing to send
                conn.rollback()

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:
                logger.debug("closing the claim connection failed", exc_info=True)


class SessionConnection:
    """Claims on a connection of the application's ``sessionmaker``, one per claim.

    In autocommit, unless the sessionmaker is bound to a Connection already
    in a transaction (a test's): the claims then run inside it.
    """

    def __init__(self, session_factory: sessionmaker[Session]) -> None:
        self.session_factory = session_factory

    @contextmanager
    def connection(self) -> Iterator[tuple[Connection, bool]]:
        with self.session_factory() as session:
            bind = session.get_bind(mapper=Task.__mapper__)
            standalone = not isinstance(bind, Connection)
            conn = session.connection(
                bind_arguments={"mapper": Task.__mapper__},
                execution_options=_AUTOCOMMIT if standalone else None,
            )
            yield conn, standalone
            session.commit()

    def close(self) -> None:
        return None


# -- the sources ---------------------------------------------------------------


class ClaimSource(Protocol):
    """What a runner claims from."""

    def claim(self, limit: int) -> Claimed:
        """Claim up to ``limit`` due tasks for this runner, in claim order."""

    def next_due(self) -> float | None:
        """Seconds until the next delayed task this source would claim falls due, or ``None``."""

    def release_orphans(self, known: Sequence[int]) -> list[int]:
        """Give back tasks ``running`` under this runner's id that it does not hold."""

    def wait_hint(self) -> float | None:
        """Seconds until a claim may find more by time alone (a rate window), or ``None``."""

    def finished(self, task_ids: Iterable[int]) -> None:
        """These claimed tasks ended (a limited task's slot may be free)."""

    def close(self) -> None:
        """Give back the source's connection."""


class PlainClaims:
    """The one-statement claim (``claim`` or ``claim_in_queues`` in ``sql/tasks.sql``)."""

    def __init__(
        self,
        conns: ClaimConnection,
        *,
        worker_id: str,
        kinds: Mapping[str, int],
        queues: Sequence[str] | None,
        lease_seconds: float,
        excluded_queues: Sequence[str] = (),
    ) -> None:
        self.conns = conns
        self.worker_id = worker_id
        #: Each kind served, and its handler's ``max_attempts`` (taken by a
        #: task without one of its own at its first claim).
        self.kinds = dict(kinds)
        self.queues = None if queues is None else list(queues)
        self.lease_seconds = float(lease_seconds)
        self._name, self._params = _claim_statement(
            worker_id, self.kinds, self.queues, self.lease_seconds, excluded_queues
        )

    def claim(self, limit: int) -> Claimed:
        if limit <= 0 or not self.kinds:
            return Claimed()
        with self.conns.connection() as (conn, _):
            return self.claim_on(conn, limit)

    def claim_on(self, conn: Connection, limit: int) -> Claimed:
        """The claim, on ``conn`` (in a transaction of its own, or the one it is in)."""
        if limit <= 0 or not self.kinds:
            return Claimed()
        driver = driver_connection(conn)
        cursor = claim_cursor(driver)
        cursor.execute(driver_sql(self._name), {**self._params, "limit": limit})
        return take_claimed(driver, cursor, cursor.fetchall(), conn.dialect, self.worker_id)

    def next_due(self) -> float | None:
        return _next_due(self.conns, self.kinds, self.queues)

    def release_orphans(self, known: Sequence[int]) -> list[int]:
        return _release_orphans(self.conns, self.worker_id, known)

    def wait_hint(self) -> float | None:
        return None

    def finished(self, task_ids: Iterable[int]) -> None:
        return None

    def close(self) -> None:
        self.conns.close()


class LimitedClaims:
    """Claims when some of what a runner serves is limited: limited tasks first, then the rest.

    ``gated`` (a worker): after a limited claim that took less than it asked
    for, the next one waits (so a worker whose limits are reached does not
    take their locks in a loop) until the first of:

    * a notification of a new task in a served queue (:meth:`kick`);
    * a limited task of this worker finishing (its slot is free);
    * a full rate window freeing a start (``retry_in`` of the claim);
    * a delayed task falling due (see :meth:`next_due`);
    * ``poll_interval`` (slots freed by other workers, which those workers
      usually take themselves).

    Not gated (``run_until_idle``, ``drain``): every claim tries, and a task
    held back by a limit is left for a later call.
    """

    def __init__(
        self,
        conns: ClaimConnection,
        plan: LimitPlan,
        *,
        worker_id: str,
        lease_seconds: float,
        poll_interval: float | None = None,
    ) -> None:
        self.conns = conns
        self.plan = plan
        self.worker_id = worker_id
        self.lease_seconds = float(lease_seconds)
        self.poll_interval = poll_interval
        #: The plain claim of the tasks no limit holds.
        self.fast = PlainClaims(
            conns,
            worker_id=worker_id,
            kinds=plan.fast_kinds,
            queues=plan.fast_queues,
            lease_seconds=lease_seconds,
            excluded_queues=plan.excluded_queues,
        )
        #: Locked claims made (for tests and diagnostics).
        self.limited_claims = 0
        self._lock = threading.Lock()
        self._open_at = 0.0
        self._kicked = False
        self._mine: set[int] = set()

    def kick(self) -> None:
        """Something changed (a new task, say): the next claim tries the limits again."""
        with self._lock:
            self._kicked = True

    def claim(self, limit: int) -> Claimed:
        if limit <= 0:
            return Claimed()
        plan = self.plan
        with self.conns.connection() as (conn, own_transaction):
            tasks = Claimed()
            if self._due():
                try:
                    tasks = claim_limited(
                        driver_connection(conn),
                        conn.dialect,
                        plan,
                        worker_id=self.worker_id,
                        limit=limit,
                        lease_seconds=self.lease_seconds,
                        own_transaction=own_transaction,
                    )
                except Exception:
                    self.kick()  # try again at the next claim
                    raise
                self.limited_claims += 1
                self._claimed(tasks, limit)
            rest = limit - len(tasks) - tasks.refused
            if rest > 0 and plan.fast:
                tasks = tasks.extend_claim(self.fast.claim_on(conn, rest))
            return tasks

    def next_due(self) -> float | None:
        seconds = _next_due(self.conns, self.plan.kinds, self.plan.queues)
        if seconds is None:
            return None
        due = time.monotonic() + max(seconds, 0.0) + _RETRY_MARGIN
        with self._lock:  # a delayed limited task is claimed when it falls due
            self._open_at = min(self._open_at, due)
        return seconds

    def release_orphans(self, known: Sequence[int]) -> list[int]:
        return _release_orphans(self.conns, self.worker_id, known)

    def wait_hint(self) -> float | None:
        with self._lock:
            if self._kicked:
                return 0.0
            left = self._open_at - time.monotonic()
        return left if left > 0 else None

    def finished(self, task_ids: Iterable[int]) -> None:
        with self._lock:
            freed = False
            for task_id in task_ids:
                if task_id in self._mine:
                    self._mine.discard(task_id)
                    freed = True
            if freed:
                self._kicked = True

    def close(self) -> None:
        self.conns.close()

    def _due(self) -> bool:
        if self.poll_interval is None:
            return True
        with self._lock:
            if self._kicked or time.monotonic() >= self._open_at:
                self._kicked = False
                return True
            return False

    def _claimed(self, tasks: Claimed, wanted: int) -> None:
        if self.poll_interval is None:
            return
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


def claim_source(
    conns: ClaimConnection,
    *,
    worker_id: str,
    kinds: Mapping[str, int],
    queues: Sequence[str] | None,
    lease_seconds: float,
    plan: LimitPlan | None,
    poll_interval: float | None = None,
) -> PlainClaims | LimitedClaims:
    """The source for a runner: limited if ``plan`` (see :func:`.limit_plan.plan_limits`)."""
    if plan is None:
        return PlainClaims(
            conns, worker_id=worker_id, kinds=kinds, queues=queues, lease_seconds=lease_seconds
        )
    return LimitedClaims(
        conns,
        plan,
        worker_id=worker_id,
        lease_seconds=lease_seconds,
        poll_interval=poll_interval,
    )


# -- the statements ------------------------------------------------------------


def _claim_statement(
    worker_id: str,
    kinds: Mapping[str, int],
    queues: Sequence[str] | None,
    lease_seconds: float,
    excluded_queues: Sequence[str],
) -> tuple[str, dict[str, object]]:
    """The name of the plain claim statement and its parameters (but ``limit``).

    ``excluded_queues`` (with ``queues=None`` only): queues whose tasks only
    the limited claim takes.
    """
    params: dict[str, object] = {
        "kinds": list(kinds),
        "max_attempts": list(kinds.values()),
        "worker": worker_id,
        "lease_seconds": lease_seconds,
    }
    if queues is not None:
        params["queues"] = list(queues)
        return "claim_in_queues", params
    params["excluded_queues"] = list(excluded_queues)
    return "claim", params


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


def _next_due(
    conns: ClaimConnection, kinds: Mapping[str, int], queues: Sequence[str] | None
) -> float | None:
    if not kinds:
        return None
    with conns.connection() as (conn, _):
        seconds = conn.execute(
            query("next_due"),
            {"kinds": list(kinds), "queues": None if queues is None else list(queues)},
        ).scalar()
    return None if seconds is None else float(seconds)


def _release_orphans(conns: ClaimConnection, worker_id: str, known: Sequence[int]) -> list[int]:
    with conns.connection() as (conn, _):
        ids = conn.execute(query("release_orphans"), {"worker": worker_id, "known": list(known)})
        return sorted(ids.scalars())
