"""sqla_pgotask: task and task error tables, claim indexes, wake-up trigger.

Revision ID: sqla_pgotask_0001
Revises:
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "sqla_pgotask_0001"
down_revision = None
branch_labels = ("sqla_pgotask",)
depends_on = None

TZ = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "pgotask_task",
        sa.Column("id", sa.BigInteger(), sa.Identity(), nullable=False),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("queue", sa.Text(), server_default=sa.text("'default'"), nullable=False),
        sa.Column(
            "payload",
            postgresql.JSONB(),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
        sa.Column(
            "status",
            sa.String(length=16),
            server_default=sa.text("'pending'"),
            nullable=False,
        ),
        sa.Column("priority", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("run_at", TZ, server_default=sa.func.now(), nullable=False),
        sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("max_attempts", sa.Integer(), nullable=True),
        sa.Column("dedup_key", sa.Text(), nullable=True),
        sa.Column("created_at", TZ, server_default=sa.func.now(), nullable=False),
        sa.Column("started_at", TZ, nullable=True),
        sa.Column("finished_at", TZ, nullable=True),
        sa.Column("locked_by", sa.Text(), nullable=True),
        sa.Column("lease_expires_at", TZ, nullable=True),
        sa.Column("result", postgresql.JSONB(), nullable=True),
        sa.CheckConstraint(
            "max_attempts IS NULL OR max_attempts > 0",
            name=op.f("ck_pgotask_task_max_attempts_positive"),
        ),
        sa.CheckConstraint("attempts >= 0", name=op.f("ck_pgotask_task_attempts_not_negative")),
        # Named here, not by the running environment's naming convention, so
        # later revisions can find it whatever the application's env.py says.
        sa.CheckConstraint(
            "status IN ('pending', 'running', 'succeeded', 'failed', 'cancelled')",
            name=op.f("ck_pgotask_task_status"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_pgotask_task")),
    )
    op.create_index(
        "ix_pgotask_task_claim",
        "pgotask_task",
        [sa.text("priority DESC"), "run_at", "id"],
        postgresql_where=sa.text("status = 'pending'"),
    )
    op.create_index(
        "uq_pgotask_task_dedup",
        "pgotask_task",
        ["kind", "dedup_key"],
        unique=True,
        postgresql_where=sa.text("dedup_key IS NOT NULL AND status IN ('pending', 'running')"),
    )
    op.create_index(
        "ix_pgotask_task_lease",
        "pgotask_task",
        ["lease_expires_at"],
        postgresql_where=sa.text("status = 'running'"),
    )

    op.create_table(
        "pgotask_task_error",
        sa.Column("id", sa.BigInteger(), sa.Identity(), nullable=False),
        sa.Column("task_id", sa.BigInteger(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("exception_type", sa.Text(), nullable=False),
        sa.Column("message", sa.Text(), server_default=sa.text("''"), nullable=False),
        sa.Column("traceback", sa.Text(), nullable=True),
        sa.Column("worker", sa.Text(), nullable=True),
        sa.Column("created_at", TZ, server_default=sa.func.now(), nullable=False),
        sa.ForeignKeyConstraint(
            ["task_id"],
            ["pgotask_task.id"],
            name=op.f("fk_pgotask_task_error_task_id_pgotask_task"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_pgotask_task_error")),
    )
    op.create_index(op.f("ix_pgotask_task_error_task_id"), "pgotask_task_error", ["task_id"])

    # Wake workers when tasks are inserted, however they are inserted (ORM,
    # plain SQL, COPY).  One statement-level trigger: a bulk insert sends one
    # notification per distinct queue, not one per row.
    op.execute(
        """
        CREATE FUNCTION pgotask_notify_insert() RETURNS trigger
        LANGUAGE plpgsql AS $$
        DECLARE
            q text;
        BEGIN
            FOR q IN SELECT DISTINCT queue FROM new_rows LOOP
                PERFORM pg_notify('pgotask', q);
            END LOOP;
            RETURN NULL;
        END;
        $$
        """
    )
    op.execute(
        """
        CREATE TRIGGER pgotask_task_notify_insert
        AFTER INSERT ON pgotask_task
        REFERENCING NEW TABLE AS new_rows
        FOR EACH STATEMENT EXECUTE FUNCTION pgotask_notify_insert()
        """
    )
    _set_schema_revision(revision)


def downgrade() -> None:
    op.execute("DROP FUNCTION IF EXISTS pgotask_schema_revision()")
    op.execute("DROP TRIGGER IF EXISTS pgotask_task_notify_insert ON pgotask_task")
    op.execute("DROP FUNCTION IF EXISTS pgotask_notify_insert()")
    op.drop_index(op.f("ix_pgotask_task_error_task_id"), table_name="pgotask_task_error")
    op.drop_table("pgotask_task_error")
    op.drop_index("ix_pgotask_task_lease", table_name="pgotask_task")
    op.drop_index("uq_pgotask_task_dedup", table_name="pgotask_task")
    op.drop_index("ix_pgotask_task_claim", table_name="pgotask_task")
    op.drop_table("pgotask_task")


def _set_schema_revision(rev: str) -> None:
    # Workers compare this with the revision they were built for, whatever
    # version table the application's Alembic uses.
    op.execute(
        "CREATE OR REPLACE FUNCTION pgotask_schema_revision() RETURNS text "
        f"LANGUAGE sql IMMUTABLE AS $$ SELECT '{rev}'::text $$"
    )
