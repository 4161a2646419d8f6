"""webhooks: a factory's hooks and the outbox of their deliveries (ADR 0017)

Revision ID: 0016
Revises: 0015
"""

import sqlalchemy as sa
from alembic import op

from tufa.server.migrations.columns import created_at, factory_id, factory_ref, moment, string

revision = "0016"
down_revision = "0015"


def upgrade() -> None:
    op.create_table(
        "webhooks",
        string("id", 32),
        factory_id(),
        sa.Column("url", sa.Text(), nullable=False),
        string("events", 400),
        sa.Column("secret_encrypted", sa.LargeBinary(), nullable=False),
        created_at(),
        factory_ref(),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_webhooks_factory_id", "webhooks", ["factory_id"], unique=False)
    op.create_table(
        "webhook_deliveries",
        string("id", 32),
        factory_id(),
        string("hook_id", 32),
        string("event", 64),
        string("dedupe_key", 200, nullable=True),
        sa.Column("body", sa.Text(), nullable=False),
        created_at(),
        sa.Column("attempts", sa.Integer(), nullable=False),
        moment("next_attempt_at", nullable=True),
        moment("delivered_at", nullable=True),
        moment("given_up_at", nullable=True),
        sa.Column("last_status", sa.Integer(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        factory_ref(),
        sa.ForeignKeyConstraint(["hook_id"], ["webhooks.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint(
            "hook_id", "dedupe_key", name="uq_webhook_deliveries_hook_id_dedupe_key"
        ),
    )
    op.create_index(
        "ix_webhook_deliveries_next_attempt_at",
        "webhook_deliveries",
        ["next_attempt_at"],
        unique=False,
    )
    op.create_index(
        "ix_webhook_deliveries_hook_id_created_at",
        "webhook_deliveries",
        ["hook_id", "created_at"],
        unique=False,
    )


def downgrade() -> None:
    op.drop_index("ix_webhook_deliveries_hook_id_created_at", table_name="webhook_deliveries")
    op.drop_index("ix_webhook_deliveries_next_attempt_at", table_name="webhook_deliveries")
    op.drop_table("webhook_deliveries")
    op.drop_index("ix_webhooks_factory_id", table_name="webhooks")
    op.drop_table("webhooks")
