"""Wake-ups: a LISTEN connection that sets an event when tasks are inserted."""

from __future__ import annotations

import logging
import threading
from collections.abc import Collection

import psycopg
from sqlalchemy import Engine

from sqla_pgotask.errors import ConfigurationError

logger = logging.getLogger("sqla_pgotask.worker")

#: The channel the insert trigger notifies, with the task's queue as payload.
CHANNEL = "pgotask"


def listen_connection(engine: Engine) -> psycopg.Connection[tuple[object, ...]]:
    """A connection of its own, made the way the engine makes them, in autocommit."""
    require_psycopg(engine)
    pooled = engine.raw_connection()
    conn = pooled.driver_connection
    # Take it out of the pool for good: it is held open for as long as the worker runs.
    pooled.detach()
    assert isinstance(conn, psycopg.Connection)
    if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
        conn.rollback()
    conn.autocommit = True
    return conn


def require_psycopg(engine: Engine) -> None:
    """Raise :class:`ConfigurationError` unless ``engine`` uses the psycopg 3 driver."""
    if engine.dialect.name != "postgresql" or engine.dialect.driver != "psycopg":
        raise ConfigurationError(
            "sqla_pgotask needs PostgreSQL through the psycopg 3 driver (a "
            f"'postgresql+psycopg://' URL), not {engine.dialect.name}+{engine.dialect.driver}"
        )


class Listener:
    """Runs ``LISTEN`` in a thread; ``wake`` is set when a task arrives in a served queue.

    The worker polls anyway, so a lost connection only delays wake-ups: the
    thread reconnects with backoff and sets ``wake`` once it is back, since a
    notification may have been missed meanwhile.
    """

    def __init__(
        self,
        engine: Engine,
        wake: threading.Event,
        queues: Collection[str] | None,
        *,
        check_interval: float = 0.5,
    ) -> None:
        self._engine = engine
        self._wake = wake
        self._queues = frozenset(queues) if queues is not None else None
        self._check_interval = check_interval
        self._stopping = threading.Event()
        self._connected = threading.Event()
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
                with listen_connection(self._engine) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
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

    def _listen(self, conn: psycopg.Connection[tuple[object, ...]]) -> None:
        queues = self._queues
        while not self._stopping.is_set():
            for notify in conn.notifies(timeout=self._check_interval):
                if queues is None or notify.payload in queues:
                    self._wake.set()
