"""Per-task savepoints that cost one round trip, never a release, and nothing without SQL.

A batch runs several tasks in one transaction; each task after the first gets
a Session joined to the batch's connection with
``join_transaction_mode="create_savepoint"``, so a failing handler rolls back
to its own savepoint and the others keep their writes.  Done naively that is
``SAVEPOINT`` and ``RELEASE SAVEPOINT``: two extra round trips per task, and
two statements through SQLAlchemy's execution machinery.  On the batch's
connections only, the engine's dialect does instead:

* the task's ``SAVEPOINT`` is only noted (``do_savepoint``), and sent just
  before the handler's first statement (a ``do_execute`` event, a public
  SQLAlchemy hook), as a round trip of its own; a handler that issues no
  SQL sends none.  (Sending it in the statement's network write, psycopg's
  pipeline mode, saves the round trip but costs more client CPU than it
  saves: :attr:`LazySavepoints.send`);
* its ``RELEASE`` is never sent (``do_release_savepoint``): the savepoint
  stays open until the batch commits (rolling back to it still undoes
  exactly that task's writes, since it is the innermost one while its task
  runs).  The runner bounds how many such savepoints a transaction takes
  (PostgreSQL's per-backend cache holds 64 subtransaction ids before every
  snapshot gets slower);
* rolling back to a savepoint that was never sent sends nothing.

The three ``do_*savepoint`` methods are wrapped on the engine's own dialect
object, and act as before on every connection that runs no batch.
``benchmarks/savepoints.py`` measures each choice (:attr:`LazySavepoints.send`).  Savepoints a
handler takes itself (``session.begin_nested()``) are sent and released as
usual.
"""

from __future__ import annotations

import threading
from typing import Any

from sqlalchemy import Connection, Engine, event
from sqlalchemy.engine import Dialect

_SAVEPOINT = "SAVEPOINT "
#: The name every task savepoint takes on the server.  One constant text is
#: one entry in psycopg's query cache (SQLAlchemy numbers its savepoints);
#: PostgreSQL allows the name again, and rolling back to it goes to the
#: latest, which is the running task's own.
TASK_SAVEPOINT = "pgotask_task"


class LazySavepoints:
    """The state of one batch connection: is a task's savepoint held back?"""

    #: How a held-back savepoint goes out before the statement that needs it:
    #: ``"separate"``, a round trip of its own; ``"pipelined"``, in the
    #: statement's network write (psycopg pipeline mode: no extra round trip,
    #: more client CPU, which is what a busy worker runs out of first).
    send = "separate"

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
        """The next savepoint on this connection is a task's own: hold it back."""
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

    def hold(self, name: str) -> bool:
        """SQLAlchemy takes savepoint ``name``; ``True``: it is the task's, held back."""
        if self.armed and self.name is None:
            self.name = name
            return True
        return False

    def release(self, name: str) -> bool:
        """SQLAlchemy releases ``name``; ``True``: the task's, never sent, so nothing to do."""
        return name == self.name

    def rollback_to(self, name: str) -> str | None:
        """SQLAlchemy rolls back to ``name``: the name to roll back to, or ``None`` for nothing.

        Nothing if it is the task's and was never sent; the task's is sent
        under :data:`TASK_SAVEPOINT`.
        """
        if name != self.name:
            self.statements += 1
            return name
        if not self.sent:
            return None
        self.statements += 1
        return TASK_SAVEPOINT

    def execute(self, cursor: Any, statement: str, run: Any) -> bool:
        """Run ``statement`` (``run(cursor)`` sends it); ``False`` lets SQLAlchemy send it."""
        self.statements += 1
        name = self.name
        if name is None or self.sent:
            return False
        self.sent = True
        self.open += 1
        connection = cursor.connection
        send = self.send
        if send == "pipelined" and not getattr(cursor, "name", None):
            with connection.pipeline():
                connection.execute(_SAVEPOINT + TASK_SAVEPOINT)
                run(cursor)
            return True
        connection.execute(_SAVEPOINT + TASK_SAVEPOINT)
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
    """Add the hooks to ``engine`` (once); they act only on registered connections."""
    with _install_lock:
        if not event.contains(engine, "do_execute", _do_execute):
            event.listen(engine, "do_execute", _do_execute)
            event.listen(engine, "do_execute_no_params", _do_execute_no_params)
            event.listen(engine, "do_executemany", _do_executemany)
        dialect = engine.dialect
        if not getattr(dialect, _WRAPPED, False):
            _wrap(dialect)


_WRAPPED = "_sqla_pgotask_lazy_savepoints"


def _state(connection: Connection) -> LazySavepoints | None:
    if not _batches:
        return None
    return _batches.get(connection.connection.dbapi_connection)


def _wrap(dialect: Dialect) -> None:
    """Wrap the dialect object's savepoint methods (only this engine's dialect)."""
    savepoint = dialect.do_savepoint
    release = dialect.do_release_savepoint
    rollback_to = dialect.do_rollback_to_savepoint

    def do_savepoint(connection: Connection, name: str) -> None:
        state = _state(connection)
        if state is None or not state.hold(name):
            savepoint(connection, name)

    def do_release_savepoint(connection: Connection, name: str) -> None:
        state = _state(connection)
        if state is None or not state.release(name):
            release(connection, name)

    def do_rollback_to_savepoint(connection: Connection, name: str) -> None:
        state = _state(connection)
        target = name if state is None else state.rollback_to(name)
        if target is not None:
            rollback_to(connection, target)

    dialect.do_savepoint = do_savepoint  # type: ignore[method-assign]
    dialect.do_release_savepoint = do_release_savepoint  # type: ignore[method-assign]
    dialect.do_rollback_to_savepoint = do_rollback_to_savepoint  # type: ignore[method-assign]
    setattr(dialect, _WRAPPED, True)


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
