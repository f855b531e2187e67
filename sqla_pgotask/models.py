"""The task tables as SQLAlchemy declarative models.

``Task`` and ``TaskError`` live on the library's own :class:`Base` with its own
``MetaData``, so they never appear in the application's metadata (and its
autogenerate) yet flush in the same ``Session`` as the application's models::

    with Session() as session:
        session.add(Order(id=7))
        session.add(Task(kind="send_receipt", payload={"order_id": 7}))
        session.commit()  # both rows exist, or neither

Every column but ``kind`` has a server default, so a plain SQL
``INSERT INTO pgotask_task (kind) VALUES ('send_receipt')`` is a valid task.
"""

from __future__ import annotations

import datetime as dt
import enum
import json
from typing import Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    DateTime,
    Enum,
    FetchedValue,
    ForeignKey,
    Identity,
    Index,
    Integer,
    MetaData,
    Text,
    event,
    func,
    inspect,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.engine import Connection
from sqlalchemy.orm import (
    AttributeEventToken,
    DeclarativeBase,
    Mapped,
    Mapper,
    mapped_column,
    relationship,
    validates,
)

from sqla_pgotask import _validation
from sqla_pgotask.errors import InvalidPayloadError

TASK_TABLE = "pgotask_task"
TASK_ERROR_TABLE = "pgotask_task_error"
WORKER_TABLE = "pgotask_worker"
SCHEDULE_TABLE = "pgotask_schedule"
QUEUE_TABLE = "pgotask_queue"
LIMIT_TABLE = "pgotask_limit"

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    """Declarative base of the library's tables, with a metadata of its own."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class TaskStatus(str, enum.Enum):
    """Life cycle of a task: ``pending`` -> ``running`` -> a final status."""

    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    def __str__(self) -> str:
        return self.value


_status_type = Enum(
    TaskStatus,
    name="status",
    native_enum=False,
    create_constraint=True,
    length=16,
    values_callable=lambda statuses: [s.value for s in statuses],
    validate_strings=True,
)

_TZ = DateTime(timezone=True)

# The nullable columns without a default.  ``evaluates_none()`` makes the ORM
# leave such a column out of an INSERT when it is not set, instead of sending
# an explicit NULL: the row is the same, and the INSERT of a new task carries
# only the columns that were set (``kind, payload`` rather than nine columns,
# which for a thousand tasks flushed at once is 7,000 parameters fewer).
_NULLABLE_INT = Integer().evaluates_none()
_NULLABLE_TEXT = Text().evaluates_none()
_NULLABLE_TZ = DateTime(timezone=True).evaluates_none()


def _in_range(column: str) -> str:
    return (
        f"({column} >= '{_validation.EARLIEST_RUN_AT.isoformat(sep=' ')}' "
        f"AND {column} < '{_validation.LATEST_RUN_AT.isoformat(sep=' ')}')"
    )


_OPTIONAL_TIMESTAMPS = (
    "started_at",
    "finished_at",
    "cancel_requested_at",
    "lease_expires_at",
    "slot",
)

#: The table's CHECK constraints of migration sqla_pgotask_0005, by name.
_TASK_CHECKS = {
    "kind_valid": f"kind <> '' AND length(kind) <= {_validation.MAX_NAME_LENGTH}",
    "queue_valid": f"queue <> '' AND length(queue) <= {_validation.MAX_NAME_LENGTH}",
    "run_at_in_range": _in_range("run_at"),
    "timestamps_in_range": " AND ".join(
        [_in_range("created_at")]
        + [f"({c} IS NULL OR {_in_range(c)})" for c in _OPTIONAL_TIMESTAMPS]
    ),
    "running_has_lease": (
        "status <> 'running' OR (locked_by IS NOT NULL AND lease_expires_at IS NOT NULL)"
    ),
    "pending_has_an_attempt_left": (
        "status <> 'pending' OR max_attempts IS NULL OR attempts < max_attempts"
    ),
}


class Task(Base):
    """One unit of work: a row of ``pgotask_task``.

    Only ``kind`` is required.  ``payload`` must be JSON-serialisable;
    ``run_at`` defaults to the database's ``now()``; ``max_attempts`` left
    as ``None`` means the handler's setting.
    """

    __tablename__ = TASK_TABLE
    # An insert fetches back only the id (``RETURNING id``).  The other server
    # defaults (status, run_at, created_at, ...) are loaded when first read:
    # enqueueing, which rarely reads them, stays one short statement.
    __mapper_args__ = {"eager_defaults": False}  # noqa: RUF012

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    kind: Mapped[str] = mapped_column(Text)
    queue: Mapped[str] = mapped_column(Text, server_default=text("'default'"))
    payload: Mapped[Any] = mapped_column(JSONB, server_default=text("'{}'::jsonb"))
    status: Mapped[TaskStatus] = mapped_column(_status_type, server_default=text("'pending'"))
    priority: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    run_at: Mapped[dt.datetime] = mapped_column(_TZ, server_default=func.now())
    attempts: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    max_attempts: Mapped[int | None] = mapped_column(_NULLABLE_INT)
    dedup_key: Mapped[str | None] = mapped_column(_NULLABLE_TEXT)
    created_at: Mapped[dt.datetime] = mapped_column(_TZ, server_default=func.now())
    started_at: Mapped[dt.datetime | None] = mapped_column(_NULLABLE_TZ)
    # ``FetchedValue``: the dedup trigger may set these on insert, so a new
    # task's values are read back from the row rather than assumed NULL.
    finished_at: Mapped[dt.datetime | None] = mapped_column(
        _NULLABLE_TZ, server_default=FetchedValue()
    )
    locked_by: Mapped[str | None] = mapped_column(_NULLABLE_TEXT)
    lease_expires_at: Mapped[dt.datetime | None] = mapped_column(_NULLABLE_TZ)
    result: Mapped[Any | None] = mapped_column(JSONB, server_default=FetchedValue())
    #: Set to request cancellation (``scheduler.cancel()`` or plain SQL): a
    #: pending task is cancelled at once, a running one when its handler ends.
    cancel_requested_at: Mapped[dt.datetime | None] = mapped_column(_NULLABLE_TZ)
    #: With a ``dedup_key``: what adding this task does while a live task of
    #: the same kind and key exists.  ``None`` or ``"ignore"``: nothing (this
    #: row is stored ``cancelled``, see :attr:`duplicate_of`); ``"replace"``:
    #: the pending original takes this task's payload, ``run_at``, priority,
    #: queue and ``max_attempts`` (debounce).
    on_duplicate: Mapped[str | None] = mapped_column(_NULLABLE_TEXT)
    #: The periodic schedule this task was enqueued by, and the slot (the
    #: instant the schedule fired) it runs for; ``None`` for other tasks.
    schedule: Mapped[str | None] = mapped_column(_NULLABLE_TEXT)
    slot: Mapped[dt.datetime | None] = mapped_column(_NULLABLE_TZ)
    #: The W3C trace context (``{"traceparent": ..., "tracestate": ...}``) of
    #: the span that enqueued the task, recorded once tracing is on (see
    #: :mod:`sqla_pgotask.otel`): a worker's span for each attempt links to it.
    #: ``None`` when the task was enqueued outside a span; plain SQL may set it.
    #: (Plain ``JSONB``: left out of the INSERT when not set, like the columns above.)
    trace_context: Mapped[dict[str, str] | None] = mapped_column(JSONB)

    #: The task's failed attempts, oldest first.  The worker writes them; this
    #: collection only reads them (appending to it raises): a read-only
    #: relationship adds nothing to the flush of a new task, where a writable
    #: one costs about a sixth of a one-task enqueue.  To add an error
    #: yourself, add ``TaskError(task=task, ...)`` to the Session.  Deleting a
    #: task deletes its errors (``ON DELETE CASCADE``).
    errors: Mapped[list[TaskError]] = relationship(
        back_populates="task",
        viewonly=True,
        order_by="TaskError.attempt",
    )

    __table_args__ = (
        CheckConstraint("max_attempts IS NULL OR max_attempts > 0", name="max_attempts_positive"),
        CheckConstraint("attempts >= 0", name="attempts_not_negative"),
        CheckConstraint("on_duplicate IN ('ignore', 'replace')", name="on_duplicate"),
        # Rows every worker can read and run, whoever wrote them (migration
        # sqla_pgotask_0005 has the reasons; the same rules are checked in
        # Python, with clearer messages, when a Task is made).
        *(CheckConstraint(condition, name=name) for name, condition in _TASK_CHECKS.items()),
        # The claim query walks this index in claim order over pending rows
        # only, so finished rows never slow it down.
        Index(
            "ix_pgotask_task_claim",
            text("priority DESC"),
            "run_at",
            "id",
            postgresql_where=text("status = 'pending'"),
        ),
        # At most one live (pending or running) task per (kind, dedup_key).
        Index(
            "uq_pgotask_task_dedup",
            "kind",
            "dedup_key",
            unique=True,
            postgresql_where=text("dedup_key IS NOT NULL AND status IN ('pending', 'running')"),
        ),
        # The periodic fence: one task per (schedule, slot), however many
        # workers enqueue it.
        Index(
            "uq_pgotask_task_slot",
            "schedule",
            "slot",
            unique=True,
            postgresql_where=text("schedule IS NOT NULL"),
        ),
        # Lease rescue looks up running rows by expiry.
        Index(
            "ix_pgotask_task_lease",
            "lease_expires_at",
            postgresql_where=text("status = 'running'"),
        ),
    )

    @validates("on_duplicate")
    def _check_on_duplicate(self, key: str, value: str | None) -> str | None:
        check_on_duplicate(value)
        return value

    # Checked when set, so a bad Task raises where it is made and the
    # application's transaction goes on (a failed flush would roll it back).
    @validates("kind", "queue")
    def _check_name(self, key: str, value: str) -> str:
        return _validation.check_name(key, value)

    @validates("priority")
    def _check_priority(self, key: str, value: int) -> int:
        return _validation.check_int(key, value)  # type: ignore[no-any-return]

    @validates("max_attempts")
    def _check_max_attempts(self, key: str, value: int | None) -> int | None:
        if value is None:
            return None
        return _validation.check_int(key, value, minimum=1)  # type: ignore[no-any-return]

    @validates("run_at")
    def _check_run_at(self, key: str, value: dt.datetime) -> dt.datetime:
        return _validation.check_run_at(value)  # type: ignore[no-any-return]

    @validates("dedup_key")
    def _check_dedup_key(self, key: str, value: str | None) -> str | None:
        return _validation.check_dedup_key(value)  # type: ignore[no-any-return]

    @validates("payload")
    def _check_payload_value(self, key: str, value: Any) -> Any:
        # ``None`` means the default, as for add_many(): an empty object.
        if value is None:
            return {}
        dump_payload(self.kind if "kind" in self.__dict__ else None, value)
        return value

    @property
    def duplicate_of(self) -> int | None:
        """The id of the live task this one duplicated, if adding it was a no-op.

        Read after the flush: a task added with a ``dedup_key`` while a
        pending or running task of the same kind and key existed is stored
        ``cancelled``, and this names the task that stands instead.
        """
        if self.dedup_key is None or self.status is not TaskStatus.CANCELLED:
            return None
        result = self.result
        if isinstance(result, dict) and isinstance(result.get("duplicate_of"), int):
            return int(result["duplicate_of"])
        return None

    def __repr__(self) -> str:
        return (
            f"<Task id={self.id} kind={self.kind!r} queue={self.queue!r} "
            f"status={self.status} attempts={self.attempts}>"
        )


#: ``bind_arguments`` that route a textual statement about tasks to the
#: engine ``Task`` is bound to (a Session may have several binds).
TASK_BIND: dict[str, Any] = {"mapper": Task.__mapper__}


class TaskError(Base):
    """One failed attempt of a task: what was raised, where, and when."""

    __tablename__ = TASK_ERROR_TABLE

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    task_id: Mapped[int] = mapped_column(ForeignKey(Task.id, ondelete="CASCADE"), index=True)
    attempt: Mapped[int] = mapped_column(Integer)
    exception_type: Mapped[str] = mapped_column(Text)
    message: Mapped[str] = mapped_column(Text, server_default=text("''"))
    traceback: Mapped[str | None] = mapped_column(Text)
    worker: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(_TZ, server_default=func.now())

    task: Mapped[Task] = relationship(back_populates="errors")

    def __repr__(self) -> str:
        return (
            f"<TaskError task_id={self.task_id} attempt={self.attempt} "
            f"{self.exception_type}: {self.message!r}>"
        )


class RegisteredWorker(Base):
    """A running worker, as it registered itself; rows of dead workers are pruned."""

    __tablename__ = WORKER_TABLE

    id: Mapped[str] = mapped_column(Text, primary_key=True)
    host: Mapped[str] = mapped_column(Text)
    pid: Mapped[int] = mapped_column(Integer)
    #: Kernel boot and pid namespace: workers on the same node can check each
    #: other's pid for liveness.
    node: Mapped[str] = mapped_column(Text)
    kinds: Mapped[list[str]] = mapped_column(ARRAY(Text))
    queues: Mapped[list[str] | None] = mapped_column(ARRAY(Text))
    concurrency: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[dt.datetime] = mapped_column(_TZ, server_default=func.now())
    last_heartbeat_at: Mapped[dt.datetime] = mapped_column(_TZ, server_default=func.now())
    #: Handler threads held by a handler still running well past its
    #: ``timeout`` (Python cannot interrupt it): the worker claims nothing for them.
    stuck_slots: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    #: Since when every handler thread is stuck (``None`` while one is free).
    all_stuck_since: Mapped[dt.datetime | None] = mapped_column(_TZ)

    def __repr__(self) -> str:
        return f"<RegisteredWorker {self.id} kinds={self.kinds} queues={self.queues}>"


class ScheduleState(Base):
    """A periodic schedule as the database knows it: the last slot enqueued.

    Workers write it; the row of a schedule removed from the code stays,
    inert, until deleted.
    """

    __tablename__ = SCHEDULE_TABLE

    name: Mapped[str] = mapped_column(Text, primary_key=True)
    kind: Mapped[str] = mapped_column(Text)
    expression: Mapped[str] = mapped_column(Text)
    timezone: Mapped[str] = mapped_column(Text)
    last_slot: Mapped[dt.datetime | None] = mapped_column(_TZ)
    updated_at: Mapped[dt.datetime] = mapped_column(_TZ, server_default=func.now())

    def __repr__(self) -> str:
        return f"<ScheduleState {self.name!r} {self.expression!r} last_slot={self.last_slot}>"


class QueueState(Base):
    """A queue's fleet-wide state: paused when ``paused_at`` is set."""

    __tablename__ = QUEUE_TABLE

    name: Mapped[str] = mapped_column(Text, primary_key=True)
    paused_at: Mapped[dt.datetime | None] = mapped_column(_TZ)
    updated_at: Mapped[dt.datetime] = mapped_column(_TZ, server_default=func.now())

    def __repr__(self) -> str:
        return f"<QueueState {self.name!r} paused_at={self.paused_at}>"


