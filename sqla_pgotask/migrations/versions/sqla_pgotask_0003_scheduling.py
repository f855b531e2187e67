"""sqla_pgotask: periodic schedules, deduplication, queue pause, fleet-wide limits.

Revision ID: sqla_pgotask_0003
Revises: sqla_pgotask_0002
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "sqla_pgotask_0003"
down_revision = "sqla_pgotask_0002"
branch_labels = None
depends_on = None

TZ = sa.DateTime(timezone=True)


def upgrade() -> None:
    _periodic()
    _deduplication()
    _queues()
    _limits()
    _set_schema_revision(revision)


def downgrade() -> None:
    op.drop_table("pgotask_limit")
    op.execute("DROP FUNCTION IF EXISTS pgotask_resume_queue(text)")
    op.execute("DROP FUNCTION IF EXISTS pgotask_pause_queue(text)")
    op.execute("DROP TRIGGER IF EXISTS pgotask_queue_resumed ON pgotask_queue")
    op.execute("DROP FUNCTION IF EXISTS pgotask_notify_resume()")
    op.drop_table("pgotask_queue")
    op.execute("DROP TRIGGER IF EXISTS pgotask_task_dedup ON pgotask_task")
    op.execute("DROP FUNCTION IF EXISTS pgotask_dedup()")
    op.drop_constraint(op.f("ck_pgotask_task_on_duplicate"), "pgotask_task", type_="check")
    op.drop_column("pgotask_task", "on_duplicate")
    op.drop_table("pgotask_schedule")
    op.drop_index("uq_pgotask_task_slot", table_name="pgotask_task")
    op.drop_column("pgotask_task", "slot")
    op.drop_column("pgotask_task", "schedule")
    _set_schema_revision(down_revision)


def _periodic() -> None:
    # A periodic task names its schedule and the slot (the instant the
    # schedule fired) it runs for.  The unique index is the fence: whatever
    # number of workers enqueue the same slot, one row exists.
    op.add_column("pgotask_task", sa.Column("schedule", sa.Text(), nullable=True))
    op.add_column("pgotask_task", sa.Column("slot", TZ, nullable=True))
    op.create_index(
        "uq_pgotask_task_slot",
        "pgotask_task",
        ["schedule", "slot"],
        unique=True,
        postgresql_where=sa.text("schedule IS NOT NULL"),
    )
    # One row per schedule: the last slot enqueued, so missed slots can be
    # told after a pause (and old slots are never enqueued again after
    # their tasks were pruned).
    op.create_table(
        "pgotask_schedule",
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("expression", sa.Text(), nullable=False),
        sa.Column("timezone", sa.Text(), nullable=False),
        sa.Column("last_slot", TZ, nullable=True),
        sa.Column("updated_at", TZ, server_default=sa.func.now(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_pgotask_schedule")),
    )


def _deduplication() -> None:
    op.add_column("pgotask_task", sa.Column("on_duplicate", sa.Text(), nullable=True))
    op.create_check_constraint(
        op.f("ck_pgotask_task_on_duplicate"),
        "pgotask_task",
        "on_duplicate IN ('ignore', 'replace')",
    )
    # Adding a task whose (kind, dedup_key) matches a live (pending or
    # running) task does not raise: the new row is stored as 'cancelled',
    # with result {"duplicate_of": <live id>, "replaced": <bool>}, so the
    # application's transaction goes on (an ORM flush needs its row back,
    # which rules out ON CONFLICT DO NOTHING).  With on_duplicate = 'replace'
    # a pending original takes the new payload, run_at, priority, queue and
    # max_attempts first (debounce).  The advisory lock serialises adds of
    # one key: a concurrent add waits for the first to commit, then (in READ
    # COMMITTED, whose statements each take a new snapshot) sees its task.
    op.execute(
        """
        CREATE FUNCTION pgotask_dedup() RETURNS trigger
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
                    max_attempts = NEW.max_attempts
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
    op.execute(
        """
        CREATE TRIGGER pgotask_task_dedup
        BEFORE INSERT ON pgotask_task
        FOR EACH ROW
        WHEN (NEW.dedup_key IS NOT NULL AND NEW.status = 'pending')
        EXECUTE FUNCTION pgotask_dedup()
        """
    )


def _queues() -> None:
    # A queue with paused_at set is skipped by every worker's claim; running
    # tasks finish.  Resuming notifies the queue's workers.
    op.create_table(
        "pgotask_queue",
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("paused_at", TZ, nullable=True),
        sa.Column("updated_at", TZ, server_default=sa.func.now(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_pgotask_queue")),
    )
    op.execute(
        """
        CREATE FUNCTION pgotask_notify_resume() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_notify('pgotask', OLD.name);
            RETURN NULL;
        END;
        $$
        """
    )
    op.execute(
        """
        CREATE TRIGGER pgotask_queue_resumed
        AFTER UPDATE OR DELETE ON pgotask_queue
        FOR EACH ROW
        WHEN (OLD.paused_at IS NOT NULL)
        EXECUTE FUNCTION pgotask_notify_resume()
        """
    )
    # From plain SQL: SELECT pgotask_pause_queue('emails');
    op.execute(
        """
        CREATE FUNCTION pgotask_pause_queue(queue_name text) RETURNS timestamptz
        LANGUAGE sql AS $$
            INSERT INTO pgotask_queue (name, paused_at) VALUES (queue_name, clock_timestamp())
            ON CONFLICT (name) DO UPDATE
            SET paused_at = COALESCE(pgotask_queue.paused_at, EXCLUDED.paused_at),
                updated_at = clock_timestamp()
            RETURNING paused_at
        $$
        """
    )
    op.execute(
        """
        CREATE FUNCTION pgotask_resume_queue(queue_name text) RETURNS boolean
        LANGUAGE sql AS $$
            UPDATE pgotask_queue SET paused_at = NULL, updated_at = clock_timestamp()
            WHERE name = queue_name AND paused_at IS NOT NULL
            RETURNING true
        $$
        """
    )


def _limits() -> None:
    # Fleet-wide limits: one row per limited kind or queue ('kind:<name>' or
    # 'queue:<name>').  Claims of limited tasks lock the row, so concurrent
    # workers take turns; recent_starts holds the start times a rate limit
    # counts (a sliding window).
    op.create_table(
        "pgotask_limit",
        sa.Column("key", sa.Text(), nullable=False),
        sa.Column(
            "recent_starts",
            postgresql.ARRAY(TZ),
            server_default=sa.text("'{}'"),
            nullable=False,
        ),
        sa.Column("updated_at", TZ, server_default=sa.func.now(), nullable=False),
        sa.PrimaryKeyConstraint("key", name=op.f("pk_pgotask_limit")),
    )


def _set_schema_revision(rev: str) -> None:
    op.execute(
        "CREATE OR REPLACE FUNCTION pgotask_schema_revision() RETURNS text "
        f"LANGUAGE sql IMMUTABLE AS $$ SELECT '{rev}'::text $$"
    )
