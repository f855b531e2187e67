"""``sqla_pgotask/sql/schema.sql`` is the schema the library's revisions make.

One database is upgraded by the revisions, another is made from schema.sql;
both are described from the catalogs (tables, columns, constraints, indexes,
triggers, functions, sequences of the ``pgotask_*`` tables) and compared.  The
comparison is shown to be live: altering either side makes exactly the
altered object differ.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from importlib.resources import files
from typing import Any

import pytest
from alembic import command
from sqlalchemy import Connection, Engine, create_engine, make_url, text
from sqlalchemy.orm import sessionmaker

from sqla_pgotask import _queries
from sqla_pgotask.alembic_helpers import BRANCH_LABEL, HEAD_REVISION, REVISIONS, TABLE_NAMES
from sqla_pgotask.alembic_helpers import STANDALONE_VERSION_TABLE as VERSION_TABLE
from sqla_pgotask.migrate import alembic_config, downgrade, upgrade
from sqla_pgotask.schema import check_schema, schema_revision
from tests.helpers import create_database, drop_database

SCHEMA_SQL = files("sqla_pgotask").joinpath("sql/schema.sql").read_text(encoding="utf-8")

HOW_TO_FIX = (
    "sqla_pgotask/sql/schema.sql differs from what the revisions make: a new revision "
    "updates schema.sql too (the revisions are the truth)"
)

Description = dict[str, Any]

# The library's tables in the current schema, without the standalone Alembic version table.
_OURS = """
    SELECT oid FROM pg_class
    WHERE relnamespace = current_schema()::regnamespace
      AND starts_with(relname, 'pgotask_') AND relname <> :version_table
      AND relkind IN ('r', 'p', 'v', 'm', 'f')
"""

_CATALOG: dict[str, str] = {
    "table": f"""
        SELECT relname, relkind, relpersistence, coalesce(reloptions, '{{}}')
        FROM pg_class WHERE oid IN ({_OURS})
    """,
    # One entry per table, in column order: the order SELECT * and COPY use.
    "columns": f"""
        SELECT table_name,
               array_agg(ARRAY[column_name, data_type, udt_name,
                               coalesce(character_maximum_length::text, ''),
                               coalesce(collation_name, ''), is_nullable,
                               coalesce(column_default, ''), is_identity,
                               coalesce(identity_generation, '')]
                         ORDER BY ordinal_position)
        FROM information_schema.columns
        WHERE table_schema = current_schema()
          AND table_name IN (SELECT relname FROM pg_class WHERE oid IN ({_OURS}))
        GROUP BY table_name
    """,
    # contype 'n': PostgreSQL 18 lists NOT NULL constraints too; the columns hold them.
    "constraint": f"""
        SELECT conname || ' on ' || conrelid::regclass::text, pg_get_constraintdef(oid)
        FROM pg_constraint WHERE conrelid IN ({_OURS}) AND contype <> 'n'
    """,
    "index": f"""
        SELECT indexrelid::regclass::text, pg_get_indexdef(indexrelid)
        FROM pg_index WHERE indrelid IN ({_OURS})
    """,
    # Internal triggers are the ones foreign keys make; the constraints hold them.
    "trigger": f"""
        SELECT tgname || ' on ' || tgrelid::regclass::text, pg_get_triggerdef(oid), tgenabled
        FROM pg_trigger WHERE tgrelid IN ({_OURS}) AND NOT tgisinternal
    """,
    "function": """
        SELECT oid::regprocedure::text, pg_get_functiondef(oid)
        FROM pg_proc
        WHERE pronamespace = current_schema()::regnamespace
          AND starts_with(proname, 'pgotask_') AND prokind <> 'a'
    """,
    "sequence": """
        SELECT sequencename, data_type::text, start_value, min_value, max_value,
               increment_by, cycle, cache_size
        FROM pg_sequences
        WHERE schemaname = current_schema() AND starts_with(sequencename, 'pgotask_')
    """,
}


def _normalised(value: Any) -> Any:
    # Function bodies keep their source's indentation (the revisions' sit in
    # Python strings), so runs of whitespace compare as one space.
    return " ".join(value.split()) if isinstance(value, str) else value


def describe(conn: Connection) -> Description:
    """The library's schema as the catalogs tell it: ``"<category> <name>"`` -> definition."""
    description: Description = {}
    for category, sql in _CATALOG.items():
        for name, *definition in conn.execute(text(sql), {"version_table": VERSION_TABLE}):
            description[f"{category} {name}"] = tuple(_normalised(d) for d in definition)
    return description


def differences(left: Description, right: Description) -> set[str]:
    """The names of the objects that are missing on one side or defined differently."""
    return {key for key in left.keys() | right.keys() if left.get(key) != right.get(key)}


