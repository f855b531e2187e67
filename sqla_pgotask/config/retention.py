"""How long workers keep finished tasks: :class:`Retention`, per final status.

Workers apply it in their maintenance loop (:mod:`sqla_pgotask.worker.pruning`
deletes the rows); :func:`~sqla_pgotask.prune_tasks` prunes by hand.  See
``docs/pruning.md``.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from sqla_pgotask.errors import ConfigurationError
from sqla_pgotask.models import TaskStatus

__all__ = ["FINISHED_STATUSES", "Retention"]

#: The final statuses: the only ones :func:`~sqla_pgotask.prune_tasks` deletes.
FINISHED_STATUSES: tuple[TaskStatus, ...] = (
    TaskStatus.SUCCEEDED,
    TaskStatus.FAILED,
    TaskStatus.CANCELLED,
)

_DAY = dt.timedelta(days=1)


@dataclass(frozen=True)
class Retention:
    """How long workers keep finished tasks, per final status; ``None`` keeps them forever.

    Applied by the workers' maintenance loop every ``interval`` seconds (with
    jitter), by one worker of the fleet at a time (a PostgreSQL advisory
    lock that each batch's transaction takes), in batches of ``batch_size``
    rows each committed on its own, for
    at most ``max_seconds`` per pass (the rest waits for the next pass), so
    it never holds many locks or delays the worker's heartbeats for long.
    """

    succeeded: dt.timedelta | None = _DAY
    failed: dt.timedelta | None = dt.timedelta(days=14)
    cancelled: dt.timedelta | None = _DAY
    interval: float = 60.0
    batch_size: int = 1_000
    max_seconds: float = 2.0

    def __post_init__(self) -> None:
        for status in FINISHED_STATUSES:
            keep = getattr(self, status.value)
            if keep is not None and (not isinstance(keep, dt.timedelta) or keep < dt.timedelta(0)):
                raise ConfigurationError(
                    f"Retention.{status.value} must be a non-negative datetime.timedelta "
                    f"or None (keep forever), not {keep!r}"
                )
        for name in ("interval", "max_seconds"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise ConfigurationError(f"Retention.{name} must be a number > 0, not {value!r}")
        size = self.batch_size
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ConfigurationError(f"Retention.batch_size must be an integer >= 1, not {size!r}")

    def periods(self) -> dict[TaskStatus, dt.timedelta]:
        """The statuses that are pruned, with how long each is kept."""
        found = {status: getattr(self, status.value) for status in FINISHED_STATUSES}
        return {status: keep for status, keep in found.items() if keep is not None}
