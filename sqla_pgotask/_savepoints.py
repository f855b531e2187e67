"""Per-task savepoints that cost no round trip of their own, and nothing without SQL.

A batch runs several tasks in one transaction; each task after the first gets
a Session joined to the batch's connection with
``join_transaction_mode="create_savepoint"``, so a failing handler rolls back
to its own savepoint and the others keep their writes.  Done naively that is
``SAVEPOINT`` and ``RELEASE SAVEPOINT``: two extra round trips per task.  The
dialect's ``do_execute`` events (public SQLAlchemy hooks) remove them, on the
batch's connections only:

* the task's ``SAVEPOINT`` is held back until the handler's first statement
  and then sent in the same network write (psycopg pipeline mode); a handler
  that issues no SQL sends none;
* its ``RELEASE`` is never sent: the savepoint stays open until the batch
  commits (rolling back to it still undoes exactly that task's writes, since
  it is the innermost one while its task runs).  The runner bounds how many
  such savepoints a transaction takes (PostgreSQL's per-backend cache holds
  64 subtransaction ids before every snapshot gets slower).

``benchmarks/savepoints.py`` measures each choice (``pipeline = False``
sends the held-back savepoint as a round trip of its own).  Savepoints a
handler takes itself (``session.begin_nested()``) are sent and released as
usual.
"""

from __future__ import annotations

import threading
from typing import Any

from sqlalchemy import Engine, event

_SAVEPOINT = "SAVEPOINT "
_RELEASE = "RELEASE SAVEPOINT "
_ROLLBACK_TO = "ROLLBACK TO SAVEPOINT "


class LazySavepoints:
    """The state of one batch connection: is a task's savepoint held back?"""

    #: Send a held-back savepoint with the next statement in one network write
    #: (psycopg pipeline mode), rather than as a round trip of its own.
    pipeline = True

    def __init__(self) -> None:
        self.armed = False
        #: The current task's savepoint name, once SQLAlchemy asked for it.
        self.name: str | None = None
        #: Whether that savepoint has been sent to the server.
        self.sent = False
        #: Task savepoints sent in this transaction (never released).
        self.open = 0
        #: Statements sent on this connection (to tell whether a task did any SQL).
        self.statements = 0

    def arm(self) -> None:
        """The next ``SAVEPOINT`` on this connection is a task's own: hold it back."""
        self.armed = True
        self.name = None
        self.sent = False

    def disarm(self) -> None:
        """The task is over."""
        self.armed = False
        self.name = None

    def new_transaction(self) -> None:
        """The connection began a new transaction: no task savepoint is open."""
        self.open = 0

    def execute(self, cursor: Any, statement: str, run: Any) -> bool:  # noqa: PLR0911
        """Run ``statement`` (``run(cursor)`` sends it); ``False`` lets SQLAlchemy send it."""
        if statement.startswith(_SAVEPOINT) and self.armed and self.name is None:
            self.name = statement[len(_SAVEPOINT) :]
            return True  # held back until the task's first statement
        name = self.name
        if name is not None:
            if statement.startswith(_RELEASE) and statement[len(_RELEASE) :] == name:
                return True  # never released: committed with the batch
            if statement.startswith(_ROLLBACK_TO) and statement[len(_ROLLBACK_TO) :] == name:
                if not self.sent:
                    return True  # nothing was done since it was taken
                self.statements += 1
                return False
            if not self.sent:
                self.sent = True
                self.open += 1
                self.statements += 1
                connection = cursor.connection
                if not self.pipeline or getattr(cursor, "name", None):
                    connection.execute(_SAVEPOINT + name)
                    return False
                with connection.pipeline():
                    connection.execute(_SAVEPOINT + name)
                    run(cursor)
                return True
        self.statements += 1
        return False


# Batch connections (DBAPI connection -> state), registered while a batch runs.
_batches: dict[Any, LazySavepoints] = {}
_install_lock = threading.Lock()


def register(dbapi_connection: Any) -> LazySavepoints:
    """Start tracking ``dbapi_connection`` as a batch connection."""
    state = LazySavepoints()
    _batches[dbapi_connection] = state
    return state


def unregister(dbapi_connection: Any) -> None:
    """Stop tracking ``dbapi_connection``."""
    _batches.pop(dbapi_connection, None)


def install(engine: Engine) -> None:
    """Add the dialect hooks to ``engine`` (once); they act only on registered connections."""
    with _install_lock:
        if not event.contains(engine, "do_execute", _do_execute):
            event.listen(engine, "do_execute", _do_execute)
            event.listen(engine, "do_execute_no_params", _do_execute_no_params)
            event.listen(engine, "do_executemany", _do_executemany)


def _do_execute(cursor: Any, statement: str, parameters: Any, context: Any) -> bool:
    state = _batches.get(cursor.connection)
    if state is None:
        return False
    return state.execute(cursor, statement, lambda c: c.execute(statement, parameters))


def _do_execute_no_params(cursor: Any, statement: str, context: Any) -> bool:
    state = _batches.get(cursor.connection)
    if state is None:
        return False
    return state.execute(cursor, statement, lambda c: c.execute(statement))


def _do_executemany(cursor: Any, statement: str, parameters: Any, context: Any) -> bool:
    state = _batches.get(cursor.connection)
    if state is None:
        return False
    return state.execute(cursor, statement, lambda c: c.executemany(statement, parameters))
