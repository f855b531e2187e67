"""What a task's fields may hold, checked in Python before anything is sent.

The table's CHECK constraints (migration ``sqla_pgotask_0005``) refuse the
same values from plain SQL; checking here first gives a message that names
the field, and leaves the application's transaction usable: a ``Task`` with
a bad field raises when it is made (or the field assigned), not inside a
flush, which would roll the whole Session back.
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Any

from sqlalchemy.sql import ClauseElement

from sqla_pgotask.errors import InvalidPayloadError, InvalidTaskError

#: The longest kind or queue name, in characters.  A queue name travels as
#: the payload of the wake-up ``NOTIFY``, which carries at most 7,999 bytes.
MAX_NAME_LENGTH = 200
#: The longest ``dedup_key``, in UTF-8 bytes: it is indexed with the kind,
#: and a btree entry holds at most about 2,700 bytes.
MAX_DEDUP_KEY_BYTES = 1000
#: The instants ``run_at`` may take (the table refuses others): finite, and
#: far enough from the ends of ``datetime`` for any time zone to show them.
EARLIEST_RUN_AT = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
LATEST_RUN_AT = dt.datetime(9000, 1, 1, tzinfo=dt.timezone.utc)
#: An ``integer`` column's range (priority, max_attempts).
INT_MIN, INT_MAX = -(2**31), 2**31 - 1


def check_name(field: str, value: object) -> str:
    """A kind or queue name: a non-empty string of at most :data:`MAX_NAME_LENGTH` characters."""
    if not isinstance(value, str) or not value:
        raise InvalidTaskError(f"Task.{field} must be a non-empty string, not {value!r}")
    if len(value) > MAX_NAME_LENGTH:
        raise InvalidTaskError(
            f"Task.{field} is {len(value):,} characters long; at most {MAX_NAME_LENGTH} are allowed"
        )
    if "\x00" in value:
        raise InvalidTaskError(f"Task.{field} must not contain NUL characters: {value!r}")
    _check_text(field, value)
    return value


def check_int(field: str, value: object, *, minimum: int = INT_MIN) -> Any:
    """An ``integer`` column's value (or a SQL expression), never a float or a bool."""
    if isinstance(value, ClauseElement):
        return value
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidTaskError(f"Task.{field} must be an integer, not {value!r}")
    if not minimum <= value <= INT_MAX:
        raise InvalidTaskError(f"Task.{field} must be between {minimum} and {INT_MAX}, not {value}")
    return value


def check_run_at(value: object) -> Any:
    """An aware ``datetime`` within the table's range, a SQL expression, or ``None``."""
    if value is None or isinstance(value, ClauseElement):
        return value
    if not isinstance(value, dt.datetime):
        raise InvalidTaskError(f"Task.run_at must be a datetime, not {value!r}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise InvalidTaskError(
            f"Task.run_at must be timezone-aware (e.g. datetime.now(timezone.utc) + ...), not "
            f"the naive {value.isoformat()}: PostgreSQL would read it in the session's time zone"
        )
    try:
        in_range = EARLIEST_RUN_AT <= value < LATEST_RUN_AT
    except OverflowError:  # datetime.min with a positive offset, say
        in_range = False
    if not in_range:
        raise InvalidTaskError(
            f"Task.run_at must be between {EARLIEST_RUN_AT.date()} and {LATEST_RUN_AT.date()}, "
            f"not {value.isoformat()}"
        )
    return value


def check_dedup_key(value: object) -> Any:
    """A ``dedup_key``: ``None``, or a string of at most :data:`MAX_DEDUP_KEY_BYTES` bytes."""
    if value is None or isinstance(value, ClauseElement):
        return value
    if not isinstance(value, str):
        raise InvalidTaskError(f"Task.dedup_key must be a string, not {value!r}")
    if "\x00" in value:
        raise InvalidTaskError("Task.dedup_key must not contain NUL characters")
    size = len(_check_text("dedup_key", value).encode())
    if size > MAX_DEDUP_KEY_BYTES:
        raise InvalidTaskError(
            f"Task.dedup_key is {size:,} bytes long in UTF-8; at most "
            f"{MAX_DEDUP_KEY_BYTES:,} are allowed (use a hash of a longer key)"
        )
    return value


def _check_text(field: str, value: str) -> str:
    try:
        value.encode()
    except UnicodeEncodeError as exc:  # a lone surrogate
        raise InvalidTaskError(f"Task.{field} is not valid Unicode text: {exc}") from exc
    return value


# JSON text that PostgreSQL's jsonb refuses although Python wrote it: the
# escape of NUL, and a UTF-16 surrogate that is not part of a pair.
_UNSTORABLE_ESCAPE = re.compile(r"(?<!\\)(?:\\\\)*\\u(?:0000|d[89a-f][0-9a-f]{2})", re.IGNORECASE)
_PAIRED_LOW = re.compile(r"\\ud[89ab][0-9a-f]{2}\\ud[c-f][0-9a-f]{2}", re.IGNORECASE)


def check_json_text(kind: object, json_text: str) -> str:
    """Refuse JSON text holding what ``jsonb`` cannot store: NUL or a lone surrogate."""
    if "\\u" not in json_text:  # the usual case: nothing to look at
        return json_text
    # A high surrogate followed by a low one is a pair (a character outside the
    # BMP): take pairs out, then any surrogate left is alone.
    match = _UNSTORABLE_ESCAPE.search(_PAIRED_LOW.sub("", json_text))
    if match is not None:
        what = "a NUL character" if match.group().lower().endswith("0000") else "a lone surrogate"
        raise InvalidPayloadError(
            f"Task(kind={kind!r}): payload holds {what} ({match.group()[-6:]}), "
            "which PostgreSQL's jsonb cannot store"
        )
    return json_text
