"""root update transactions

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

from tufa.server.migrations.columns import created_at, factory_id, factory_ref, string

revision = "0002"
down_revision = "0001"


def upgrade() -> None:
    with op.batch_alter_table("online_keys") as batch_op:
        batch_op.add_column(
            sa.Column("pending", sa.Boolean(), nullable=False, server_default=sa.false())
        )
    op.create_table(
        "root_updates",
        factory_id(),
        string("message", 200),
        created_at(),
        sa.Column("ci_root", sa.LargeBinary(), nullable=False),
        sa.Column("prod_root", sa.LargeBinary(), nullable=False),
        sa.Column("prod_targets", sa.Text(), nullable=False),
        factory_ref(),
        sa.PrimaryKeyConstraint("factory_id"),
    )


def downgrade() -> None:
    op.drop_table("root_updates")
    with op.batch_alter_table("online_keys") as batch_op:
        batch_op.drop_column("pending")
