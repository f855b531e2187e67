"""Heartbeats and rescue: how a worker keeps its tasks and finds other workers' lost ones.

A thread with a connection of its own (outside the application's pool, so a
busy pool never delays a heartbeat) does two things:

* every ``heartbeat_interval``: one statement that extends the leases of the
  attempts this worker is running, refreshes its row in ``pgotask_worker``
  and reports cancellation requests;
* every ``maintenance_interval`` (with jitter): prune workers that stopped
  heart-beating or whose process is gone from this node, and, in the same
  transaction, give back running tasks whose lease expired or whose worker
  was just pruned;
* every ``Retention.interval`` (with jitter), if no other worker is doing it:
  delete finished tasks past their status's retention period, in batches.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache

import psycopg
from sqlalchemy import Engine

from sqla_pgotask._queries import driver_sql
from sqla_pgotask.config.handlers import DEFAULT_MAX_ATTEMPTS
from sqla_pgotask.config.retention import Retention
from sqla_pgotask.context import AttemptContext
from sqla_pgotask.worker.connections import Connection, dedicated_connection
from sqla_pgotask.worker.pruning import apply_retention

logger = logging.getLogger("sqla_pgotask.worker")

RESCUE_BATCH = 500


@cache
def node_id() -> str:
    """This kernel boot and pid namespace: processes with the same node id see each other's pids."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        pid_ns = os.readlink("/proc/self/ns/pid")
    except OSError:  # not Linux: fall back to the host name alone
        return f"host:{socket.gethostname()}"
    return f"{boot}/{pid_ns}"


