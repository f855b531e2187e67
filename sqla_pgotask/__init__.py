"""sqla_pgotask: a PostgreSQL task scheduler for SQLAlchemy applications.

A task is a row, added in the application's own transaction: it exists
exactly when that transaction commits.  Workers run each task's handler in a
Session of the application's ``sessionmaker``, and the handler's writes commit
together with the task's completion, or not at all.
"""

from sqla_pgotask.admin.queues import pause_queue, paused_queues, resume_queue
from sqla_pgotask.config.handlers import Handler
from sqla_pgotask.config.limits import QueueLimit, RateLimit
from sqla_pgotask.config.retention import Retention
from sqla_pgotask.config.retry import ConstantBackoff, ExponentialBackoff, RetryStrategy
from sqla_pgotask.config.schedule import Schedule
from sqla_pgotask.context import AttemptContext, Outcome, current_attempt
from sqla_pgotask.enqueue import TaskFields, add_many
from sqla_pgotask.errors import (
    ClaimLostError,
    ConfigurationError,
    HandlerTransactionError,
    InvalidPayloadError,
    InvalidTaskError,
    NonRetryableError,
    PgotaskError,
    SchemaError,
    Snooze,
    TaskCancelledError,
    TaskTimeoutError,
    UnknownKindError,
    UnrunnableTaskError,
    WorkerStuckError,
)
from sqla_pgotask.models import Base, RegisteredWorker, Task, TaskError, TaskStatus
from sqla_pgotask.scheduler import Scheduler
from sqla_pgotask.worker import WorkerStats
from sqla_pgotask.worker.pruning import prune_tasks

__all__ = [
    "AttemptContext",
    "Base",
    "ClaimLostError",
    "ConfigurationError",
    "ConstantBackoff",
    "ExponentialBackoff",
    "Handler",
    "HandlerTransactionError",
    "InvalidPayloadError",
    "InvalidTaskError",
    "NonRetryableError",
    "Outcome",
    "PgotaskError",
    "QueueLimit",
    "RateLimit",
    "RegisteredWorker",
    "Retention",
    "RetryStrategy",
    "Schedule",
    "Scheduler",
    "SchemaError",
    "Snooze",
    "Task",
    "TaskCancelledError",
    "TaskError",
    "TaskFields",
    "TaskStatus",
    "TaskTimeoutError",
    "UnknownKindError",
    "UnrunnableTaskError",
    "WorkerStats",
    "WorkerStuckError",
    "add_many",
    "current_attempt",
    "pause_queue",
    "paused_queues",
    "prune_tasks",
    "resume_queue",
]

__version__ = "0.1.0"
