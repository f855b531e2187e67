"""A fake consumer application with its own Alembic environment, written to disk.

The application has its own declarative ``Base`` (own ``MetaData``) with an
``orders`` table whose foreign key points at ``Task.id``, its own revision
(branch ``app``) and an ``alembic.ini`` whose ``version_locations`` names the
library's revisions as a package resource.  ``tests/test_migrations.py`` runs it
with ``alembic.command`` in this process; ``tests/test_packaging.py`` runs it
with ``python -m alembic`` in a venv where the library is installed from its
wheel.  The files are the snippets of ``docs/alembic.md``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from alembic.config import Config

#: How the application's ``env.py`` filters autogenerate: the library's helper,
#: the helper chained with an application hook, or nothing at all.
IncludeNameMode = Literal["helper", "combined", "none"]

#: The application's revision id and the branch label it starts.
APP_REVISION = "app_0001"
APP_BRANCH = "app"

#: A table the application does not manage: its own hook hides it (``combined`` mode).
LEGACY_TABLE = "legacy_audit"

_INI = """\
[alembic]
script_location = %(here)s/migrations
version_locations = {version_locations}
{path_separator}sqlalchemy.url = {url}
"""

_ENV_HEAD = '''\
"""The consumer application's Alembic environment."""

from alembic import context
from sqlalchemy import BigInteger, ForeignKey, MetaData, Text, create_engine, pool
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from sqla_pgotask import Task
{helper_import}


class Base(DeclarativeBase):
    metadata = MetaData()


class Order(Base):
    __tablename__ = "orders"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    customer: Mapped[str] = mapped_column(Text)
    # The Column object, not the string "pgotask_task.id": Task is on another MetaData.
    receipt_task_id: Mapped[int | None] = mapped_column(ForeignKey({task_fk}))

'''

_ENV_HOOK = {
    "helper": ("from sqla_pgotask.alembic_helpers import include_name", ""),
    "combined": (
        "from sqla_pgotask.alembic_helpers import combine_include_name",
        """

def app_include_name(name, type_, parent_names):  # the application's own hook
    return not (type_ == "table" and name is not None and name.startswith("legacy_"))


include_name = combine_include_name(app_include_name)
""",
    ),
    "none": ("", "\ninclude_name = None\n"),
}

_ENV_TAIL = """
config = context.config
engine = create_engine(config.get_main_option("sqlalchemy.url"), poolclass=pool.NullPool)
with engine.connect() as connection:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        include_name=include_name,
    )
    with context.begin_transaction():
        context.run_migrations()
engine.dispose()
"""

_MAKO = '''\
"""${message}"""

revision = ${repr(up_revision)}
down_revision = ${repr(down_revision)}
branch_labels = ${repr(branch_labels)}
depends_on = ${repr(depends_on)}

import sqlalchemy as sa
from alembic import op
${imports if imports else ""}

def upgrade():
    ${upgrades if upgrades else "pass"}


def downgrade():
    ${downgrades if downgrades else "pass"}
'''

_REVISION = '''\
"""orders"""

import sqlalchemy as sa
from alembic import op

revision = "{revision}"
down_revision = None
branch_labels = ("{branch}",)
# orders has a foreign key to pgotask_task: run after the revision creating it.
depends_on = {depends_on!r}


def upgrade():
    op.create_table(
        "orders",
        sa.Column("id", sa.BigInteger(), nullable=False),
        sa.Column("customer", sa.Text(), nullable=False),
        sa.Column("receipt_task_id", sa.BigInteger(), nullable=True),
        sa.ForeignKeyConstraint(["receipt_task_id"], ["pgotask_task.id"]),
        sa.PrimaryKeyConstraint("id"),
    )


def downgrade():
    op.drop_table("orders")
'''


@dataclass(frozen=True)
class ConsumerApp:
    """Paths of a consumer application written by :func:`build_consumer_app`."""

    #: The project root: ``alembic.ini`` here, the environment in ``migrations/``.
    root: Path

    @property
    def ini(self) -> Path:
        """The application's ``alembic.ini``."""
        return self.root / "alembic.ini"

    @property
    def script_location(self) -> Path:
        """The application's Alembic environment (``env.py``)."""
        return self.root / "migrations"

    @property
    def versions(self) -> Path:
        """The application's own revisions."""
        return self.script_location / "versions"

    def config(self) -> Config:
        """An Alembic ``Config`` read from the application's ``alembic.ini``."""
        return Config(str(self.ini))


def build_consumer_app(
    root: Path,
    database_url: str,
    *,
    path_separator: str | None = "space",
    version_locations: str = "%(here)s/migrations/versions sqla_pgotask:migrations/versions",
    include_name: IncludeNameMode = "helper",
    depends_on: str | None = "sqla_pgotask_0001",
    task_fk: str = "Task.id",
) -> ConsumerApp:
    """Write a consumer application's Alembic environment under ``root``."""
    app = ConsumerApp(root)
    app.versions.mkdir(parents=True, exist_ok=True)
    app.ini.write_text(
        _INI.format(
            version_locations=version_locations,
            path_separator="" if path_separator is None else f"path_separator = {path_separator}\n",
            url=database_url.replace("%", "%%"),
        ),
        encoding="utf-8",
    )
    helper_import, hook = _ENV_HOOK[include_name]
    (app.script_location / "env.py").write_text(
        _ENV_HEAD.format(helper_import=helper_import, task_fk=task_fk) + hook + _ENV_TAIL,
        encoding="utf-8",
    )
    (app.script_location / "script.py.mako").write_text(_MAKO, encoding="utf-8")
    (app.versions / f"{APP_REVISION}_orders.py").write_text(
        _REVISION.format(revision=APP_REVISION, branch=APP_BRANCH, depends_on=depends_on),
        encoding="utf-8",
    )
    return app
