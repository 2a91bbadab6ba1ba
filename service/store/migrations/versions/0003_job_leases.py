"""jobs: owner, heartbeat and attempts, so orphaned jobs are found after a crash; an index
for the per-key concurrency count

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("owner", sa.String(64), nullable=True))
        batch.add_column(sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(
            sa.Column("attempts", sa.Integer(), nullable=False, server_default=sa.text("1"))
        )
    # the per-key concurrency check counts a key's processing jobs on every request
    op.create_index("ix_jobs_key_hash_status", "jobs", ["key_hash", "status"])


def downgrade() -> None:
    op.drop_index("ix_jobs_key_hash_status", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("attempts")
        batch.drop_column("heartbeat_at")
        batch.drop_column("owner")
