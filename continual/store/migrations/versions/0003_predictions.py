"""predictions (the prediction log) and accuracy_windows (label-free accuracy estimates)

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-24 10:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "predictions",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("model_version", sa.String(length=64), nullable=False),
        sa.Column("label", sa.String(length=255), nullable=False),
        sa.Column("confidence", sa.Float(), nullable=False),
        sa.Column("distance", sa.Float(), nullable=True),
        sa.Column("scores", sa.JSON(), nullable=True),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("payload", sa.LargeBinary(), nullable=True),
        sa.Column("input_policy", sa.String(length=16), nullable=False),
        sa.Column("true_label", sa.String(length=255), nullable=True),
        sa.Column("labeled_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("sample_id", sa.String(length=255), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_predictions")),
    )
    labeled = sa.text("labeled_at IS NOT NULL")
    with op.batch_alter_table("predictions", schema=None) as batch_op:
        batch_op.create_index("ix_predictions_version_id", ["model_version", "id"], unique=False)
        batch_op.create_index(
            "ix_predictions_version_labeled",
            ["model_version", "labeled_at"],
            unique=False,
            sqlite_where=labeled,
            postgresql_where=labeled,
        )

    op.create_table(
        "accuracy_windows",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("model_version", sa.String(length=64), nullable=False),
        sa.Column("first_id", sa.String(length=32), nullable=False),
        sa.Column("last_id", sa.String(length=32), nullable=False),
        sa.Column("first_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("n", sa.Integer(), nullable=False),
        sa.Column("estimates", sa.JSON(), nullable=False),
        sa.Column("flags", sa.JSON(), nullable=True),
        sa.Column("n_labeled", sa.Integer(), nullable=False),
        sa.Column("n_correct", sa.Integer(), nullable=False),
        sa.Column("unknown_labels", sa.JSON(), nullable=True),
        sa.Column("realized_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_accuracy_windows")),
    )
    with op.batch_alter_table("accuracy_windows", schema=None) as batch_op:
        batch_op.create_index("ix_accuracy_windows_version_last", ["model_version", "last_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("accuracy_windows", schema=None) as batch_op:
        batch_op.drop_index("ix_accuracy_windows_version_last")
    op.drop_table("accuracy_windows")
    with op.batch_alter_table("predictions", schema=None) as batch_op:
        batch_op.drop_index("ix_predictions_version_labeled")
        batch_op.drop_index("ix_predictions_version_id")
    op.drop_table("predictions")
