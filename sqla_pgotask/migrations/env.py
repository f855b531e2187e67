"""Alembic environment for running the library's own revisions on their own.

Applications normally do not use this file: they add
``sqla_pgotask:migrations/versions`` to their own ``version_locations`` and
run ``alembic upgrade heads``.  This environment serves the library's
maintainers (``alembic -c migrations/alembic.ini ...``), the ``pgotask
migrate`` and ``pgotask demo`` commands, and the test suite.  It keeps its
version table apart (``pgotask_alembic_version``) so it never touches an
application's ``alembic_version``.
"""

from __future__ import annotations

import os

from alembic import context
from sqlalchemy import Connection, create_engine, pool

from sqla_pgotask.alembic_helpers import (
    STANDALONE_VERSION_TABLE,
    TABLE_NAMES,
    NameType,
    ParentNames,
)
from sqla_pgotask.models import Base

config = context.config


def _include_name(name: str | None, type_: NameType, parent_names: ParentNames) -> bool:
    if type_ == "table":
        return name in TABLE_NAMES
    return True


def _configure(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        version_table=STANDALONE_VERSION_TABLE,
        include_name=_include_name,
        compare_server_default=True,
    )


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure(connection)
        with context.begin_transaction():
            context.run_migrations()
        return
    url = config.get_main_option("sqlalchemy.url") or os.environ.get("PGOTASK_DATABASE_URL")
    if not url:
        raise RuntimeError("set sqlalchemy.url or PGOTASK_DATABASE_URL")
    engine = create_engine(url, poolclass=pool.NullPool)
    with engine.connect() as conn:
        _configure(conn)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    context.configure(
        url=config.get_main_option("sqlalchemy.url") or os.environ.get("PGOTASK_DATABASE_URL"),
        target_metadata=Base.metadata,
        version_table=STANDALONE_VERSION_TABLE,
        literal_binds=True,
    )
    with context.begin_transaction():
        context.run_migrations()
else:
    run_migrations_online()
