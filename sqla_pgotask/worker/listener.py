"""Wake-ups: a LISTEN connection that turns notifications into events for the worker.

Anyone who can connect to the database can ``NOTIFY`` any channel: no
privilege guards it.  So a notification is a hint, never an order:

* ``pgotask`` (a task arrived in a queue) only wakes an idle handler thread early; a
  spoofed one costs one claim that finds nothing;
* ``pgotask_cancel`` (cancellation of a running task was requested) is
  checked against the task's row: the listener cancels an attempt only if
  the row says ``cancel_requested_at`` is set, which takes the right to
  update ``pgotask_task``.  A spoofed one costs one primary-key lookup.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Collection
from typing import Protocol

from sqlalchemy import Engine

from sqla_pgotask._queries import driver_sql
from sqla_pgotask.worker.connections import Connection, dedicated_connection, notifications_arrive

logger = logging.getLogger("sqla_pgotask.worker")


class Wake(Protocol):
    """What the listener sets when a task arrives (an Event, or the worker's doorbell)."""

    def set(self) -> None:
        """Something may be due now."""


#: Notified by the insert trigger, with the new task's queue as payload.
CHANNEL = "pgotask"
#: Notified when cancellation of a running task is requested, with its id.
CANCEL_CHANNEL = "pgotask_cancel"

_UNHEARD = (
    "LISTEN hears no notifications through this connection: a pooler hands out "
    "server connections per transaction (PgBouncer in transaction or statement "
    "pool mode?). This worker does not LISTEN; it finds new tasks by polling "
    "and cancellations by its heartbeats. Give Scheduler(listen=...) a URL that "
    "reaches PostgreSQL directly or through a session-mode pool, or listen=False "
    "(see docs/deployment.md, PgBouncer)"
)


class Listener:
    """Runs ``LISTEN`` in a thread.

    ``wake`` is set when a task arrives in a served queue; ``on_cancel(id,
    attempt)`` is called when cancellation of a running task was requested
    (as its row confirms: see the module's docstring).  The worker polls
    and heart-beats anyway, so a lost connection only delays these: the thread
    reconnects with backoff and sets ``wake`` once it is back, since a
    notification may have been missed meanwhile.  If its first connection
    turns out to hear no notifications (a transaction-mode pooler), it
    warns and ends without listening.
    """

    def __init__(
        self,
        engine: Engine,
        wake: Wake,
        queues: Collection[str] | None,
        on_cancel: Callable[[int, int], None] | None = None,
        *,
        check_interval: float = 0.5,
    ) -> None:
        self._engine = engine
        self._wake = wake
        self._queues = frozenset(queues) if queues is not None else None
        self._on_cancel = on_cancel
        self._check_interval = check_interval
        self._stopping = threading.Event()
        self._connected = threading.Event()
        self._checked = False
        self._thread = threading.Thread(target=self._run, name="pgotask-listener", daemon=True)

    def start(self) -> None:
        """Start the thread."""
        self._thread.start()

    def wait_connected(self, timeout: float) -> bool:
        """Wait until ``LISTEN`` is in effect (for tests and start-up)."""
        return self._connected.wait(timeout)

    def stop(self) -> None:
        """Stop the thread and close the connection."""
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        backoff = 0.1
        while not self._stopping.is_set():
            try:
                with dedicated_connection(self._engine) as conn:
                    if not self._checked:
                        if not notifications_arrive(conn, self._engine, stopping=self._stopping):
                            if not self._stopping.is_set():
                                logger.warning(_UNHEARD)
                            return
                        self._checked = True
                    conn.execute(f"LISTEN {CHANNEL}")
                    if self._on_cancel is not None:
                        conn.execute(f"LISTEN {CANCEL_CHANNEL}")
                    self._connected.set()
                    self._wake.set()  # anything inserted while we were not listening
                    backoff = 0.1
                    self._listen(conn)
            except Exception as exc:  # reconnect on any failure; polling covers the gap
                self._connected.clear()
                if self._stopping.is_set():
                    return
                logger.warning("LISTEN connection failed (%s); reconnecting in %.1fs", exc, backoff)
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, 5.0)
        self._connected.clear()

    def _listen(self, conn: Connection) -> None:
        queues = self._queues
        while not self._stopping.is_set():
            cancel: list[int] = []
            for notify in conn.notifies(timeout=self._check_interval):
                if notify.channel == CHANNEL:
                    if queues is None or notify.payload in queues:
                        self._wake.set()
                elif self._on_cancel is not None:
                    try:
                        cancel.append(int(notify.payload))
                    except ValueError:
                        logger.warning("ignored %s payload %r", CANCEL_CHANNEL, notify.payload)
                        continue
                    break  # confirm it now, not after the next notification or timeout
            if cancel and self._on_cancel is not None:
                self._confirm_cancel(conn, cancel, self._on_cancel)

    def _confirm_cancel(
        self, conn: Connection, task_ids: list[int], on_cancel: Callable[[int, int], None]
    ) -> None:
        rows = conn.execute(driver_sql("cancel_requested"), {"ids": task_ids}).fetchall()
        confirmed = {task_id for task_id, _ in rows}
        for task_id, attempt in rows:
            on_cancel(task_id, attempt)
        for task_id in task_ids:
            if task_id not in confirmed:
                logger.info(
                    "ignored %s notification for task %s: its row requests no cancellation",
                    CANCEL_CHANNEL,
                    task_id,
                )
