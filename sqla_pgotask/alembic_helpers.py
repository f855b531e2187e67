"""Helpers for an application whose Alembic environment installs sqla_pgotask.

The library's revisions form their own branch, labelled ``sqla_pgotask``.  An
application adds them to its ``alembic.ini`` and runs ``alembic upgrade heads``::

    [alembic]
    script_location = migrations
    version_locations = %(here)s/migrations/versions sqla_pgotask:migrations/versions
    path_separator = space

and keeps its autogenerate away from the library's tables in ``env.py``::

    from sqla_pgotask.alembic_helpers import include_name

    context.configure(..., target_metadata=Base.metadata, include_name=include_name)

``pgotask alembic setup`` (:func:`sqla_pgotask.alembic_setup.setup`) makes
both edits in a project made by ``alembic init`` and creates the application's
first revision on a branch of its own.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, MutableMapping
from typing import Literal

from sqla_pgotask.errors import PgotaskError
from sqla_pgotask.models import (
    LIMIT_TABLE,
    QUEUE_TABLE,
    SCHEDULE_TABLE,
    TASK_ERROR_TABLE,
    TASK_TABLE,
    WORKER_TABLE,
    Base,
)

#: The ``version_locations`` entry that finds the library's revisions.
VERSION_LOCATION = "sqla_pgotask:migrations/versions"

#: The branch label of the library's revisions.
BRANCH_LABEL = "sqla_pgotask"

#: The branch label ``pgotask alembic setup`` gives the application's revisions by default.
APP_BRANCH_LABEL = "app"

#: The environment variable Alembic reads ``alembic.ini``'s path from (as ``-c`` sets it).
ALEMBIC_CONFIG_ENV = "ALEMBIC_CONFIG"

#: The newest revision of the library's branch; workers require the database to be here.
HEAD_REVISION = "sqla_pgotask_0005"

#: Every revision of the branch, oldest first.
REVISIONS: tuple[str, ...] = (
    "sqla_pgotask_0001",
    "sqla_pgotask_0002",
    "sqla_pgotask_0003",
    "sqla_pgotask_0004",
    "sqla_pgotask_0005",
)

#: The version table of the library's standalone environment (``pgotask migrate``),
#: kept apart from an application's ``alembic_version``.
STANDALONE_VERSION_TABLE = "pgotask_alembic_version"

#: Names of the tables the library owns.
TABLE_NAMES: frozenset[str] = frozenset(Base.metadata.tables)

#: The revision that creates each table: an application revision with a foreign
#: key to one of them ``depends_on`` this revision.
TABLE_REVISIONS: Mapping[str, str] = {
    TASK_TABLE: "sqla_pgotask_0001",
    TASK_ERROR_TABLE: "sqla_pgotask_0001",
    WORKER_TABLE: "sqla_pgotask_0002",
    SCHEDULE_TABLE: "sqla_pgotask_0003",
    QUEUE_TABLE: "sqla_pgotask_0003",
    LIMIT_TABLE: "sqla_pgotask_0003",
}

NameType = Literal[
    "schema",
    "table",
    "column",
    "index",
    "unique_constraint",
    "foreign_key_constraint",
    "check_constraint",
]
ParentNames = MutableMapping[
    Literal["schema_name", "table_name", "schema_qualified_table_name"], str | None
]


def include_name(
    name: str | None,
    type_: NameType,
    parent_names: ParentNames,
) -> bool:
    """Alembic ``include_name`` hook that hides the library's tables from autogenerate."""
    if type_ == "table":
        return name not in TABLE_NAMES and name != STANDALONE_VERSION_TABLE
    return parent_names.get("table_name") not in TABLE_NAMES


def combine_include_name(
    other: Callable[..., bool],
) -> Callable[..., bool]:
    """Chain :func:`include_name` with an application's own ``include_name`` hook."""

    def combined(
        name: str | None,
        type_: NameType,
        parent_names: ParentNames,
    ) -> bool:
        return include_name(name, type_, parent_names) and other(name, type_, parent_names)

    return combined


class AlembicSetupError(PgotaskError):
    """An Alembic project that ``pgotask alembic setup`` cannot edit safely; the message
    says what to change by hand."""