class LimitState(Base):
    """The state of one fleet-wide limit (``kind:<name>`` or ``queue:<name>``)."""

    __tablename__ = LIMIT_TABLE

    key: Mapped[str] = mapped_column(Text, primary_key=True)
    recent_starts: Mapped[list[dt.datetime]] = mapped_column(
        ARRAY(_TZ), server_default=text("'{}'")
    )
    updated_at: Mapped[dt.datetime] = mapped_column(_TZ, server_default=func.now())

    def __repr__(self) -> str:
        return f"<LimitState {self.key!r}>"


ON_DUPLICATE = ("ignore", "replace")


def check_on_duplicate(value: object) -> None:
    """Raise :class:`ValueError` unless ``value`` is a valid ``on_duplicate`` (or ``None``)."""
    if value is not None and value not in ON_DUPLICATE:
        raise ValueError(f"on_duplicate must be 'ignore', 'replace' or None, not {value!r}")


#: ``json.dumps(value, allow_nan=False)``, without building an encoder per call.
encode_json = json.JSONEncoder(allow_nan=False).encode


def dump_payload(kind: str | None, payload: Any) -> str:
    """``payload`` as JSON text, or :class:`InvalidPayloadError` naming the task's kind."""
    try:
        json_text = encode_json(payload)
    except (TypeError, ValueError, RecursionError) as exc:
        raise _not_json(kind, exc) from exc
    return _validation.check_json_text(kind, json_text)


