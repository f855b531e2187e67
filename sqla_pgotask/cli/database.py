"""How the ``pgotask`` command reaches the database, and what a database error means to it.

* The URL: ``--database-url``, else ``$PGOTASK_DATABASE_URL``, else
  ``$DATABASE_URL`` (the variable applications commonly read theirs from).
  The command connects with psycopg 3: URLs of the other libpq drivers
  (``postgres://``, ``postgresql://``, ``postgresql+psycopg2://``) are used
  with it as they are; any other URL is refused with a clear message.
* The engine: its connections load the values Python cannot hold as
  stand-ins that print what the database holds — timestamps outside years
  1 to 9999 (``infinity``, ``-infinity``, BC dates) and JSON nested too deep
  or with numbers beyond a float's range — so that one odd row, inserted by
  plain SQL, cannot break ``list``, ``show`` or ``check``.
* A database error: an exit code of :mod:`sqla_pgotask.cli` and one line.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg.types.datetime import TimestampLoader, TimestamptzLoader
from sqlalchemy import URL, Engine, create_engine, event, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from sqla_pgotask._exit_codes import (
    EXIT_ERROR,
    EXIT_SCHEMA,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    UsageError,
)
from sqla_pgotask.errors import ConfigurationError

#: Where the URL comes from when ``--database-url`` is not given, first match wins.
URL_ENVIRONMENT = ("PGOTASK_DATABASE_URL", "DATABASE_URL")

# libpq-based drivers: their URLs mean the same to psycopg 3.
_LIBPQ_DRIVERS = frozenset({"", "psycopg", "psycopg_async", "psycopg2", "psycopg2cffi"})
_URL_EXAMPLE = "postgresql+psycopg://user:password@host:5432/database"


def check_text(value: str, what: str) -> str:
    """``value``, or :class:`ValueError` if PostgreSQL cannot store it as text.

    A NUL character is not allowed in PostgreSQL text, and an argument that is
    not valid UTF-8 reaches Python as lone surrogates (``surrogateescape``).
    """
    if "\x00" in value:
        raise ValueError(f"{what} contains a NUL character, which PostgreSQL text cannot hold")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{what} is not valid UTF-8 text") from None
    return value


def find_url(option: str | None, environ: Mapping[str, str] | None = None) -> URL | None:
    """The database URL of this command, from the option or the environment, or ``None``."""
    environ = os.environ if environ is None else environ
    found = [(option, "--database-url")] + [(environ.get(n), f"${n}") for n in URL_ENVIRONMENT]
    for text, source in found:
        if text:
            return parse_url(text, source)
    return None


def parse_url(text: str, source: str) -> URL:
    """``text`` as a psycopg 3 URL, or :class:`ConfigurationError` naming ``source``."""
    try:
        check_text(text, f"the database URL of {source}")
    except ValueError as exc:
        raise ConfigurationError(str(exc)) from None
    try:
        url = make_url(text)
    except (ArgumentError, ValueError):
        # Not repeated in the message: the text may hold a password.
        raise ConfigurationError(
            f"the database URL of {source} cannot be parsed: expected {_URL_EXAMPLE}"
        ) from None
    backend, _, driver = url.drivername.partition("+")
    shown = url.render_as_string(hide_password=True)
    if backend not in ("postgresql", "postgres"):
        raise ConfigurationError(
            f"the database URL of {source} is not a PostgreSQL URL: {shown} "
            f"(sqla_pgotask keeps its tasks in PostgreSQL: {_URL_EXAMPLE})"
        )
    if driver not in _LIBPQ_DRIVERS:
        raise ConfigurationError(
            f"the database URL of {source} names the {driver} driver: the pgotask command "
            f"connects with psycopg 3 (a postgresql+psycopg:// URL), got {shown}"
        )
    return url.set(drivername="postgresql+psycopg")


def create_cli_engine(url: URL) -> Engine:
    """An engine on ``url`` whose connections load odd values as stand-ins (see the module docs)."""
    engine = create_engine(url, json_deserializer=load_json)
    event.listen(engine, "connect", _register_lenient_loaders)
    return engine


# -- values Python cannot hold ------------------------------------------------------


class OutOfRangeTimestamp(dt.datetime):
    """A timestamp outside Python's years 1 to 9999, as the database printed it.

    It compares as the earliest or the latest datetime (``infinity`` and
    years after 9999 as :attr:`datetime.max`, the rest as :attr:`datetime.min`)
    and formats as the database's text: ``infinity``, ``0044-03-15 00:00:00+00 BC``.
    """

    text: str

    def __new__(cls, text: str) -> OutOfRangeTimestamp:
        early = text.startswith("-") or text.endswith(" BC")
        bound = dt.datetime.min if early else dt.datetime.max
        self = super().__new__(
            cls,
            bound.year,
            bound.month,
            bound.day,
            bound.hour,
            bound.minute,
            bound.second,
            bound.microsecond,
            dt.timezone.utc,
        )
        self.text = text
        return self

    def isoformat(self, sep: str = "T", timespec: str = "auto") -> str:
        """The database's text of the timestamp."""
        return self.text

    def __str__(self) -> str:
        return self.text

    def __repr__(self) -> str:
        return f"OutOfRangeTimestamp({self.text!r})"


def _lenient(base: type[TimestamptzLoader] | type[TimestampLoader]) -> type[Any]:
    class Lenient(base):  # type: ignore[valid-type, misc]
        def load(self, data: Any) -> dt.datetime:
            try:
                loaded: dt.datetime = super().load(data)
            except psycopg.DataError:
                return OutOfRangeTimestamp(bytes(data).decode("utf-8", "replace"))
            return loaded

    Lenient.__name__ = f"Lenient{base.__name__}"
    return Lenient


