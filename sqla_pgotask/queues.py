"""Pausing and resuming queues, now :mod:`sqla_pgotask.admin.queues`."""

from sqla_pgotask.admin.queues import pause_queue, paused_queues, resume_queue

__all__ = ["pause_queue", "paused_queues", "resume_queue"]