def _describe(engine: Engine) -> Description:
    with engine.connect() as conn:
        return describe(conn)


def _run_schema_sql(url: str) -> None:
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql(SCHEMA_SQL)
    finally:
        engine.dispose()


@pytest.fixture(scope="module")
def databases(server_url: str) -> Iterator[dict[str, Engine]]:
    """One database upgraded by the revisions, one made from schema.sql."""
    names = {
        "migrations": f"pgotask_schema_mig_{os.getpid()}",
        "schema.sql": f"pgotask_schema_sql_{os.getpid()}",
    }
    urls = {side: create_database(server_url, name) for side, name in names.items()}
    upgrade(urls["migrations"])
    _run_schema_sql(urls["schema.sql"])
    engines = {side: create_engine(url) for side, url in urls.items()}
    yield engines
    for side, engine in engines.items():
        engine.dispose()
        drop_database(server_url, names[side])


@pytest.fixture(scope="module")
def expected(databases: dict[str, Engine]) -> Description:
    """What the revisions make."""
    return _describe(databases["migrations"])


def test_schema_sql_is_what_the_revisions_make(
    databases: dict[str, Engine], expected: Description
) -> None:
    # The description is not vacuous: every table is in it, and every category.
    assert {key for key in expected if key.startswith("table ")} == {
        f"table {name}" for name in TABLE_NAMES
    }
    assert {key.split()[0] for key in expected} == set(_CATALOG)
    assert not any(VERSION_TABLE in key for key in expected)

    actual = _describe(databases["schema.sql"])
    assert actual == expected, f"{HOW_TO_FIX}; differing: {sorted(differences(actual, expected))}"


def test_schema_sql_records_the_head_revision(databases: dict[str, Engine]) -> None:
    factory = sessionmaker(databases["schema.sql"])
    assert schema_revision(factory) == HEAD_REVISION
    assert f"revision {HEAD_REVISION}:" in SCHEMA_SQL.splitlines()[0]
    check_schema(factory)  # a worker would accept this database


# Each alteration makes the named objects differ, whichever side it is made on.
ALTERATIONS = {
    "column default": (
        "ALTER TABLE pgotask_task ALTER COLUMN queue SET DEFAULT 'other'",
        {"columns pgotask_task"},
    ),
    "column nullability": (
        "ALTER TABLE pgotask_worker ALTER COLUMN queues SET NOT NULL",
        {"columns pgotask_worker"},
    ),
    "column type": (
        "ALTER TABLE pgotask_limit ALTER COLUMN key TYPE varchar(200)",
        {"columns pgotask_limit"},
    ),
    "column order": (
        "ALTER TABLE pgotask_schedule DROP COLUMN last_slot; "
        "ALTER TABLE pgotask_schedule ADD COLUMN last_slot timestamptz",
        {"columns pgotask_schedule"},
    ),
    "check constraint": (
        "ALTER TABLE pgotask_task DROP CONSTRAINT ck_pgotask_task_kind_valid, "
        "ADD CONSTRAINT ck_pgotask_task_kind_valid CHECK (kind <> '' AND length(kind) <= 100)",
        {"constraint ck_pgotask_task_kind_valid on pgotask_task"},
    ),
    "constraint left unvalidated": (
        "ALTER TABLE pgotask_task DROP CONSTRAINT ck_pgotask_task_queue_valid, "
        "ADD CONSTRAINT ck_pgotask_task_queue_valid "
        "CHECK (queue <> '' AND length(queue) <= 200) NOT VALID",
        {"constraint ck_pgotask_task_queue_valid on pgotask_task"},
    ),
    "constraint name": (
        "ALTER TABLE pgotask_task RENAME CONSTRAINT ck_pgotask_task_status TO ck_status",
        {
            "constraint ck_pgotask_task_status on pgotask_task",
            "constraint ck_status on pgotask_task",
        },
    ),
    "foreign key": (
        "ALTER TABLE pgotask_task_error "
        "DROP CONSTRAINT fk_pgotask_task_error_task_id_pgotask_task, "
        "ADD CONSTRAINT fk_pgotask_task_error_task_id_pgotask_task "
        "FOREIGN KEY (task_id) REFERENCES pgotask_task (id)",
        {"constraint fk_pgotask_task_error_task_id_pgotask_task on pgotask_task_error"},
    ),
    "partial index": (
        "DROP INDEX ix_pgotask_task_lease; "
        "CREATE INDEX ix_pgotask_task_lease ON pgotask_task (lease_expires_at)",
        {"index ix_pgotask_task_lease"},
    ),
    "extra index": (
        "CREATE INDEX ix_pgotask_task_kind ON pgotask_task (kind)",
        {"index ix_pgotask_task_kind"},
    ),
    "trigger events": (
        "DROP TRIGGER pgotask_queue_resumed ON pgotask_queue; "
        "CREATE TRIGGER pgotask_queue_resumed AFTER UPDATE ON pgotask_queue "
        "FOR EACH ROW WHEN (OLD.paused_at IS NOT NULL) EXECUTE FUNCTION pgotask_notify_resume()",
        {"trigger pgotask_queue_resumed on pgotask_queue"},
    ),
    "trigger disabled": (
        "ALTER TABLE pgotask_task DISABLE TRIGGER pgotask_task_dedup",
        {"trigger pgotask_task_dedup on pgotask_task"},
    ),
    "function body": (
        "CREATE OR REPLACE FUNCTION pgotask_notify_resume() RETURNS trigger "
        "LANGUAGE plpgsql AS $$ BEGIN PERFORM pg_notify('pgotask_other', OLD.name); "
        "RETURN NULL; END; $$",
        {"function pgotask_notify_resume()"},
    ),
    "function attributes": (
        "ALTER FUNCTION pgotask_cancel(bigint) SECURITY DEFINER",
        {"function pgotask_cancel(bigint)"},
    ),
    "schema revision": (
        "CREATE OR REPLACE FUNCTION pgotask_schema_revision() RETURNS text "
        f"LANGUAGE sql IMMUTABLE AS $$ SELECT '{REVISIONS[-2]}'::text $$",
        {"function pgotask_schema_revision()"},
    ),
    "identity sequence": (
        "ALTER TABLE pgotask_task ALTER COLUMN id SET INCREMENT BY 2",
        {"sequence pgotask_task_id_seq"},
    ),
    "table persistence": (
        "ALTER TABLE pgotask_schedule SET UNLOGGED",
        {"table pgotask_schedule"},
    ),
    "missing table": (
        "DROP TABLE pgotask_limit",
        {
            "table pgotask_limit",
            "columns pgotask_limit",
            "constraint pk_pgotask_limit on pgotask_limit",
            "index pk_pgotask_limit",
        },
    ),
}


