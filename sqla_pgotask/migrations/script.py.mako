"""${message}

Revision ID: ${up_revision}
Revises: ${down_revision | comma,n}
Create Date: ${create_date}
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
${imports if imports else ""}
revision = ${repr(up_revision)}
down_revision = ${repr(down_revision)}
branch_labels = ${repr(branch_labels)}
depends_on = ${repr(depends_on)}


def upgrade() -> None:
    ${upgrades if upgrades else "pass"}
    # Every revision ends by recording itself for the workers' schema check,
    # and alembic_helpers.HEAD_REVISION / REVISIONS must name it.  What it
    # changes goes into sql/schema.sql too (tests/test_schema_sql.py).
    op.execute(
        "CREATE OR REPLACE FUNCTION pgotask_schema_revision() RETURNS text "
        f"LANGUAGE sql IMMUTABLE AS $$ SELECT '{revision}'::text $$"
    )


def downgrade() -> None:
    ${downgrades if downgrades else "pass"}
    op.execute(
        "CREATE OR REPLACE FUNCTION pgotask_schema_revision() RETURNS text "
        f"LANGUAGE sql IMMUTABLE AS $$ SELECT '{down_revision}'::text $$"
    )
