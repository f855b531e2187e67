"""sqla_pgotask: the trace context a task was enqueued in.

Revision ID: sqla_pgotask_0004
Revises: sqla_pgotask_0003
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "sqla_pgotask_0004"
down_revision = "sqla_pgotask_0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # W3C trace context headers ({"traceparent": ..., "tracestate": ...}) of
    # the span that enqueued the task, when tracing is on (sqla_pgotask.otel).
    # Nullable without a default: adding it rewrites nothing.
    op.add_column(
        "pgotask_task",
        sa.Column("trace_context", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    )
    _set_schema_revision(revision)


def downgrade() -> None:
    op.drop_column("pgotask_task", "trace_context")
    _set_schema_revision(down_revision)


def _set_schema_revision(rev: str) -> None:
    op.execute(
        "CREATE OR REPLACE FUNCTION pgotask_schema_revision() RETURNS text "
        f"LANGUAGE sql IMMUTABLE AS $$ SELECT '{rev}'::text $$"
    )
