"""Fixtures of the fault suite: its own embedded PostgreSQL, never the shared server.

Faults here terminate backends and restart servers, so the suite always
starts an :class:`~sqla_pgotask.embedded.EmbeddedPostgres` of its own (in
the main thread, which outlives it), whatever ``PGOTASK_TEST_DATABASE_URL``
says.  Each scenario gets a fresh database copied from a migrated template
that already has the faulty app's ``fault_ledger`` table.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator

import pytest

from sqla_pgotask.embedded import EmbeddedPostgres
from tests.helpers.faults import (
    IsolatedHost,
    NamespacesNotPermitted,
    admin_execute,
    prepare_database,
    url_for,
)

_counter = itertools.count()


@pytest.fixture(scope="package")
def fault_server() -> Iterator[str]:
    """URL of an embedded PostgreSQL for this suite alone."""
    with EmbeddedPostgres() as server:
        yield server.url


@pytest.fixture(scope="package")
def fault_template(fault_server: str) -> Iterator[str]:
    """Name of a migrated database, with the ledger, that scenario databases copy."""
    name = f"fault_tpl_{os.getpid()}"
    admin_execute(fault_server, f'CREATE DATABASE "{name}"')
    prepare_database(url_for(fault_server, name))
    yield name
    admin_execute(fault_server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def new_database(fault_server: str, fault_template: str) -> Iterator[Callable[[], str]]:
    """Make fresh scenario databases; they are dropped after the test."""
    names: list[str] = []

    def make() -> str:
        name = f"fault_{os.getpid()}_{next(_counter)}"
        admin_execute(fault_server, f'CREATE DATABASE "{name}" TEMPLATE "{fault_template}"')
        names.append(name)
        return url_for(fault_server, name)

    yield make
    for name in names:
        admin_execute(fault_server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def isolated_host() -> Iterator[IsolatedHost]:
    """A network namespace linked to this one, removed after the test even if it fails.

    Skipped only where this process may not create network namespaces.
    """
    host = IsolatedHost()
    try:
        host.create()
    except NamespacesNotPermitted as exc:
        pytest.skip(f"network namespaces are not permitted here: {exc}")
    try:
        yield host
    finally:
        host.close()


@pytest.fixture
def fault_db(new_database: Callable[[], str]) -> str:
    """URL of a fresh scenario database."""
    return new_database()
