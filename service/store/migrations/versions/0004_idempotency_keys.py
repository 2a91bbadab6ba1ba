"""jobs: the client's Idempotency-Key and its request's fingerprint, unique per API key, so a
retried request gets its first job back instead of a second charge

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("idempotency_key", sa.String(200), nullable=True))
        batch.add_column(sa.Column("request_fingerprint", sa.String(64), nullable=True))
    op.create_index(
        "ux_jobs_key_hash_idempotency_key",
        "jobs",
        ["key_hash", "idempotency_key"],
        unique=True,
    )


def downgrade() -> None:
    op.drop_index("ux_jobs_key_hash_idempotency_key", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("request_fingerprint")
        batch.drop_column("idempotency_key")