@pytest.mark.parametrize("side", ["migrations", "schema.sql"])
@pytest.mark.parametrize("alteration", list(ALTERATIONS))
def test_an_alteration_of_either_side_is_seen(
    databases: dict[str, Engine], expected: Description, side: str, alteration: str
) -> None:
    sql, changed = ALTERATIONS[alteration]
    with databases[side].connect() as conn:
        conn.exec_driver_sql(sql)
        altered = describe(conn)
        conn.rollback()  # DDL is transactional: the shared database is left as it was
    assert differences(altered, expected) == changed
    assert _describe(databases[side]) == expected


def test_function_bodies_compare_without_their_indentation(
    databases: dict[str, Engine], expected: Description
) -> None:
    reindented = """
        CREATE OR REPLACE FUNCTION pgotask_notify_resume() RETURNS trigger
        LANGUAGE plpgsql AS $$
                BEGIN PERFORM pg_notify('pgotask', OLD.name);
            RETURN NULL;    END;
        $$
    """
    with databases["schema.sql"].connect() as conn:
        conn.exec_driver_sql(reindented)
        assert differences(describe(conn), expected) == set()
        conn.rollback()


def test_schema_sql_adds_no_named_statement() -> None:
    # sqla_pgotask/_queries.py reads every file of sql/; schema.sql is all preamble.
    assert _queries._NAME.search(SCHEMA_SQL) is None
    assert _queries._load()
    # A driver takes "%" for a placeholder, even in a comment.
    assert "%" not in SCHEMA_SQL


def test_schema_sql_runs_with_psql(empty_database_url: str, expected: Description) -> None:
    psql = shutil.which("psql")
    if psql is None:
        pytest.skip("psql is not installed")
    libpq_url = make_url(empty_database_url).set(drivername="postgresql")
    url = libpq_url.render_as_string(hide_password=False)
    done = subprocess.run(
        [psql, "-X", "-q", "-v", "ON_ERROR_STOP=1", "--single-transaction", "-f", "-", url],
        input=SCHEMA_SQL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert not re.search(r"(?m)^(WARNING|ERROR)", done.stderr), done.stderr
    engine = create_engine(empty_database_url)
    try:
        assert _describe(engine) == expected
    finally:
        engine.dispose()


def test_stamped_schema_sql_database_takes_the_revisions(
    empty_database_url: str, expected: Description
) -> None:
    # What schema.sql's header says: stamp it, then the revisions run on it.
    _run_schema_sql(empty_database_url)
    engine = create_engine(empty_database_url)
    try:
        command.stamp(alembic_config(engine), f"{BRANCH_LABEL}@head")
        downgrade(engine, REVISIONS[-2])
        assert schema_revision(sessionmaker(engine)) == REVISIONS[-2]
        upgrade(engine)
        assert _describe(engine) == expected
    finally:
        engine.dispose()
