"""Bad arguments and bad data: ``pgotask`` ends with one line and a meaningful exit code.

Every case runs the real command; none may print a traceback.  Exit codes:
2 usage (the argument, or the database refusing it), 1 a problem (a role
without privileges), 3 unreachable, 4 schema.  A database holding rows that
Python cannot load as they are (timestamps outside years 1 to 9999, JSON
nested 5,000 levels deep) can still be listed, shown and checked.
"""

from __future__ import annotations

import itertools
import json
import os
import secrets
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, make_url, text

from sqla_pgotask import cli
from tests.helpers.processes import LEDGER_SCHEDULER, run_pgotask

BIG = "9223372036854775808"  # one more than a bigint holds
HUGE = "9" * 5_000  # more digits than int() converts
LONG_QUEUE = "q" * 8_000


def _not_utf8(raw: bytes) -> str:
    """``raw`` as Python receives it in ``sys.argv`` when it is not UTF-8 (surrogateescape)."""
    return os.fsdecode(raw)


# (arguments, exit code, part of the message); "{db}" needs a migrated database.
BAD_INPUT: list[tuple[list[str], int, str]] = [
    # integers out of their column's range
    (["show", BIG], 2, "must be at most 9223372036854775807 (a bigint)"),
    (["show", HUGE], 2, "must be at most 9223372036854775807"),
    (["retry", BIG], 2, "must be at most 9223372036854775807"),
    (["cancel", "1", BIG], 2, "must be at most 9223372036854775807"),
    (["list", "--limit", BIG], 2, "must be at most 1000000"),
    (["retry", "--failed", "--batch-size", BIG], 2, "must be at most 1000000"),
    (["prune", "--older-than", "1d", "--batch-size", HUGE], 2, "must be at most 1000000"),
    (["retry", "--failed", "--attempts", "2147483648"], 2, "at most 2147483647 (a 32-bit"),
    (["enqueue", "k", "--priority", "2147483648"], 2, "at most 2147483647 (a 32-bit integer)"),
    (["enqueue", "k", "--priority", "-2147483649"], 2, "must be at least -2147483648"),
    (["enqueue", "k", "--max-attempts", "2147483648"], 2, "at most 2147483647"),
    (["worker", LEDGER_SCHEDULER, "--processes", "1000"], 2, "must be at most 256"),
    (["worker", LEDGER_SCHEDULER, "--concurrency", "100000"], 2, "must be at most 1024"),
    (["worker", LEDGER_SCHEDULER, "--queue", "q=5000"], 2, "queue 'q' must be at most 1024"),
    # timestamps and intervals out of range
    (["list", "--older-than", "999999999d"], 2, "is too long: at most 36500d (100 years)"),
    (["prune", "--older-than", "99999999999d"], 2, "is too long: at most 36500d"),
    (["check", "--stuck-after", "1e300"], 2, "must be at most 3153600000 seconds (100 years)"),
    (["check", "--stuck-after", "99999999d"], 2, "is too long"),
    (["check", "--worker-timeout", "inf"], 2, "must be at most 3153600000 seconds"),
    (["worker", LEDGER_SCHEDULER, "--poll-interval", "1e300"], 2, "must be at most"),
    (["enqueue", "k", "--run-at", "+9999999d"], 2, "is too long"),
    (["enqueue", "k", "--run-at", "0001-01-01T00:00:00+01:00"], 2, "years 1 to 9999"),
    (["enqueue", "k", "--run-at", "9999-12-31T23:00:00-05:00"], 2, "years 1 to 9999"),
    (["check", "--max-age", "0s"], 2, "must be longer than 0s"),
    # text PostgreSQL cannot store: NUL, bytes that are not UTF-8, a queue too long to NOTIFY
    (["enqueue", "k", "--payload", '{"a": "x\\u0000"}'], 2, "a string that jsonb cannot store"),
    (["enqueue", "k", "--payload", '["\\ud800"]'], 2, "a string that jsonb cannot store"),
    (["enqueue", "k", "--payload", "[" * 5_000 + "]" * 5_000], 2, "nested deeper than 200"),
    (["enqueue", "k", "--payload", "1e400"], 2, "out of a float's range"),
    (["enqueue", "k", "--payload", _not_utf8(b'"\xff"')], 2, "the payload is not valid UTF-8"),
    (["enqueue", _not_utf8(b"k\xff")], 2, "the task kind is not valid UTF-8"),
    (["enqueue", "k\x00"], 2, "the task kind contains a NUL character"),
    (["enqueue", "k", "--queue", _not_utf8(b"q\xff")], 2, "a queue name is not valid UTF-8"),
    (["list", "--queue", "q\x00"], 2, "a queue name contains a NUL character"),
    (["list", "--kind", _not_utf8(b"\xc3")], 2, "a task kind is not valid UTF-8"),
    (["enqueue", "k", "--dedup-key", "k\x00"], 2, "the dedup key contains a NUL"),
    (["enqueue", "k", "--queue", LONG_QUEUE], 2, "too long: 8000 bytes in UTF-8, at most 7999"),
    (["list", "--queue", LONG_QUEUE], 2, "a queue name is too long"),
    (["queue", "pause", LONG_QUEUE], 2, "a queue name is too long"),
    (["worker", LEDGER_SCHEDULER, "--queue", LONG_QUEUE], 2, "a queue name is too long"),
    # database URLs
    (["list", "--database-url", _not_utf8(b"postgresql://h/\xff")], 2, "not valid UTF-8"),
    (["stats", "--database-url", "postgresql://h/d\x00"], 2, "contains a NUL character"),
    (
        ["check", "--database-url", "mysql://u:secret@h/d"],
        2,
        "not a PostgreSQL URL: mysql://u:***@h/d",
    ),
    (["demo", "--database-url", "mysql://u@h/d"], 2, "not a PostgreSQL URL"),
    (["migrate", "--database-url", "mysql://u@h/d"], 2, "not a PostgreSQL URL"),
    (["list", "--database-url", "postgresql+asyncpg://h/d"], 2, "connects with psycopg 3"),
    (["list", "--database-url", "postgresql://h:port/d"], 2, "cannot be parsed"),
    # refused by the database: a usage error, not "cannot use the database"
    (["migrate", "--database-url", "{db}", "--revision", "bogus"], 2, "revision 'bogus'"),
    # refused by the model before it is sent (it would not fit the dedup index)
    (["enqueue", "k", "--dedup-key", "{random:60000}"], 2, "at most 1,000 are allowed"),
]


