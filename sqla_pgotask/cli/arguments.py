"""The argument types of the ``pgotask`` command, bounded by what the database can hold.

Each one turns a command-line string into a value or raises
:class:`argparse.ArgumentTypeError` (a usage error, exit code 2) with a
message that says why: a whole number out of its column's range, a
duration over :data:`MAX_DURATION`, text PostgreSQL cannot store (a NUL,
bytes that are not UTF-8), a queue name too long to be a NOTIFY payload, a
payload that is not JSON.  So no bad argument reaches the database.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import re
from collections.abc import Callable
from typing import Any

from sqla_pgotask.cli.database import MAX_JSON_DEPTH, check_text
from sqla_pgotask.worker.supervisor import MAX_PROCESSES

# The database's integer types.
INT4_MIN, INT4_MAX = -(2**31), 2**31 - 1
INT8_MAX = 2**63 - 1
#: ``--concurrency`` and ``--queue Q=N``: handler threads of one process.
MAX_CONCURRENCY = 1024
#: ``--batch-size`` and ``list --limit``: tasks handled or printed at once.
MAX_BATCH = 1_000_000
#: Every duration and number of seconds: 100 years.
MAX_DURATION = dt.timedelta(days=36_500)
MAX_SECONDS = MAX_DURATION.total_seconds()
#: Workers are woken with a task's queue as the NOTIFY payload: under 8000 bytes.
MAX_QUEUE_BYTES = 7_999

_WHOLE_NUMBER = re.compile(r"[+-]?\d+")
# Longer than any bound above: out of range without converting (int() refuses
# more than 4300 digits).
_MAX_DIGITS = 25


def shown(value: str, limit: int = 60) -> str:
    """``value`` quoted for a message, cut to ``limit`` characters (an argument may be huge)."""
    return repr(value) if len(value) <= limit else f"{value[:limit]!r}... ({len(value)} chars)"


def whole_number(
    low: int, high: int, *, why: str = "", invalid: str = "a whole number"
) -> Callable[[str], int]:
    """An argument type for a whole number from ``low`` to ``high``; ``why`` explains ``high``."""

    def parse(value: str) -> int:
        text = value.strip()
        if _WHOLE_NUMBER.fullmatch(text) is None:
            raise argparse.ArgumentTypeError(f"expected {invalid}, got {shown(value)}")
        number = int(text) if len(text.lstrip("+-")) <= _MAX_DIGITS else None
        got = shown(text, 30) if number is None else number
        if text.startswith("-") if number is None else number < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {got}")
        if number is None or number > high:
            raise argparse.ArgumentTypeError(
                f"must be at most {high}{f' ({why})' if why else ''}, got {got}"
            )
        return number

    return parse


positive_int = whole_number(1, INT8_MAX)
task_id = whole_number(1, INT8_MAX, why="a bigint", invalid="a task id (a whole number)")
int4 = whole_number(INT4_MIN, INT4_MAX, why="a 32-bit integer")
positive_int4 = whole_number(1, INT4_MAX, why="a 32-bit integer")
batch = whole_number(1, MAX_BATCH)
concurrency = whole_number(
    1, MAX_CONCURRENCY, why="handler threads of one process; run more processes for more"
)
processes = whole_number(1, MAX_PROCESSES, why="worker processes of one supervisor")


def seconds(low: float, *, inclusive: bool) -> Callable[[str], float]:
    """A number of seconds over ``low`` (or from ``low``), at most :data:`MAX_SECONDS`."""

    def parse(value: str) -> float:
        try:
            number = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected a number of seconds, got {shown(value)}"
            ) from None
        if not (number >= low if inclusive else number > low):
            relation = f"{low:g} or more" if inclusive else f"greater than {low:g}"
            raise argparse.ArgumentTypeError(f"must be {relation}, got {shown(value, 30)}")
        if not number <= MAX_SECONDS:
            raise argparse.ArgumentTypeError(
                f"must be at most {MAX_SECONDS:.0f} seconds (100 years), got {shown(value, 30)}"
            )
        return number

    return parse


positive_seconds = seconds(0, inclusive=False)
non_negative_seconds = seconds(0, inclusive=True)

_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_DURATION_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def duration(value: str) -> dt.timedelta:
    """``30s``, ``15m``, ``12h``, ``7d`` (or ``1.5h``) as a timedelta, at most 100 years."""
    found = _DURATION.fullmatch(value.strip())
    if found is None:
        raise argparse.ArgumentTypeError(
            f"expected a duration like 30s, 15m, 12h or 7d, got {shown(value)}"
        )
    number, unit = found.groups()
    try:
        length = dt.timedelta(**{_DURATION_UNITS[unit]: float(number)})
    except OverflowError:
        length = dt.timedelta.max
    if length > MAX_DURATION:
        raise argparse.ArgumentTypeError(
            f"duration {shown(value, 30)} is too long: at most {MAX_DURATION.days}d (100 years)"
        )
    return length


def positive_duration(value: str) -> dt.timedelta:
    """A :func:`duration` longer than zero."""
    length = duration(value)
    if length <= dt.timedelta(0):
        raise argparse.ArgumentTypeError(f"must be longer than 0s, got {shown(value)}")
    return length


def seconds_or_duration(value: str) -> float:
    """``60`` (seconds) or a duration like ``30s``, ``5m``."""
    try:
        float(value)
    except ValueError:
        return duration(value).total_seconds()
    return non_negative_seconds(value)


def text(
    what: str, *, required: bool = False, max_bytes: int | None = None
) -> Callable[[str], str]:
    """An argument type for text PostgreSQL can store, named ``what`` in the errors.

    ``required``: not empty (nor blank); ``max_bytes``: at most that many
    bytes in UTF-8.
    """

    def parse(value: str) -> str:
        try:
            check_text(value, what)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{exc}: {shown(value)}") from None
        if required and not value.strip():
            raise argparse.ArgumentTypeError(f"{what} must not be empty")
        if max_bytes is not None and len(value.encode()) > max_bytes:
            raise argparse.ArgumentTypeError(
                f"{what} is too long: {len(value.encode())} bytes in UTF-8, "
                f"at most {max_bytes}: {shown(value)}"
            )
        return value

    return parse


def non_empty(what: str) -> Callable[[str], str]:
    """An argument type refusing an empty (or blank) value, named ``what`` in the error."""
    return text(what, required=True)


queue_name = text("a queue name", required=True, max_bytes=MAX_QUEUE_BYTES)


def queue_spec(value: str) -> tuple[str, int | None]:
    """``NAME`` or ``NAME=N`` (N handler threads of the queue's own)."""
    name, sep, number_text = value.rpartition("=")
    count: str | None = number_text
    if not sep or not re.fullmatch(r"\s*[+-]?\d*\s*", number_text):
        name, count = value, None  # no '=N' (an '=' may be part of the name)
    if not name.strip():
        raise argparse.ArgumentTypeError(
            f"expected NAME or NAME=N (N handler threads for that queue), got {shown(value)}"
        )
    queue_name(name)
    if count is None:
        return name, None
    if not count.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=N with a number N, got {shown(value)}")
    try:
        return name, concurrency(count)
    except argparse.ArgumentTypeError as exc:
        raise argparse.ArgumentTypeError(f"the concurrency of queue {shown(name)} {exc}") from None


def port(value: str) -> int:
    """A TCP port: 0 (any free one) to 65535."""
    stripped = value.strip()
    if _WHOLE_NUMBER.fullmatch(stripped) is None:
        raise argparse.ArgumentTypeError(f"not a port number: {shown(value)}")
    number = int(stripped) if len(stripped) <= _MAX_DIGITS else None
    if number is None or not 0 <= number <= 65535:
        got = shown(stripped, 30) if number is None else number
        raise argparse.ArgumentTypeError(f"a port is between 0 and 65535, not {got}")
    return number


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(number: str) -> float:
    value = float(number)
    if not math.isfinite(value):
        raise ValueError(f"the number {shown(number, 30)} is out of a float's range")
    return value


def payload(value: str) -> Any:
    """A JSON document that jsonb can store, nested at most :data:`MAX_JSON_DEPTH` levels."""
    try:
        check_text(value, "the payload")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    try:
        document = json.loads(value, parse_constant=_refuse_constant, parse_float=_finite_float)
    except RecursionError:
        document = None
        deep = True
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"the payload is not valid JSON: {exc}") from None
    else:
        deep = False
    strings: list[str] = []
    stack: list[tuple[Any, int]] = [(document, 1)]
    while stack and not deep:
        item, depth = stack.pop()
        if isinstance(item, str):
            strings.append(item)
        elif isinstance(item, dict | list):
            deep = depth > MAX_JSON_DEPTH
            if isinstance(item, dict):
                strings.extend(item)
            stack.extend((child, depth + 1) for child in _children(item))
    if deep:
        raise argparse.ArgumentTypeError(
            f"the payload is nested deeper than {MAX_JSON_DEPTH} levels"
        )
    for string in strings:
        try:
            check_text(string, "a string of the payload")
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"the payload holds a string that jsonb cannot store: {shown(string)} "
                "(a NUL character, \\u0000, or half of a surrogate pair)"
            ) from None
    return document


