"""sqla_pgotask: rows every worker can read and run; stuck handler slots in the registry.

Revision ID: sqla_pgotask_0005
Revises: sqla_pgotask_0004
Create Date: 2026-12-07

A task row written by plain SQL could hold what no worker can use: a
``run_at`` of ``infinity`` or in 4713 BC (which Python cannot represent), an
empty kind, a queue name longer than a notification carries, a ``running``
row without a lease (invisible to rescue), a ``pending`` row without an
attempt left.  CHECK constraints now refuse them at the INSERT or UPDATE
that writes them.  Rows already in the table that break one are repaired
first (a pending task that cannot run ends ``failed``, with a
``pgotask_task_error`` row that says why), so the upgrade does not fail on
old data; the constraints are then added ``NOT VALID`` and validated, which
does not block writers while the table is scanned.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "sqla_pgotask_0005"
down_revision = "sqla_pgotask_0004"
branch_labels = None
depends_on = None

#: The instants a task's timestamps may hold: finite, and far enough from
#: the ends of Python's ``datetime`` that any time zone can show them.
EARLIEST = "1970-01-01 00:00:00+00"
LATEST = "9000-01-01 00:00:00+00"
#: The longest kind or queue name, in characters (a queue name is the
#: payload of the wake-up NOTIFY, which carries at most 7,999 bytes).
MAX_NAME = 200

_OPTIONAL_TIMESTAMPS = (
    "started_at",
    "finished_at",
    "cancel_requested_at",
    "lease_expires_at",
    "slot",
)


def _in_range(column: str) -> str:
    return f"({column} >= '{EARLIEST}' AND {column} < '{LATEST}')"


CHECKS = {
    "kind_valid": f"kind <> '' AND length(kind) <= {MAX_NAME}",
    "queue_valid": f"queue <> '' AND length(queue) <= {MAX_NAME}",
    "run_at_in_range": _in_range("run_at"),
    "timestamps_in_range": " AND ".join(
        [_in_range("created_at")]
        + [f"({c} IS NULL OR {_in_range(c)})" for c in _OPTIONAL_TIMESTAMPS]
    ),
    "running_has_lease": (
        "status <> 'running' OR (locked_by IS NOT NULL AND lease_expires_at IS NOT NULL)"
    ),
    "pending_has_an_attempt_left": (
        "status <> 'pending' OR max_attempts IS NULL OR attempts < max_attempts"
    ),
}

_REFUSED = "sqla_pgotask.errors.UnrunnableTaskError"


def upgrade() -> None:
    _repair()
    for name, condition in CHECKS.items():
        op.execute(
            f"ALTER TABLE pgotask_task ADD CONSTRAINT ck_pgotask_task_{name} "
            f"CHECK ({condition}) NOT VALID"
        )
    for name in CHECKS:
        if name in ("kind_valid", "queue_valid"):
            continue
        op.execute(f"ALTER TABLE pgotask_task VALIDATE CONSTRAINT ck_pgotask_task_{name}")
    # A kind or queue name cannot be repaired: validate only when no row
    # breaks the rule (otherwise the constraint still holds for new rows).
    op.execute(
        f"""
        DO $$
        BEGIN
            IF NOT EXISTS (SELECT FROM pgotask_task WHERE NOT ({CHECKS["kind_valid"]})) THEN
                ALTER TABLE pgotask_task VALIDATE CONSTRAINT ck_pgotask_task_kind_valid;
            END IF;
            IF NOT EXISTS (SELECT FROM pgotask_task WHERE NOT ({CHECKS["queue_valid"]})) THEN
                ALTER TABLE pgotask_task VALIDATE CONSTRAINT ck_pgotask_task_queue_valid;
            END IF;
        END
        $$
        """
    )

    # What a worker reports about handler threads it cannot use: a handler
    # still running well past its timeout holds its thread (Python cannot
    # interrupt it).  ``pgotask check`` reads these.
    op.add_column(
        "pgotask_worker",
        sa.Column("stuck_slots", sa.Integer(), server_default=sa.text("0"), nullable=False),
    )
    op.add_column(
        "pgotask_worker",
        sa.Column("all_stuck_since", sa.DateTime(timezone=True), nullable=True),
    )
    _dedup_function(keep_an_attempt=True)
    _set_schema_revision(revision)


def _repair() -> None:
    """Bring rows that break the new constraints within them before validating."""
    # Pending tasks that cannot run: due never, due before 1970, or out of
    # attempts.  They end 'failed', with an error that keeps the value that
    # was wrong.
    op.execute(
        f"""
        WITH broken AS (
            SELECT id, attempts,
                   CASE WHEN NOT {_in_range("run_at")}
                        THEN format('run_at %s is not between {EARLIEST} and {LATEST}', run_at)
                        ELSE format('no attempt left (%s of %s used)', attempts, max_attempts)
                   END AS why
            FROM pgotask_task
            WHERE status = 'pending'
              AND (NOT {_in_range("run_at")}
                   OR (max_attempts IS NOT NULL AND attempts >= max_attempts))
            FOR UPDATE
        ),
        ended AS (
            UPDATE pgotask_task AS t
            SET status = 'failed', finished_at = clock_timestamp()
            FROM broken
            WHERE t.id = broken.id
            RETURNING t.id
        )
        INSERT INTO pgotask_task_error (task_id, attempt, exception_type, message, worker)
        SELECT broken.id, broken.attempts, '{_REFUSED}',
               'the task cannot run: ' || broken.why || ' (found by migration {revision})',
               NULL
        FROM broken JOIN ended ON ended.id = broken.id
        """
    )
    # Out-of-range instants elsewhere: a finished task's run_at becomes its
    # creation time; optional timestamps are cleared; a running task's lease
    # expires now, so the next rescue gives it back.
    op.execute(
        f"""
        UPDATE pgotask_task
        SET run_at = CASE WHEN {_in_range("run_at")} THEN run_at
                          WHEN {_in_range("created_at")} THEN created_at
                          ELSE now() END,
            created_at = CASE WHEN {_in_range("created_at")} THEN created_at ELSE now() END,
            {
            ", ".join(
                f"{c} = CASE WHEN {c} IS NULL OR {_in_range(c)} THEN {c} END"
                for c in _OPTIONAL_TIMESTAMPS
            )
        }
        WHERE NOT ({CHECKS["run_at_in_range"]}) OR NOT ({CHECKS["timestamps_in_range"]})
        """
    )
    op.execute(
        """
        UPDATE pgotask_task
        SET locked_by = COALESCE(locked_by, 'unknown'),
            lease_expires_at = COALESCE(lease_expires_at, now())
        WHERE status = 'running' AND (locked_by IS NULL OR lease_expires_at IS NULL)
        """
    )


def _dedup_function(*, keep_an_attempt: bool) -> None:
    # A debounce that lowers max_attempts below what the pending original
    # already used leaves it one more attempt, rather than making it a
    # pending task that can never run (refused by pending_has_an_attempt_left).
    max_attempts = (
        "CASE WHEN NEW.max_attempts IS NULL THEN NULL "
        "ELSE GREATEST(NEW.max_attempts, attempts + 1) END"
        if keep_an_attempt
        else "NEW.max_attempts"
    )
    op.execute(
        f"""
        CREATE OR REPLACE FUNCTION pgotask_dedup() RETURNS trigger
        LANGUAGE plpgsql AS $$
        DECLARE
            live_id bigint;
            live_status text;
            replaced boolean := false;
        BEGIN
            PERFORM pg_advisory_xact_lock(hashtext(NEW.kind), hashtext(NEW.dedup_key));
            SELECT id, status INTO live_id, live_status
            FROM pgotask_task
            WHERE kind = NEW.kind AND dedup_key = NEW.dedup_key
              AND status IN ('pending', 'running')
            LIMIT 1;
            IF live_id IS NULL THEN
                RETURN NEW;
            END IF;
            IF NEW.on_duplicate = 'replace' AND live_status = 'pending' THEN
                UPDATE pgotask_task
                SET payload = NEW.payload,
                    run_at = NEW.run_at,
                    priority = NEW.priority,
                    queue = NEW.queue,
                    max_attempts = {max_attempts}
                WHERE id = live_id AND status = 'pending';
                replaced := FOUND;
            END IF;
            NEW.status := 'cancelled';
            NEW.finished_at := clock_timestamp();
            NEW.result := jsonb_build_object('duplicate_of', live_id, 'replaced', replaced);
            RETURN NEW;
        END;
        $$
        """
    )


def downgrade() -> None:
    _dedup_function(keep_an_attempt=False)
    op.drop_column("pgotask_worker", "all_stuck_since")
    op.drop_column("pgotask_worker", "stuck_slots")
    for name in reversed(CHECKS):
        op.execute(f"ALTER TABLE pgotask_task DROP CONSTRAINT ck_pgotask_task_{name}")
    _set_schema_revision(down_revision)


def _set_schema_revision(rev: str) -> None:
    op.execute(
        "CREATE OR REPLACE FUNCTION pgotask_schema_revision() RETURNS text "
        f"LANGUAGE sql IMMUTABLE AS $$ SELECT '{rev}'::text $$"
    )
