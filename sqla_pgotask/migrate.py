"""Installing the library's tables without an Alembic environment of one's own.

Applications that use Alembic should add the library's revisions to their own
history instead (see ``docs/alembic.md``).  This module is for scripts, the
demo and tests::

    from sqla_pgotask.migrate import upgrade
    upgrade(engine)  # alembic upgrade heads, version table pgotask_alembic_version
"""

from __future__ import annotations

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine

SCRIPT_LOCATION = "sqla_pgotask:migrations"


def alembic_config(engine: Engine) -> Config:
    """An Alembic ``Config`` for the library's standalone environment, bound to ``engine``."""
    config = Config()
    config.set_main_option("script_location", SCRIPT_LOCATION)
    config.set_main_option("version_locations", "sqla_pgotask:migrations/versions")
    config.set_main_option("path_separator", "space")
    config.set_main_option(
        "sqlalchemy.url", engine.url.render_as_string(hide_password=False).replace("%", "%%")
    )
    return config


def upgrade(bind: Engine | str, revision: str = "heads") -> None:
    """Upgrade the library's tables to ``revision`` (default: the newest)."""
    engine = create_engine(bind) if isinstance(bind, str) else bind
    try:
        with engine.begin() as connection:
            config = alembic_config(engine)
            config.attributes["connection"] = connection
            command.upgrade(config, revision)
    finally:
        if isinstance(bind, str):
            engine.dispose()


def downgrade(bind: Engine | str, revision: str = "base") -> None:
    """Downgrade the library's tables to ``revision`` (default: remove them)."""
    engine = create_engine(bind) if isinstance(bind, str) else bind
    try:
        with engine.begin() as connection:
            config = alembic_config(engine)
            config.attributes["connection"] = connection
            command.downgrade(config, revision)
    finally:
        if isinstance(bind, str):
            engine.dispose()
