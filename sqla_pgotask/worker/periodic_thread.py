"""The ``pgotask-periodic`` thread: enqueues a worker's periodic schedules on time.

It holds a connection of its own (outside the application's pool) and
sleeps until the next slot of any of its schedules, by the database clock:
each enqueue step reads ``clock_timestamp()``, and the thread keeps the
offset between that clock and its own monotonic clock.  Every worker that
runs a schedule's kind wakes at the same slot; one of them locks the
schedule's row and enqueues, the others skip it (``SKIP LOCKED``), and the
``(schedule, slot)`` unique index makes one task per slot whatever happens.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import Engine

from sqla_pgotask._queries import driver_sql
from sqla_pgotask.config.schedule import Schedule
from sqla_pgotask.worker.connections import Connection, dedicated_connection
from sqla_pgotask.worker.periodic import Execute, Tick, enqueue_due

logger = logging.getLogger("sqla_pgotask.periodic")

# Wake this long after a slot, so that the database clock has passed it.
_MARGIN = 0.002
# Check the clock at least this often, however far the next slot is.
_MAX_SLEEP = 60.0
_MAX_BACKOFF = 5.0


def _driver_execute(conn: Connection) -> Execute:
    def execute(name: str, params: Mapping[str, Any]) -> Sequence[Sequence[Any]]:
        cursor = conn.execute(driver_sql(name), dict(params))
        return cursor.fetchall() if cursor.description is not None else []

    return execute


class PeriodicThread:
    """Enqueues the due slots of ``schedules`` until stopped."""

    def __init__(self, engine: Engine, schedules: Sequence[Schedule]) -> None:
        self._engine = engine
        self.schedules = list(schedules)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pgotask-periodic", daemon=True)

    def start(self) -> None:
        """Start the thread."""
        logger.info(
            "periodic: enqueueing %d schedules: %s",
            len(self.schedules),
            ", ".join(f"{s.name} ({s.expression}, {s.timezone})" for s in self.schedules),
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread (after its current step) and close its connection."""
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        backoff = 0.1
        while not self._stopping.is_set():
            try:
                with dedicated_connection(self._engine) as conn:
                    execute = _driver_execute(conn)
                    backoff = 0.1
                    while not self._stopping.is_set():
                        with conn.transaction():
                            tick = enqueue_due(execute, self.schedules)
                        self._stopping.wait(self._until_next_slot(tick))
            except Exception as exc:
                if self._stopping.is_set():
                    return
                logger.warning("periodic enqueue failed (%s); reconnecting in %.1fs", exc, backoff)
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF)

    def _until_next_slot(self, tick: Tick) -> float:
        """Seconds (by this host's monotonic clock) until the database clock reaches a slot."""
        if tick.enqueued:
            logger.debug("periodic: enqueued %s", tick.enqueued)
        offset = tick.now.timestamp() - tick.monotonic  # database clock - monotonic clock
        next_slot = min(s.next_slot(tick.now) for s in self.schedules)
        wait = next_slot.timestamp() - offset - time.monotonic() + _MARGIN
        return min(max(wait, 0.0), _MAX_SLEEP)
