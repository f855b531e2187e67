"""sqla_pgotask: worker registry, cancellation requests.

Revision ID: sqla_pgotask_0002
Revises: sqla_pgotask_0001
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "sqla_pgotask_0002"
down_revision = "sqla_pgotask_0001"
branch_labels = None
depends_on = None

TZ = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "pgotask_worker",
        sa.Column("id", sa.Text(), nullable=False),
        sa.Column("host", sa.Text(), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("node", sa.Text(), nullable=False),
        sa.Column("kinds", postgresql.ARRAY(sa.Text()), nullable=False),
        sa.Column("queues", postgresql.ARRAY(sa.Text()), nullable=True),
        sa.Column("concurrency", sa.Integer(), nullable=False),
        sa.Column("started_at", TZ, server_default=sa.func.now(), nullable=False),
        sa.Column("last_heartbeat_at", TZ, server_default=sa.func.now(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_pgotask_worker")),
    )
    op.add_column("pgotask_task", sa.Column("cancel_requested_at", TZ, nullable=True))

    # Cancelling is one UPDATE, from Python or plain SQL:
    #   UPDATE pgotask_task SET cancel_requested_at = now() WHERE id = 42;
    # A pending task becomes 'cancelled' at once (it never runs); a running
    # one is flagged, and its worker is told by NOTIFY.
    op.execute(
        """
        CREATE FUNCTION pgotask_on_cancel_request() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.status = 'pending' THEN
                NEW.status := 'cancelled';
                NEW.finished_at := clock_timestamp();
            ELSIF NEW.status = 'running' THEN
                PERFORM pg_notify('pgotask_cancel', NEW.id::text);
            END IF;
            RETURN NEW;
        END;
        $$
        """
    )
    op.execute(
        """
        CREATE TRIGGER pgotask_task_cancel_request
        BEFORE UPDATE OF cancel_requested_at ON pgotask_task
        FOR EACH ROW
        WHEN (NEW.cancel_requested_at IS NOT NULL AND OLD.cancel_requested_at IS NULL)
        EXECUTE FUNCTION pgotask_on_cancel_request()
        """
    )
    op.execute(
        """
        CREATE FUNCTION pgotask_cancel(task_id bigint) RETURNS text
        LANGUAGE sql AS $$
            UPDATE pgotask_task
            SET cancel_requested_at = coalesce(cancel_requested_at, clock_timestamp())
            WHERE id = task_id AND status IN ('pending', 'running')
            RETURNING status::text
        $$
        """
    )
    _set_schema_revision(revision)


def downgrade() -> None:
    op.execute("DROP FUNCTION IF EXISTS pgotask_cancel(bigint)")
    op.execute("DROP TRIGGER IF EXISTS pgotask_task_cancel_request ON pgotask_task")
    op.execute("DROP FUNCTION IF EXISTS pgotask_on_cancel_request()")
    op.drop_column("pgotask_task", "cancel_requested_at")
    op.drop_table("pgotask_worker")
    _set_schema_revision(down_revision)


def _set_schema_revision(rev: str) -> None:
    op.execute(
        "CREATE OR REPLACE FUNCTION pgotask_schema_revision() RETURNS text "
        f"LANGUAGE sql IMMUTABLE AS $$ SELECT '{rev}'::text $$"
    )