def _expand(args: list[str], database_url: str) -> list[str]:
    def one(arg: str) -> str:
        if arg == "{db}":
            return database_url
        if arg.startswith("{random:"):
            # Random text does not compress: too long for the dedup index.
            return secrets.token_hex(int(arg[8:-1]) // 2)
        return arg

    return [one(arg) for arg in args]


def _run(args: list[str], database_url: str) -> tuple[int, str, str]:
    """Run the command, in a process of its own unless ``argv`` cannot carry the arguments.

    A NUL cannot be in a process's arguments, only in those of ``main()``.
    """
    if not any("\x00" in arg for arg in args):
        done = run_pgotask(args, database_url)
        return done.returncode, done.stdout, done.stderr
    return _run_main(args)


def _run_main(args: list[str]) -> tuple[int, str, str]:
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(args)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    return code, out.getvalue(), err.getvalue()


def _needs_database(args: list[str]) -> bool:
    return any(arg.startswith("{") for arg in args)


@pytest.mark.parametrize(
    ("args", "code", "message"),
    BAD_INPUT,
    ids=[f"{n}-{' '.join(a)[:40]!a}" for n, (a, _, _) in enumerate(BAD_INPUT)],
)
def test_bad_input_ends_with_one_line(
    args: list[str], code: int, message: str, request: pytest.FixtureRequest
) -> None:
    # Arguments the command can refuse by itself never reach the database:
    # the URL of those cases refuses connections.
    url = request.getfixturevalue("database_url" if _needs_database(args) else "closed_port_url")
    returncode, _, stderr = _run(_expand(args, url), url)
    assert returncode == code, stderr
    assert "Traceback" not in stderr
    last = stderr.rstrip("\n").split("\n")[-1]
    assert last.startswith("pgotask") and " error: " in last, stderr
    assert message in last, stderr
    assert "secret" not in stderr  # a URL's password is never printed


# -- a role without privileges ----------------------------------------------------

_roles = itertools.count()


@pytest.fixture
def unprivileged_url(database_url: str, engine: Engine) -> Iterator[str]:
    """``database_url`` as a role that may log in and nothing else."""
    role = f"pgotask_nogrant_{os.getpid()}_{next(_roles)}"
    admin = create_engine(database_url, isolation_level="AUTOCOMMIT", pool_size=1)
    try:
        with admin.connect() as conn:
            conn.execute(text(f'DROP ROLE IF EXISTS "{role}"'))
            conn.execute(text(f'CREATE ROLE "{role}" LOGIN'))
        yield (
            make_url(database_url)
            .set(username=role, password=None)
            .render_as_string(hide_password=False)
        )
    finally:
        with admin.connect() as conn:
            conn.execute(
                text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = :r"),
                {"r": role},
            )
            conn.execute(text(f'DROP ROLE IF EXISTS "{role}"'))
        admin.dispose()


@pytest.mark.parametrize(
    "args",
    [
        ["stats"],
        ["list"],
        ["show", "1"],
        ["retry", "1"],
        ["cancel", "--all"],
        ["check"],
        ["enqueue", "k"],
        ["queue", "pause", "q"],
        ["prune", "--older-than", "1d"],
        ["migrate"],
    ],
    ids=lambda a: a[0],
)
def test_a_role_without_privileges(args: list[str], unprivileged_url: str) -> None:
    done = run_pgotask(args, unprivileged_url)
    assert done.returncode == 1, done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("pgotask: error: the database role may not do this: ")
    assert "permission denied for " in done.stderr


# -- a database holding rows Python cannot load as they are -------------------------


def _drop_timestamp_checks(conn: Any) -> None:
    """Drop the CHECK constraints that refuse non-finite or out-of-range timestamps, if any.

    Such rows may predate those constraints: the commands must cope with them.
    """
    names = conn.execute(
        text(
            "SELECT conrelid::regclass::text AS tbl, conname FROM pg_constraint "
            "WHERE contype = 'c' AND conrelid::regclass::text IN "
            "('pgotask_task', 'pgotask_task_error', 'pgotask_worker') "
            "AND (conname ~ '(run_at|timestamp|_at)' "
            "OR pg_get_constraintdef(oid) ~* '(infinity|isfinite|_at\\M)')"
        )
    ).all()
    for table, name in names:
        conn.execute(text(f'ALTER TABLE {table} DROP CONSTRAINT "{name}"'))


@pytest.fixture
def poisoned(engine: Engine) -> list[int]:
    """Tasks (and an error and a worker) with values Python cannot hold; their ids."""
    with engine.begin() as conn:
        _drop_timestamp_checks(conn)
        ids = [
            conn.execute(text(sql)).scalar_one()
            for sql in (
                "INSERT INTO pgotask_task (kind, payload, run_at, created_at) VALUES "
                "('deep', (repeat('[', 5000) || repeat(']', 5000))::jsonb, '-infinity', "
                "'0044-03-15 BC') RETURNING id",
                "INSERT INTO pgotask_task (kind, status, attempts, locked_by, started_at, "
                "lease_expires_at, payload) VALUES ('numbers', 'running', 1, 'w', 'infinity', "
                '\'-infinity\', \'{"big": 1e400, "long": 1' + "0" * 5000 + "}') RETURNING id",
                "INSERT INTO pgotask_task (kind, status, run_at, finished_at, result) VALUES "
                "('late', 'failed', '20000-01-01', 'infinity', "
                "(repeat('{\"a\": ', 300) || '1' || repeat('}', 300))::jsonb) RETURNING id",
            )
        ]
        conn.execute(
            text(
                "INSERT INTO pgotask_task_error (task_id, attempt, exception_type, message, "
                "created_at) VALUES (:id, 1, 'E', 'm', '-infinity')"
            ),
            {"id": ids[2]},
        )
        conn.execute(
            text(
                "INSERT INTO pgotask_worker (id, host, pid, node, kinds, concurrency, "
                "started_at, last_heartbeat_at) "
                "VALUES ('w', 'h', 1, 'n', '{late}', 1, '-infinity', 'infinity')"
            )
        )
    return ids


def _loads(output: str) -> Any:
    # The deep payload is valid JSON, deeper than Python's default recursion limit.
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(50_000)
    try:
        return json.loads(output)
    finally:
        sys.setrecursionlimit(limit)


def test_list_stats_show_and_check_read_a_poisoned_database(
    database_url: str, poisoned: list[int]
) -> None:
    deep, numbers, late = poisoned

    def ok(*args: str, code: int = 0) -> str:
        done = run_pgotask(list(args), database_url)
        assert done.returncode == code, done.stderr
        assert "Traceback" not in done.stderr
        return done.stdout

    listed = ok("list")
    assert "-infinity" in listed and "infinity" in listed and "20000-01-01" in listed
    listed_json = ok("list", "--json")
    found = {t["id"]: t for t in _loads(listed_json.replace("1" + "0" * 5000, "0"))}
    assert found[deep]["run_at"] == "-infinity"
    assert found[deep]["created_at"] == "0044-03-15 00:00:00+00 BC"
    assert '"payload": ' + "[" * 5000 + "]" * 5000 in listed_json  # exactly as stored
    assert '"long": 1' + "0" * 5000 + "}" in listed_json  # more digits than int() takes
    assert '"result": ' + '{"a": ' * 300 + "1" + "}" * 300 in listed_json

    assert "forever" in ok("stats")  # the age of a task due since -infinity
    rows = {r["kind"]: r for r in json.loads(ok("stats", "--json"))["rows"]}
    assert rows["deep"]["oldest_due_seconds"] is None  # JSON has no Infinity

    shown = ok("show", str(deep))
    assert "run_at:              -infinity" in shown
    assert "created_at:          0044-03-15 00:00:00+00 BC" in shown
    assert "[[[[" in shown
    assert "lease_expires_at:    -infinity" in ok("show", str(numbers))
    assert "attempt 1 at -infinity" in ok("show", str(late))
    assert _loads(ok("show", str(late), "--json"))["errors"][0]["created_at"] == "-infinity"

    checks = {
        c["name"]: c for c in json.loads(ok("check", "--json", "--max-age", "1h", code=1))["checks"]
    }
    assert checks["workers"]["ok"]  # its heartbeat is 'infinity': live
    assert checks["stuck"]["ids"] == [numbers]
    assert not checks["backlog"]["ok"] and checks["backlog"]["oldest_due_seconds"] is None
    assert "has waited forever" in ok("check", "--max-age", "1h", code=1)
