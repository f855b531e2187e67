"""Enqueueing many tasks at once.

``session.add(Task(...))`` is the way to enqueue one task; for thousands in one
transaction, :func:`add_many` inserts them with a single statement, without
building ORM objects::

    from sqla_pgotask import add_many

    with Session.begin() as session:
        # one kind, one payload per task: the fastest form
        add_many(session, "resize", ({"image": i} for i in ids), queue="images")
        # or one mapping (or Task) per task, each with its own options
        add_many(session, [{"kind": "report", "payload": {"day": d}, "priority": 5} for d in days])

The tasks exist exactly when the transaction commits, as with ``session.add``,
and workers are woken once per queue, not once per task.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable, Mapping
from functools import cache
from typing import Any, Final, Literal, TypedDict, overload

from sqlalchemy import TextClause, text
from sqlalchemy.orm import Session

from sqla_pgotask import _tracing, _validation
from sqla_pgotask._queries import query
from sqla_pgotask.errors import InvalidPayloadError, InvalidTaskError
from sqla_pgotask.models import TASK_BIND, Task, check_on_duplicate, dump_payload, encode_json

__all__ = ["TaskFields", "add_many"]


class _RequiredTaskFields(TypedDict):
    kind: str


class TaskFields(_RequiredTaskFields, total=False):
    """The columns :func:`add_many` sets from a mapping; only ``kind`` is required.

    A key left out, or set to ``None``, takes the column's default (a payload
    left out or ``None`` becomes ``{}``).
    """

    payload: Any
    queue: str | None
    priority: int | None
    run_at: dt.datetime | None
    max_attempts: int | None
    dedup_key: str | None
    on_duplicate: Literal["ignore", "replace"] | None


#: Keys a task mapping may have: the columns an enqueue may set.
_FIELDS: Final = frozenset(
    {"kind", "payload", "queue", "priority", "run_at", "max_attempts", "dedup_key", "on_duplicate"}
)

#: The optional columns that may vary from task to task, and their array parameter.
_PER_TASK: Final = (
    ("queue", "queues"),
    ("priority", "priorities"),
    ("run_at", "run_ats"),
    ("max_attempts", "max_attempts_list"),
    ("dedup_key", "dedup_keys"),
    ("on_duplicate", "on_duplicates"),
)

#: The columns of a ``Task`` that add_many() cannot set.
_TASK_COLUMNS_NOT_SET: Final = tuple(
    column.key for column in Task.__table__.columns if column.key not in _FIELDS
)

#: Every parameter of ``bulk_insert``, unset: NULL means "not given".
_NO_PARAMS: Final[dict[str, object]] = {
    "kind": None,
    "queue": None,
    "priority": None,
    "run_at": None,
    "max_attempts": None,
    "kinds": None,
    "trace_context": None,
    **{array: None for _, array in _PER_TASK},
}


@overload
def add_many(
    session: Session,
    tasks: Iterable[Task | Mapping[str, Any]],
    *,
    return_ids: Literal[False] = False,
) -> int: ...
@overload
def add_many(
    session: Session,
    tasks: Iterable[Task | Mapping[str, Any]],
    *,
    return_ids: Literal[True],
) -> list[int]: ...
@overload
def add_many(
    session: Session,
    kind: str,
    payloads: Iterable[Any],
    /,
    *,
    queue: str | None = None,
    priority: int | None = None,
    run_at: dt.datetime | None = None,
    max_attempts: int | None = None,
    return_ids: Literal[False] = False,
) -> int: ...
@overload
def add_many(
    session: Session,
    kind: str,
    payloads: Iterable[Any],
    /,
    *,
    queue: str | None = None,
    priority: int | None = None,
    run_at: dt.datetime | None = None,
    max_attempts: int | None = None,
    return_ids: Literal[True],
) -> list[int]: ...
def add_many(
    session: Session,
    tasks: Iterable[Task | Mapping[str, Any]] | str,
    payloads: Iterable[Any] | None = None,
    *,
    queue: str | None = None,
    priority: int | None = None,
    run_at: dt.datetime | None = None,
    max_attempts: int | None = None,
    return_ids: bool = False,
) -> int | list[int]:
    """Insert many tasks in ``session``'s transaction with one statement.

    Two forms:

    * ``add_many(session, kind, payloads, queue=..., priority=..., run_at=...,
      max_attempts=...)``: one task of ``kind`` per payload, the options
      applying to all of them.  The fastest form.
    * ``add_many(session, tasks)``: one :class:`TaskFields` mapping (``{"kind":
      ..., "payload": ..., "queue": ..., ...}``) or one new ``Task`` per task,
      each with its own options.  ``Task`` objects are only read: they are not
      added to the Session and get no ids.

    Options left out, or ``None``, take the column defaults; a payload left out
    or ``None`` becomes ``{}``.  Returns how many tasks were inserted, or with
    ``return_ids=True`` their ids, in the order given (at the cost of a
    ``RETURNING`` clause).

    Everything is checked before anything is sent: a payload that is not
    JSON-serialisable raises :class:`~sqla_pgotask.InvalidPayloadError`
    naming the task's position and kind, and so does a task without a kind; an
    unknown key raises ``TypeError``.  A task whose ``(kind, dedup_key)``
    matches a live task (or an earlier task of the same call) is a no-op, as
    with ``session.add``: its row is stored ``cancelled`` as a duplicate, or
    with ``"on_duplicate": "replace"`` it updates the pending original (see
    ``docs/deduplication.md``).
    """
    if isinstance(tasks, str):
        if payloads is None:
            raise TypeError("add_many(session, kind, payloads): payloads are missing")
        count, params = _kind_params(tasks, payloads, queue, priority, run_at, max_attempts)
    else:
        if payloads is not None:
            raise TypeError(
                "add_many(session, tasks) takes no payloads argument; "
                "use add_many(session, kind, payloads) for tasks of one kind"
            )
        options = {
            "queue": queue,
            "priority": priority,
            "run_at": run_at,
            "max_attempts": max_attempts,
        }
        given = [name for name, value in options.items() if value is not None]
        if given:
            raise TypeError(
                f"add_many(session, tasks) takes no {', '.join(given)} argument: set it "
                "in each task, or use add_many(session, kind, payloads, ...)"
            )
        count, params = _rows_params(tasks)
    if not count:
        return [] if return_ids else 0
    params["trace_context"] = _tracing.current_json()
    connection = session.connection(bind_arguments=TASK_BIND)
    if return_ids:
        # Identity values grow in insertion order, which is the order given.
        return sorted(connection.execute(_insert_returning_ids(), params).scalars())
    connection.execute(query("bulk_insert"), params)
    return count


def _kind_params(
    kind: str,
    payloads: Iterable[Any],
    queue: str | None,
    priority: int | None,
    run_at: dt.datetime | None,
    max_attempts: int | None,
) -> tuple[int, dict[str, object]]:
    """``bulk_insert``'s parameters for tasks of one ``kind``, one per payload."""
    if not kind:
        raise InvalidPayloadError("add_many(): the kind must be a non-empty string")
    if isinstance(payloads, (str, bytes, Mapping)):
        raise TypeError(
            f"add_many(session, kind, payloads): payloads must be an iterable of payloads, "
            f"one per task, not a {type(payloads).__name__}"
        )
    _validation.check_name("kind", kind)
    for column, value in (
        ("queue", queue),
        ("priority", priority),
        ("run_at", run_at),
        ("max_attempts", max_attempts),
    ):
        if value is not None:
            _CHECKS[column](value)
    payload_list = list(payloads)
    params = dict(_NO_PARAMS)
    params.update(
        kind=kind,
        queue=queue,
        priority=priority,
        run_at=run_at,
        max_attempts=max_attempts,
        payloads=_dump_payloads(payload_list, lambda _: kind),
    )
    return len(payload_list), params


