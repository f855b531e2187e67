"""The runners and their maintenance: what runs tasks, outside the engine.

- :mod:`~sqla_pgotask.worker.threaded`: the threaded worker
  (:class:`Worker`), handler threads that each drive the engine's loop;
- :mod:`~sqla_pgotask.worker.listener`, :mod:`~sqla_pgotask.worker.maintenance`
  and :mod:`~sqla_pgotask.worker.periodic_thread`: its ``LISTEN`` thread,
  its heartbeats, rescue and retention, and its periodic schedules;
- :mod:`~sqla_pgotask.worker.supervisor`: ``pgotask worker --processes N``;
- :mod:`~sqla_pgotask.worker.connections` and
  :mod:`~sqla_pgotask.worker.connection_slots`: the connections a worker
  keeps for itself, and waiting for a free connection slot at start.
"""

from sqla_pgotask.worker.threaded import (
    STUCK_MARGIN,
    Doorbell,
    Throughput,
    Worker,
    WorkerSettings,
    WorkerStats,
    brief,
    new_worker_id,
)

__all__ = [
    "STUCK_MARGIN",
    "Doorbell",
    "Throughput",
    "Worker",
    "WorkerSettings",
    "WorkerStats",
    "brief",
    "new_worker_id",
]