def pid_alive(pid: int) -> bool:
    """Whether a live process (not a zombie waiting to be reaped) has this pid on this node."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        with open(f"/proc/{pid}/stat") as f:
            # "pid (comm) state ...": comm may hold spaces and parentheses.
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return True


@dataclass(frozen=True)
class Identity:
    """How a worker registers itself."""

    id: str
    host: str
    pid: int
    node: str
    kinds: Sequence[str]
    queues: Sequence[str] | None
    concurrency: int

    def params(self) -> dict[str, object]:
        """The registry columns as query parameters."""
        return {
            "worker": self.id,
            "host": self.host,
            "pid": self.pid,
            "node": self.node,
            "kinds": list(self.kinds),
            "queues": None if self.queues is None else list(self.queues),
            "concurrency": self.concurrency,
        }


@dataclass(frozen=True)
class Timing:
    """Lease and maintenance periods, in seconds."""

    lease: float
    heartbeat_interval: float
    maintenance_interval: float
    #: A worker silent for this long is considered dead and its tasks rescued.
    dead_after: float


def heartbeat(
    conn: Connection,
    identity: Identity,
    timing: Timing,
    attempts: Sequence[AttemptContext],
    stuck_slots: int = 0,
) -> None:
    """Extend the leases of ``attempts`` this worker still owns; flag lost and cancelled ones.

    Attempts past their timeout are not extended: their lease runs out and
    another worker rescues the task while this one's handler overruns.
    ``stuck_slots`` (handler threads stuck past a timeout) goes to the registry.
    """
    live = [a for a in attempts if not a.timed_out]
    params = identity.params()
    params.update(
        ids=[a.task_id for a in live],
        attempts=[a.attempt for a in live],
        lease_seconds=timing.lease,
        stuck_slots=stuck_slots,
    )
    rows = conn.execute(driver_sql("heartbeat"), params).fetchall()
    owned = {task_id: cancel for task_id, cancel in rows}
    for attempt in live:
        if attempt.task_id not in owned:
            attempt.mark_lost()
        elif owned[attempt.task_id]:
            attempt.request_cancel()


def maintain(conn: Connection, identity: Identity, timing: Timing) -> list[int]:
    """Prune dead workers and rescue lost tasks; return the rescued task ids."""
    peers = conn.execute(
        driver_sql("node_peers"), {"node": identity.node, "worker": identity.id}
    ).fetchall()
    dead = [worker_id for worker_id, pid in peers if not pid_alive(pid)]
    rescued: list[int] = []
    with conn.transaction():
        gone = [
            row[0]
            for row in conn.execute(
                driver_sql("prune_workers"),
                {"worker": identity.id, "dead_after": timing.dead_after, "dead": dead},
            )
        ]
        if gone:
            logger.warning("workers gone: %s", ", ".join(gone))
        while True:
            batch = [
                row[0]
                for row in conn.execute(
                    driver_sql("rescue"),
                    {
                        "gone": gone,
                        "limit": RESCUE_BATCH,
                        "default_max_attempts": DEFAULT_MAX_ATTEMPTS,
                        "worker": identity.id,
                    },
                )
            ]
            rescued.extend(batch)
            if len(batch) < RESCUE_BATCH:
                break
    if rescued:
        logger.warning("rescued %d lost tasks: %s", len(rescued), rescued[:20])
    return rescued


class Maintenance:
    """The heartbeat and maintenance thread of one worker."""

    def __init__(
        self,
        engine: Engine,
        identity: Identity,
        timing: Timing,
        attempts: Callable[[], Sequence[AttemptContext]],
        on_rescue: Callable[[], None] | None = None,
        retention: Retention | None = None,
    ) -> None:
        self._engine = engine
        self.retention = retention
        self.identity = identity
        self.timing = timing
        self._attempts = attempts
        self._on_rescue = on_rescue
        #: Handler threads the worker counts as stuck, reported with each heartbeat.
        self.stuck_slots = 0
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pgotask-maintenance", daemon=True)

    def start(self) -> None:
        """Start the thread."""
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread and close its connection."""
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join()

    @staticmethod
    def _retain(conn: Connection, retention: Retention) -> None:
        try:
            apply_retention(conn, retention)
        except psycopg.Error as exc:
            if conn.closed or conn.broken:
                raise
            # Say, a foreign key of the application's that forbids deleting a
            # task: heartbeats go on; the next pass tries again.
            logger.warning("retention pass failed: %s", exc)

    def _run(self) -> None:
        backoff = 0.1
        next_maintenance = time.monotonic() + random.uniform(0, self.timing.maintenance_interval)
        retention = self.retention
        # The first pass soon after start (a restarted fleet catches up), then
        # every interval with jitter, so workers started together spread out.
        next_retention = time.monotonic() + random.uniform(
            0, min(self.timing.maintenance_interval, retention.interval) if retention else 0
        )
        while not self._stopping.is_set():
            try:
                with dedicated_connection(self._engine) as conn:
                    backoff = 0.1
                    while not self._stopping.is_set():
                        heartbeat(
                            conn, self.identity, self.timing, self._attempts(), self.stuck_slots
                        )
                        if time.monotonic() >= next_maintenance:
                            if maintain(conn, self.identity, self.timing) and self._on_rescue:
                                self._on_rescue()
                            next_maintenance = (
                                time.monotonic()
                                + self.timing.maintenance_interval * (0.8 + 0.4 * random.random())
                            )
                        if retention is not None and time.monotonic() >= next_retention:
                            self._retain(conn, retention)
                            next_retention = time.monotonic() + retention.interval * (
                                0.8 + 0.4 * random.random()
                            )
                        # Wake for whichever comes first: the next heartbeat or maintenance.
                        until_maintenance = max(0.0, next_maintenance - time.monotonic())
                        self._stopping.wait(min(self.timing.heartbeat_interval, until_maintenance))
            except Exception as exc:
                if self._stopping.is_set():
                    return
                logger.warning(
                    "heartbeat connection failed (%s); reconnecting in %.1fs", exc, backoff
                )
                self._stopping.wait(backoff)
                # Never longer than a heartbeat: leases must be renewed as
                # soon as the database is back.
                backoff = min(backoff * 2, self.timing.heartbeat_interval)