def _rows_params(tasks: Iterable[Task | Mapping[str, Any]]) -> tuple[int, dict[str, object]]:
    """``bulk_insert``'s parameters for one mapping or ``Task`` per task."""
    rows = [_fields(task) for task in tasks]
    if not rows:
        return 0, {}
    keys: set[str] = set().union(*rows)
    if not keys <= _FIELDS:
        _raise_unknown_field(rows, keys - _FIELDS)
    kinds = [row.get("kind") for row in rows]
    try:
        distinct_kinds = set(kinds)
    except TypeError:  # an unhashable kind
        distinct_kinds = {None}
    if not all(isinstance(kind, str) and kind for kind in distinct_kinds):
        index = next(i for i, kind in enumerate(kinds) if not (isinstance(kind, str) and kind))
        raise InvalidPayloadError(
            f"add_many(): task {index} has no kind (a non-empty string is required), "
            f"it has {kinds[index]!r}"
        )
    params = dict(_NO_PARAMS)
    if len(distinct_kinds) == 1:
        params["kind"] = kinds[0]
    else:
        params["kinds"] = kinds
    for index, kind in enumerate(kinds if len(distinct_kinds) > 1 else kinds[:1]):
        try:
            _validation.check_name("kind", kind)
        except InvalidTaskError as exc:
            raise InvalidTaskError(f"add_many(): task {index}: {exc}") from None
    for column, array in _PER_TASK:
        if column in keys:
            values = params[array] = [row.get(column) for row in rows]
            check = _CHECKS.get(column)
            if check is not None:
                for index, value in enumerate(values):
                    if value is not None:
                        try:
                            check(value)
                        except InvalidTaskError as exc:
                            raise InvalidTaskError(f"add_many(): task {index}: {exc}") from None
    if "on_duplicate" in keys:
        for index, row in enumerate(rows):
            value = row.get("on_duplicate")
            try:
                check_on_duplicate(value)
            except ValueError as exc:
                raise ValueError(f"add_many(): task {index}: {exc}") from None
    params["payloads"] = _dump_payloads([row.get("payload") for row in rows], kinds.__getitem__)
    return len(rows), params


