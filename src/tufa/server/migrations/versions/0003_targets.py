"""CI targets inventory

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

from tufa.server.migrations.columns import (
    created_at,
    factory_id,
    factory_ref,
    length,
    moment,
    sha256,
    string,
)

revision = "0003"
down_revision = "0002"


def upgrade() -> None:
    op.create_table(
        "targets",
        factory_id(),
        string("name", 255),
        length(),
        sha256(),
        sa.Column("url", sa.Text(), nullable=True),
        sa.Column("custom", sa.Text(), nullable=False),
        string("version", 64),
        created_at(),
        moment("pruned_at", nullable=True),
        factory_ref(),
        sa.PrimaryKeyConstraint("factory_id", "name"),
    )


def downgrade() -> None:
    op.drop_table("targets")
