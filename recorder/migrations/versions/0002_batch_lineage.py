"""training batches record their parent version; at most one open batch per parent

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02 10:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

OPEN_BATCH = sa.text("status IN ('pending', 'running')")


def upgrade() -> None:
    # Batches from before this revision have no recorded parent (NULL), so they never conflict: an upgrade
    # with a batch in flight goes through.
    with op.batch_alter_table("training_batches", schema=None) as batch_op:
        batch_op.add_column(sa.Column("parent_version", sa.Integer(), nullable=True))
        batch_op.create_index(
            "uq_training_batches_open_per_parent",
            ["parent_version"],
            unique=True,
            sqlite_where=OPEN_BATCH,
            postgresql_where=OPEN_BATCH,
        )


def downgrade() -> None:
    with op.batch_alter_table("training_batches", schema=None) as batch_op:
        batch_op.drop_index("uq_training_batches_open_per_parent")
        batch_op.drop_column("parent_version")