def _fields(task: Task | Mapping[str, Any]) -> Mapping[str, Any]:
    """The columns ``task`` sets, as a mapping."""
    if type(task) is dict:
        return task
    if isinstance(task, Task):
        values = task.__dict__  # the attributes set on a new Task, and the ORM's state
        unsettable = [key for key in _TASK_COLUMNS_NOT_SET if values.get(key, None) is not None]
        if unsettable:
            raise TypeError(
                f"add_many(): {task!r} sets {', '.join(unsettable)}, which add_many() "
                "cannot set (pass new tasks, with only these set: "
                f"{', '.join(sorted(_FIELDS))})"
            )
        return {key: values[key] for key in _FIELDS if key in values}
    if isinstance(task, Mapping):
        return task
    raise TypeError(
        f"add_many() takes Task objects or mappings of task fields, not {type(task).__name__}"
    )


def _raise_unknown_field(rows: list[Mapping[str, Any]], unknown: set[str]) -> None:
    for index, row in enumerate(rows):
        extra = sorted(key for key in row if key in unknown)
        if extra:
            raise TypeError(
                f"add_many(): task {index} has unknown field(s) {', '.join(map(repr, extra))} "
                f"(task fields: {', '.join(sorted(_FIELDS))})"
            )


#: The checks of the columns add_many() may set besides kind and payload.
_CHECKS: Final[dict[str, Callable[[Any], object]]] = {
    "queue": lambda value: _validation.check_name("queue", value),
    "priority": lambda value: _validation.check_int("priority", value),
    "run_at": _validation.check_run_at,
    "max_attempts": lambda value: _validation.check_int("max_attempts", value, minimum=1),
    "dedup_key": _validation.check_dedup_key,
}


def _dump_payloads(payloads: list[Any], kind_at: Callable[[int], object]) -> str:
    """All payloads as one JSON array, or ``InvalidPayloadError`` naming the culprit."""
    try:
        json_text = encode_json(payloads)
    except (TypeError, ValueError, RecursionError):
        json_text = None
    # An escape (``\\u``) may be one jsonb refuses (NUL, a lone surrogate):
    # then, as when encoding failed, look at each payload to name the culprit.
    if json_text is not None and "\\u" not in json_text:
        return json_text
    for index, payload in enumerate(payloads):
        try:
            dump_payload(str(kind_at(index)), payload)
        except InvalidPayloadError as exc:
            raise InvalidPayloadError(f"add_many(): task {index}: {exc}") from exc.__cause__
    if json_text is None:
        raise InvalidPayloadError("add_many(): the payloads are not JSON-serialisable")
    return json_text


@cache
def _insert_returning_ids() -> TextClause:
    return text(f"{query('bulk_insert').text} RETURNING id")
