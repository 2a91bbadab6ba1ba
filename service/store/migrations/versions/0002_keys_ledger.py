"""api_keys and ledger_entries tables

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("key_hash", sa.String(64), nullable=False),
        sa.Column("plan", sa.String(16), nullable=False),
        sa.Column("admin", sa.Boolean(), nullable=False),
        sa.Column("balance_micros", sa.BigInteger(), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_keys")),
        sa.UniqueConstraint("name", name=op.f("uq_api_keys_name")),
        sa.UniqueConstraint("key_hash", name=op.f("uq_api_keys_key_hash")),
        sa.CheckConstraint("balance_micros >= 0", name=op.f("ck_api_keys_balance_non_negative")),
        sa.CheckConstraint(
            "plan IN ('free', 'pay_per_use', 'premium')", name=op.f("ck_api_keys_plan_known")
        ),
    )
    op.create_table(
        "ledger_entries",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("key_id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=True),
        sa.Column("model_id", sa.String(128), nullable=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("images", sa.Integer(), nullable=False),
        sa.Column("unit_price_micros", sa.BigInteger(), nullable=False),
        sa.Column("amount_micros", sa.BigInteger(), nullable=False),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ledger_entries")),
        sa.ForeignKeyConstraint(
            ["key_id"], ["api_keys.id"], name=op.f("fk_ledger_entries_key_id_api_keys")
        ),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_ledger_entries_job_id_jobs")
        ),
        sa.CheckConstraint(
            "kind IN ('reserve', 'settle', 'release', 'topup')",
            name=op.f("ck_ledger_entries_kind_known"),
        ),
        sa.CheckConstraint(
            "images >= 0 AND unit_price_micros >= 0",
            name=op.f("ck_ledger_entries_counts_non_negative"),
        ),
    )
    op.create_index(
        "ix_ledger_entries_key_id_created_at", "ledger_entries", ["key_id", "created_at"]
    )
    for name, where in (
        ("uq_ledger_entries_job_reserve", "kind = 'reserve'"),
        ("uq_ledger_entries_job_outcome", "kind IN ('settle', 'release')"),
    ):
        op.create_index(
            name,
            "ledger_entries",
            ["job_id"],
            unique=True,
            postgresql_where=sa.text(where),
            sqlite_where=sa.text(where),
        )


def downgrade() -> None:
    op.drop_table("ledger_entries")
    op.drop_table("api_keys")