def _children(item: dict[str, Any] | list[Any]) -> list[Any]:
    return list(item.values()) if isinstance(item, dict) else item


def run_at(value: str) -> dt.datetime | dt.timedelta:
    """``+30s``/``+15m``/``+2h``/``+1d`` (from now), or an ISO 8601 time with a time zone."""
    stripped = value.strip()
    if stripped.startswith("+"):
        return duration(stripped[1:])
    try:
        when = dt.datetime.fromisoformat(stripped)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected an ISO 8601 time with a time zone (2030-01-31T09:00:00+01:00 or ...Z) "
            f"or a delay like +30s, +15m, +2h, +1d; got {shown(value)}"
        ) from None
    if when.tzinfo is None or when.utcoffset() is None:
        raise argparse.ArgumentTypeError(
            f"{shown(value)} has no time zone: add one (+00:00, Z, +01:00, ...)"
        )
    try:
        when.astimezone(dt.timezone.utc)
    except OverflowError:
        raise argparse.ArgumentTypeError(
            f"{shown(value)} is out of range: in UTC, it must fall in the years 1 to 9999"
        ) from None
    return when


def batch_size_option(parser: argparse.ArgumentParser, default: int, what: str) -> None:
    """``--batch-size N`` of a bulk command: ``what`` one transaction handles."""
    parser.add_argument(
        "--batch-size",
        type=batch,
        default=default,
        metavar="N",
        help=f"{what} (default: {default})",
    )
