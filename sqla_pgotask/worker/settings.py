"""A worker's settings, checked: what the Scheduler's arguments become.

Each function checks one group of :class:`~sqla_pgotask.Scheduler` (and
``run()``) arguments and raises :class:`~sqla_pgotask.ConfigurationError`
with the argument's name, before anything connects.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from sqlalchemy import URL, Connection, Engine, create_engine, make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

from sqla_pgotask.config.retention import Retention
from sqla_pgotask.engine.run import BatchLimits
from sqla_pgotask.errors import ConfigurationError
from sqla_pgotask.models import Task
from sqla_pgotask.worker.connections import require_psycopg
from sqla_pgotask.worker.maintenance import Timing
from sqla_pgotask.worker.threaded import WorkerSettings


def task_bind(session_factory: sessionmaker[Session]) -> Engine | Connection:
    """What the Sessions of ``session_factory`` bind ``Task`` to, checked to be psycopg 3."""
    with session_factory() as session:
        bind = session.get_bind(mapper=Task.__mapper__)
    engine = bind.engine if isinstance(bind, Connection) else bind
    require_psycopg(engine)
    return bind


def task_engine(session_factory: sessionmaker[Session]) -> Engine:
    """The engine behind :func:`task_bind`."""
    bind = task_bind(session_factory)
    return bind.engine if isinstance(bind, Connection) else bind


def lanes(queues: object) -> dict[str, int] | None:
    """``{queue: concurrency}`` if ``queues`` is such a mapping (checked), else ``None``."""
    if not isinstance(queues, Mapping):
        return None
    if not queues:
        raise ConfigurationError("queues must name at least one queue")
    lanes: dict[str, int] = {}
    for name, concurrency in queues.items():
        if not isinstance(name, str) or not name:
            raise ConfigurationError(f"queues must be non-empty queue names, not {name!r}")
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise ConfigurationError(
                f"the concurrency of queue {name!r} must be an integer >= 1, not {concurrency!r}"
            )
        lanes[name] = concurrency
    return lanes


def queue_names(
    queues: Sequence[str] | Mapping[str, int] | None, lanes: dict[str, int] | None
) -> Sequence[str] | None:
    return queues if lanes is None else tuple(lanes)  # type: ignore[return-value]


def worker_settings(
    *,
    concurrency: int,
    queues: Sequence[str] | None,
    poll_interval: float,
    shutdown_grace: float,
    timing: Timing,
    batch: BatchLimits,
    retention: Retention | None,
    listen: bool,
) -> WorkerSettings:
    if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
        raise ConfigurationError(f"concurrency must be an integer >= 1, not {concurrency!r}")
    if queues is not None:
        if isinstance(queues, str):
            raise ConfigurationError("queues must be a list of queue names, not a string")
        queues = tuple(queues)
        if not queues or not all(isinstance(q, str) and q for q in queues):
            raise ConfigurationError(f"queues must be non-empty queue names, not {queues!r}")
    _positive("poll_interval", poll_interval)
    if shutdown_grace < 0:
        raise ConfigurationError(f"shutdown_grace must be >= 0, not {shutdown_grace!r}")
    return WorkerSettings(
        concurrency=concurrency,
        queues=queues,
        poll_interval=float(poll_interval),
        shutdown_grace=float(shutdown_grace),
        timing=timing,
        batch=batch,
        retention=retention,
        listen=listen,
    )


def listen_engine(listen: object) -> Engine | None:
    """The engine of the LISTEN connection that ``listen`` names; ``None``: the application's."""
    if isinstance(listen, bool):
        return None
    if isinstance(listen, Engine):
        try:
            require_psycopg(listen)
        except ConfigurationError as exc:
            raise ConfigurationError(f"listen: {exc}") from None
        return listen
    if not isinstance(listen, str | URL):
        raise ConfigurationError(
            f"listen must be True, False, a database URL or an Engine, not {type(listen).__name__}"
        )
    try:
        url = make_url(listen)
        dialect = f"{url.get_backend_name()}+{url.get_driver_name()}"
    except ArgumentError:  # not echoed: it may hold a password
        raise ConfigurationError(
            "listen: not a database URL (expected one like postgresql+psycopg://user@host/db)"
        ) from None
    if dialect != "postgresql+psycopg":
        raise ConfigurationError(
            "listen: sqla_pgotask needs PostgreSQL through the psycopg 3 driver (a "
            f"'postgresql+psycopg://' URL), not {dialect}"
        )
    # One connection, held for the worker's life: nothing to pool.
    return create_engine(url, poolclass=NullPool)


def check_retention(retention: object) -> Retention | None:
    if retention is not None and not isinstance(retention, Retention):
        raise ConfigurationError(
            "retention must be a sqla_pgotask.Retention (or None to keep finished tasks "
            f"forever), not {retention!r}"
        )
    return retention


def batch_limits(size: int, window: float) -> BatchLimits:
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ConfigurationError(f"batch_size must be an integer >= 1, not {size!r}")
    _positive("batch_window", window)
    return BatchLimits(size=size, window=float(window), slow=float(window))


def timing(
    lease_seconds: float,
    heartbeat_interval: float | None,
    maintenance_interval: float,
    dead_after: float | None,
) -> Timing:
    _positive("lease_seconds", lease_seconds)
    heartbeat = lease_seconds / 6 if heartbeat_interval is None else heartbeat_interval
    _positive("heartbeat_interval", heartbeat)
    if heartbeat > lease_seconds / 2:
        raise ConfigurationError(
            f"heartbeat_interval ({heartbeat:g} s) must be at most half of lease_seconds "
            f"({lease_seconds:g} s), or leases expire between heartbeats"
        )
    _positive("maintenance_interval", maintenance_interval)
    dead = lease_seconds if dead_after is None else dead_after
    if dead < 2 * heartbeat:
        raise ConfigurationError(
            f"dead_after ({dead:g} s) must be at least twice heartbeat_interval ({heartbeat:g} s)"
        )
    return Timing(
        lease=float(lease_seconds),
        heartbeat_interval=float(heartbeat),
        maintenance_interval=float(maintenance_interval),
        dead_after=float(dead),
    )


def _positive(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ConfigurationError(f"{name} must be a number > 0, not {value!r}")
