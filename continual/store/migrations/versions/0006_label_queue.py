"""label_leases: the label queue's handed-out predictions

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01 17:40:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "label_leases",
        sa.Column("prediction_id", sa.String(length=32), nullable=False),
        sa.Column("leased_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("leased_until", sa.DateTime(timezone=True), nullable=False),
        sa.Column("holder", sa.String(length=255), nullable=False),
        sa.PrimaryKeyConstraint("prediction_id", name=op.f("pk_label_leases")),
    )


def downgrade() -> None:
    op.drop_table("label_leases")
