"""Retention and pruning: the config (config.retention) and the deleting (worker.pruning)."""

from sqla_pgotask.config.retention import (
    FINISHED_STATUSES,
    Retention,
)
from sqla_pgotask.worker.pruning import (
    DEFAULT_BATCH_SIZE,
    RETENTION_LOCK,
    apply_retention,
    prune_tasks,
)

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "FINISHED_STATUSES",
    "RETENTION_LOCK",
    "Retention",
    "apply_retention",
    "prune_tasks",
]
