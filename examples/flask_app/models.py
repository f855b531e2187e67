"""The app's own model, its database configuration and ``init_db()``.

Run ``python -m examples.flask_app.models`` once to install the tables.
"""

from __future__ import annotations

import os
from datetime import datetime

from sqlalchemy import BigInteger, DateTime, Engine, MetaData, String, create_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from sqla_pgotask.migrate import upgrade

DEFAULT_DATABASE_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/pgotask_examples"
DATABASE_URL = os.environ.get("DATABASE_URL", DEFAULT_DATABASE_URL)


class Base(DeclarativeBase):
    """The app's models, on a metadata of their own (the library's tables have theirs)."""

    metadata = MetaData()


class Signup(Base):
    """A user who signed up, and whether their welcome email went out."""

    __tablename__ = "signup"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    email: Mapped[str] = mapped_column(String(320), unique=True)
    welcome_sent_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    def as_dict(self) -> dict[str, object]:
        """The JSON the API returns for this signup."""
        return {
            "id": self.id,
            "email": self.email,
            "welcome_sent": self.welcome_sent_at is not None,
        }


# create_engine does not connect: importing this module (as the worker does) is cheap.
engine = create_engine(DATABASE_URL)
SessionLocal = sessionmaker(engine)


def init_db(bind: Engine | None = None) -> None:
    """Install the library's tables, then the app's.

    A real app would add ``sqla_pgotask:migrations/versions`` to its own
    Alembic ``version_locations`` instead (docs/alembic.md).
    """
    bind = engine if bind is None else bind
    upgrade(bind)
    Base.metadata.create_all(bind)


if __name__ == "__main__":
    init_db()
    print(f"tables installed in {engine.url.render_as_string(hide_password=True)}")
