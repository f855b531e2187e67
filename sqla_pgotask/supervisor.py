"""The supervisor of ``pgotask worker --processes N``, now :mod:`sqla_pgotask.worker.supervisor`."""

from sqla_pgotask.worker.supervisor import (
    READY_FD_OPTION,
    RESTART_DELAY_MAX,
    RESTART_DELAY_MIN,
    STABLE_AFTER,
    SUPERVISOR_PID_OPTION,
    ChildFailedError,
    Supervisor,
    describe_exit,
    restart_delay,
    watch_supervisor,
)

__all__ = [
    "READY_FD_OPTION",
    "RESTART_DELAY_MAX",
    "RESTART_DELAY_MIN",
    "STABLE_AFTER",
    "SUPERVISOR_PID_OPTION",
    "ChildFailedError",
    "Supervisor",
    "describe_exit",
    "restart_delay",
    "watch_supervisor",
]
