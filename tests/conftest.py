"""Database fixtures: a real PostgreSQL, never a mock.

The server is the one named by ``PGOTASK_TEST_DATABASE_URL`` (any database
on it; the suite creates and drops its own), or else an embedded server
started for the session.  Two tiers:

* ``session`` / ``orm_engine``: one migrated database shared by the run, each
  test inside a transaction that is rolled back (the SQLAlchemy "join a
  Session into an external transaction" recipe);
* ``database_url`` / ``engine`` / ``session_factory``: a fresh database per
  test, copied from a migrated template, for tests that commit, use several
  connections, LISTEN, or run worker processes.
"""

from __future__ import annotations

import itertools
import os
import socket
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, create_engine
from sqlalchemy.orm import Session, sessionmaker

from sqla_pgotask.migrate import upgrade

# Before any test module imports the helpers: their asserts then report like a test's.
pytest.register_assert_rewrite("tests.helpers")

from tests.helpers import AppBase, create_database, drop_database  # noqa: E402

URL_ENV = "PGOTASK_TEST_DATABASE_URL"

_counter = itertools.count()


@pytest.fixture(scope="session")
def server_url() -> Iterator[str]:
    """A URL of the PostgreSQL server the tests use (its ``postgres`` database)."""
    url = os.environ.get(URL_ENV)
    if url:
        yield url
        return
    from sqla_pgotask.embedded import EmbeddedPostgres

    with EmbeddedPostgres() as server:
        yield server.url


@pytest.fixture(scope="session")
def template_database(server_url: str) -> Iterator[str]:
    """Name of a migrated database that per-test databases are copied from."""
    name = f"pgotask_tpl_{os.getpid()}"
    url = create_database(server_url, name)
    upgrade(url)
    yield name
    drop_database(server_url, name)


@pytest.fixture
def database_url(server_url: str, template_database: str) -> Iterator[str]:
    """URL of a fresh, migrated database for this test alone."""
    name = f"pgotask_t_{os.getpid()}_{next(_counter)}"
    url = create_database(server_url, name, template=template_database)
    yield url
    drop_database(server_url, name)


@pytest.fixture
def empty_database_url(server_url: str) -> Iterator[str]:
    """URL of a fresh database without the library's tables."""
    name = f"pgotask_e_{os.getpid()}_{next(_counter)}"
    url = create_database(server_url, name)
    yield url
    drop_database(server_url, name)


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    """An engine on this test's own database."""
    eng = create_engine(database_url, pool_size=10, max_overflow=10)
    yield eng
    eng.dispose()


@pytest.fixture
def session_factory(engine: Engine) -> sessionmaker[Session]:
    """The application's sessionmaker, on this test's own database."""
    return sessionmaker(engine)


@pytest.fixture
def app(engine: Engine, session_factory: sessionmaker[Session]) -> sessionmaker[Session]:
    """The application's sessionmaker, with its ``app_ledger`` table created."""

    AppBase.metadata.create_all(engine)
    return session_factory


@pytest.fixture(scope="session")
def orm_engine(server_url: str) -> Iterator[Engine]:
    """An engine on a migrated database shared by the rolled-back tests."""
    name = f"pgotask_orm_{os.getpid()}"
    url = create_database(server_url, name)
    upgrade(url)
    eng = create_engine(url)
    yield eng
    eng.dispose()
    drop_database(server_url, name)


@pytest.fixture
def session(orm_engine: Engine) -> Iterator[Session]:
    """A Session inside a transaction that is rolled back after the test.

    The test may call ``commit()``: it releases a savepoint, not the outer
    transaction.
    """
    with orm_engine.connect() as conn:
        outer = conn.begin()
        sess = Session(bind=conn, join_transaction_mode="create_savepoint")
        try:
            yield sess
        finally:
            sess.close()
            outer.rollback()


@pytest.fixture
def closed_port_url() -> Iterator[str]:
    """A PostgreSQL URL whose port refuses connections: bound, never listening."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres?connect_timeout=5"