def _not_json(kind: str | None, exc: Exception) -> InvalidPayloadError:
    if isinstance(exc, RecursionError):
        return InvalidPayloadError(f"Task(kind={kind!r}): payload is nested too deeply: {exc}")
    return InvalidPayloadError(f"Task(kind={kind!r}): payload is not JSON-serialisable: {exc}")


def _check_payload(mapper: Mapper[Any], connection: Connection, target: Task) -> None:
    """Refuse, at flush, a payload that cannot be stored as JSON."""
    payload = target.payload
    if payload is not None:
        dump_payload(target.kind, payload)


def _check_changed_payload(mapper: Mapper[Any], connection: Connection, target: Task) -> None:
    """The same check for an update, when the payload is part of it.

    An update that leaves the payload alone neither loads nor encodes it.
    """
    if inspect(target).attrs.payload.history.has_changes():
        _check_payload(mapper, connection, target)


def _refuse_change_of_errors(target: Task, value: object, initiator: AttributeEventToken) -> None:
    """``task.errors`` is read-only: say so rather than drop the change at flush."""
    if initiator.impl.key == "task":  # ``TaskError(task=task)``, mirrored in the collection
        return
    raise TypeError(
        "Task.errors is read-only (the worker writes TaskError rows): "
        "add TaskError(task=task, ...) to the Session instead"
    )


event.listen(Task, "before_insert", _check_payload)
event.listen(Task, "before_update", _check_changed_payload)
event.listen(Task.errors, "append", _refuse_change_of_errors)
event.listen(Task.errors, "remove", _refuse_change_of_errors)
