"""Checking that the database schema is the one this version of the library expects."""

from __future__ import annotations

import warnings

from sqlalchemy.exc import ProgrammingError
from sqlalchemy.orm import Session, sessionmaker

from sqla_pgotask._queries import query
from sqla_pgotask.alembic_helpers import HEAD_REVISION, REVISIONS, VERSION_LOCATION
from sqla_pgotask.errors import SchemaError

_HOW_TO_UPGRADE = (
    f"add {VERSION_LOCATION!r} to version_locations in alembic.ini and run "
    "'alembic upgrade heads' (plural: the library's revisions are a branch of their own)"
)


def _how_to_upgrade() -> str:
    """The command to run; and first the fix, when ``alembic.ini`` here hides our revisions.

    The worker usually starts where ``alembic`` runs, so the ``alembic.ini`` that
    Alembic would read is a good guess at why the schema is missing: with
    ``path_separator = os`` the library's revisions are silently left out.
    """
    from sqla_pgotask.alembic_setup import version_locations_problem

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            problem = version_locations_problem()
    except Exception:  # a guess at a cause must never hide the error itself
        problem = None
    if problem is None:
        return _HOW_TO_UPGRADE
    return f"{problem}, then run 'alembic upgrade heads'"


def schema_revision(session_factory: sessionmaker[Session]) -> str | None:
    """The library's schema revision installed in the database, or ``None`` if not installed."""
    with session_factory() as session:
        try:
            return str(session.execute(query("schema_revision")).scalar_one())
        except ProgrammingError as exc:
            if getattr(exc.orig, "sqlstate", None) == "42883":  # undefined_function
                return None
            raise


def check_schema(session_factory: sessionmaker[Session]) -> None:
    """Raise :class:`SchemaError` unless the database is at :data:`HEAD_REVISION`."""
    found = schema_revision(session_factory)
    if found == HEAD_REVISION:
        return
    if found is None:
        raise SchemaError(
            f"the sqla_pgotask tables are not installed in this database: {_how_to_upgrade()}"
        )
    if found in REVISIONS:
        raise SchemaError(
            f"the sqla_pgotask schema is at revision {found!r}, this version needs "
            f"{HEAD_REVISION!r}: {_how_to_upgrade()}"
        )
    raise SchemaError(
        f"the sqla_pgotask schema is at revision {found!r}, which this version of "
        f"sqla_pgotask (expecting {HEAD_REVISION!r}) does not know: upgrade sqla-pgotask "
        "on this host to the version that installed it"
    )
