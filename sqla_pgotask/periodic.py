"""Periodic tasks: the schedules (config.schedule) and their enqueueing (worker.periodic)."""

from sqla_pgotask.config.schedule import (
    DEFAULT_GRACE,
    MAX_BACKFILL,
    MISSED_POLICIES,
    UTC,
    HandlerDecorator,
    MissedPolicy,
    Schedule,
    for_handler,
    make_schedule,
    runnable_schedules,
)
from sqla_pgotask.worker.periodic import (
    Execute,
    Plan,
    ScheduleRow,
    Tick,
    enqueue_due,
    enqueue_periodic,
    plan,
)

__all__ = [
    "DEFAULT_GRACE",
    "MAX_BACKFILL",
    "MISSED_POLICIES",
    "UTC",
    "Execute",
    "HandlerDecorator",
    "MissedPolicy",
    "Plan",
    "Schedule",
    "ScheduleRow",
    "Tick",
    "enqueue_due",
    "enqueue_periodic",
    "for_handler",
    "make_schedule",
    "plan",
    "runnable_schedules",
]
