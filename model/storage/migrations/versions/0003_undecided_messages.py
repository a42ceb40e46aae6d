"""Messages taken in without a decision: decisions.p_respond becomes nullable.

Under load the engine sheds messages (seen as context while a newer one of the channel is decided) and a
backend can time out; such messages get a decisions row with decision skipped|timeout|error and no
P(respond). Nothing else changes.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22 05:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("decisions") as batch:
        batch.alter_column("p_respond", existing_type=sa.Float(), nullable=True)


def downgrade() -> None:
    op.execute("DELETE FROM decisions WHERE p_respond IS NULL")
    with op.batch_alter_table("decisions") as batch:
        batch.alter_column("p_respond", existing_type=sa.Float(), nullable=False)
