"""Child processes that die with their parent: the kernel's parent-death signal.

Used by the supervisor of ``pgotask worker --processes`` (its worker
processes) and by the embedded PostgreSQL (its postmaster).
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Callable

# prctl(2) option, from <linux/prctl.h>.
_PR_SET_PDEATHSIG = 1


def _load_prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl: Callable[..., int] = libc.prctl
    except (OSError, AttributeError):  # pragma: no cover - exotic libc
        return None
    return prctl


# Resolved once, in the parent: the child's set-up runs between fork and
# exec and should do as little as possible.
_PRCTL = _load_prctl()


def die_with_parent(parent_pid: int, deathsig: int, exit_code: int) -> Callable[[], None]:
    """A ``preexec_fn``: the kernel sends ``deathsig`` to the child when its parent dies.

    Linux only (elsewhere it does nothing).  The signal is tied to the
    *thread* that forks, not the whole process: the parent must start the
    child from a long-lived thread.  Changing credentials clears it, so it
    must run after ``subprocess`` has applied ``user=`` and ``group=``, as
    ``preexec_fn`` does.  If the parent died between fork and prctl, no
    signal will ever come: the child exits with ``exit_code`` at once.
    """

    def setup() -> None:
        if _PRCTL is not None:
            _PRCTL(_PR_SET_PDEATHSIG, deathsig, 0, 0, 0)
            if os.getppid() != parent_pid:
                os._exit(exit_code)

    return setup
