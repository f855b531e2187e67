"""Starting while the server has no connection slot free: wait for one instead of failing.

When every slot of ``max_connections`` open to the application's role is
taken (the ``superuser_reserved_connections`` are not for it), PostgreSQL
turns new connections away with SQLSTATE 53300.  That passes as soon as
other clients disconnect; it is not a wrong URL.  A worker that meets it
while starting waits, saying so in its log, and starts once a slot is free,
instead of exiting: under a supervisor that restarts it, exiting would be a
restart loop that adds connection attempts to a server already short of
them.  Once a worker runs, each of its connections reconnects with a
backoff of its own.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable

import psycopg
from sqlalchemy.exc import DBAPIError

logger = logging.getLogger("sqla_pgotask.worker")

#: Seconds before the first retry; doubled after each refusal, up to :data:`MAX_DELAY`.
FIRST_DELAY = 0.25
MAX_DELAY = 5.0

# A refused connection attempt carries libpq's message but no SQLSTATE, so
# the server's wording of 53300 is matched: all slots taken; the rest kept
# for superusers (PostgreSQL 15: "... for non-replication superuser
# connections", 16 and later: "... for roles with ..."); a CONNECTION LIMIT
# of the role or database reached.  Servers whose lc_messages is not English
# word it otherwise: there the worker exits as for any other connection error.
_NO_SLOT_MESSAGES = (
    "too many clients already",
    "remaining connection slots are reserved",
    "too many connections for",
)


def no_free_slot(exc: BaseException) -> bool:
    """Whether ``exc`` is a connection the server turned away for want of a free slot."""
    orig = exc.orig if isinstance(exc, DBAPIError) else exc
    if not isinstance(orig, psycopg.OperationalError):
        return False
    if orig.sqlstate == "53300":  # too_many_connections, once past the connection attempt
        return True
    message = str(orig)
    return any(text in message for text in _NO_SLOT_MESSAGES)


def when_admitted(action: Callable[[], object], stop: threading.Event, what: str) -> bool:
    """Run ``action``, again after a growing delay while no connection slot is free.

    Returns True once ``action`` ran, False if ``stop`` was set while
    waiting.  Any other error is raised at once.
    """
    delay = FIRST_DELAY
    while True:
        try:
            action()
            return True
        except DBAPIError as exc:
            if not no_free_slot(exc):
                raise
            reason = " ".join(str(exc.orig if exc.orig is not None else exc).split())
            logger.warning(
                "cannot %s: no connection slot free on the database (%s); retrying in %.1fs",
                what,
                reason,
                delay,
            )
        # Jitter, so that workers started together do not come back in step.
        if stop.wait(delay * random.uniform(0.8, 1.2)):
            return False
        delay = min(delay * 2, MAX_DELAY)
