"""root update transactions

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
    with op.batch_alter_table("online_keys") as batch_op:
        batch_op.add_column(
            sa.Column("pending", sa.Boolean(), nullable=False, server_default=sa.false())
        )
    op.create_table(
        "root_updates",
        sa.Column("factory_id", sa.Integer(), nullable=False),
        sa.Column("message", sa.String(length=200), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("ci_root", sa.LargeBinary(), nullable=False),
        sa.Column("prod_root", sa.LargeBinary(), nullable=False),
        sa.Column("prod_targets", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(["factory_id"], ["factories.id"]),
        sa.PrimaryKeyConstraint("factory_id"),
    )


def downgrade() -> None:
    op.drop_table("root_updates")
    with op.batch_alter_table("online_keys") as batch_op:
        batch_op.drop_column("pending")