_LENIENT_LOADERS = {
    "timestamptz": _lenient(TimestamptzLoader),
    "timestamp": _lenient(TimestampLoader),
}


def _register_lenient_loaders(dbapi_connection: Any, connection_record: object) -> None:
    for name, loader in _LENIENT_LOADERS.items():
        dbapi_connection.adapters.register_loader(name, loader)


class RawJSON:
    """JSON the database holds that Python cannot load faithfully, kept as its text.

    A document nested deeper than :data:`MAX_JSON_DEPTH` levels (Python's
    parser and printer recurse), an integer of more digits than Python
    converts, or a number beyond a float's range.  :func:`dump_json` writes
    the text back as it is.
    """

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return f"RawJSON({self.text[:40]!r}{'...' if len(self.text) > 40 else ''})"


#: Deeper JSON is kept as :class:`RawJSON` (well within Python's recursion limit).
MAX_JSON_DEPTH = 200


def _number(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    def load(text: str) -> Any:
        try:
            number = parse(text)
        except ValueError:  # more digits than int() converts
            return RawJSON(text)
        if isinstance(number, float) and not math.isfinite(number):
            return RawJSON(text)
        return number

    return load


_load_int, _load_float = _number(int), _number(float)


def load_json(data: str | bytes) -> Any:
    """A JSON value from the database: Python objects, with :class:`RawJSON` where needed."""
    text = data.decode("utf-8") if isinstance(data, bytes) else data
    if text.count("[") + text.count("{") > MAX_JSON_DEPTH:
        try:
            value = json.loads(text, parse_int=_load_int, parse_float=_load_float)
        except RecursionError:
            return RawJSON(text)
        return RawJSON(text) if _deeper_than(value, MAX_JSON_DEPTH) else value
    return json.loads(text, parse_int=_load_int, parse_float=_load_float)


def _deeper_than(value: Any, limit: int) -> bool:
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children: Iterator[Any]
        if isinstance(item, dict):
            children = iter(item.values())
        elif isinstance(item, list):
            children = iter(item)
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


# -- database errors ----------------------------------------------------------------

# What a SQLSTATE (its class, or the whole code) means to the command, first
# match wins: https://www.postgresql.org/docs/current/errcodes-appendix.html
_BY_SQLSTATE: list[tuple[tuple[str, ...], int, str]] = [
    # connection, authorization, no such database, too many connections, shutdown
    (("08", "28", "3D", "53", "57P"), EXIT_UNREACHABLE, "cannot use the database: {reason}"),
    # undefined table, column, function or schema
    (
        ("42P01", "42703", "42883", "3F000"),
        EXIT_SCHEMA,
        "the database does not have the sqla_pgotask schema this version expects: {reason} "
        "(run 'pgotask migrate' or 'alembic upgrade heads')",
    ),
    # data exception, integrity constraint, program limit (a key too long to index)
    (("22", "23", "54"), EXIT_USAGE, "the database refused the input: {reason}"),
    (
        ("42501",),  # insufficient_privilege
        EXIT_ERROR,
        "the database role may not do this: {reason} (grant it the privileges it needs on "
        "the sqla_pgotask tables, see docs/operations.md)",
    ),
]


def database_error(exc: DBAPIError | psycopg.Error) -> tuple[int, str]:
    """The exit code and the one-line message of a database error."""
    orig = exc.orig if isinstance(exc, DBAPIError) else exc
    sqlstate: str | None = getattr(orig, "sqlstate", None)
    diag = getattr(orig, "diag", None)
    primary = getattr(diag, "message_primary", None) if diag is not None else None
    reason = " ".join(str(primary or orig or exc).split())
    if sqlstate is None:  # raised by the client: a connection that failed or broke
        if isinstance(orig, psycopg.OperationalError):
            return EXIT_UNREACHABLE, f"cannot use the database: {reason}"
        return EXIT_ERROR, f"database error: {reason}"
    for prefixes, code, message in _BY_SQLSTATE:
        if sqlstate.startswith(prefixes):
            return code, message.format(reason=reason)
    return EXIT_ERROR, f"the database refused the command: {reason} (SQLSTATE {sqlstate})"


# -- the options and sessions of the commands about the database -----------------

DATABASE_URL_HELP = f"SQLAlchemy URL (default: ${URL_ENVIRONMENT[0]}, else ${URL_ENVIRONMENT[1]})"


def database_options(parser: argparse.ArgumentParser) -> None:
    """``--database-url`` and ``--json``: the options of every command about the database."""
    parser.add_argument("--database-url", help=DATABASE_URL_HELP)
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def database_url(args: argparse.Namespace) -> URL:
    """The URL of ``--database-url``, else ``$PGOTASK_DATABASE_URL``, else ``$DATABASE_URL``."""
    url = find_url(args.database_url)
    if url is None:
        raise UsageError(
            f"no database URL: pass --database-url or set {URL_ENVIRONMENT[0]} "
            f"(or {URL_ENVIRONMENT[1]})"
        )
    return url


def database_engine(args: argparse.Namespace) -> Engine:
    """An engine on :func:`database_url` that reads every row, odd values included."""
    return create_cli_engine(database_url(args))


@contextmanager
def sessions(args: argparse.Namespace, *, check: bool = True) -> Iterator[sessionmaker[Session]]:
    """A sessionmaker on ``--database-url``; the schema checked first (exit 4 if not at head)."""
    from sqla_pgotask.schema import check_schema

    engine = database_engine(args)
    try:
        factory = sessionmaker(engine)
        if check:
            check_schema(factory)
        yield factory
    finally:
        engine.dispose()
