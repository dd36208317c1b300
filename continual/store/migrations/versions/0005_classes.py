"""classes: every label's first sighting; model_versions.classes

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-24 10:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "classes",
        sa.Column("label", sa.String(length=255), nullable=False),
        sa.Column("first_seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("first_seq", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("label", name=op.f("pk_classes")),
    )
    # Every label already stored, first seen with its oldest sample (excluded ones included: it was seen).
    op.execute(
        "INSERT INTO classes (label, first_seen_at, first_seq) "
        "SELECT label, MIN(ingested_at), MIN(seq) FROM samples GROUP BY label"
    )
    with op.batch_alter_table("model_versions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("classes", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("model_versions", schema=None) as batch_op:
        batch_op.drop_column("classes")
    op.drop_table("classes")
