"""waves, device groups and per-device production views

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
    with op.batch_alter_table("devices") as batch_op:
        batch_op.add_column(
            sa.Column("view", sa.String(length=200), nullable=False, server_default="")
        )
    with op.batch_alter_table("targets") as batch_op:
        batch_op.add_column(sa.Column("released_at", sa.DateTime(), nullable=True))
    op.create_table(
        "waves",
        sa.Column("factory_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("tag", sa.String(length=128), nullable=False),
        sa.Column("version", sa.String(length=64), nullable=False),
        sa.Column("targets_version", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("targets", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("finished_at", sa.DateTime(), nullable=True),
        sa.ForeignKeyConstraint(["factory_id"], ["factories.id"]),
        sa.PrimaryKeyConstraint("factory_id", "name"),
    )
    op.create_table(
        "device_groups",
        sa.Column("factory_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(["factory_id"], ["factories.id"]),
        sa.PrimaryKeyConstraint("factory_id", "name"),
    )
    op.create_table(
        "device_group_members",
        sa.Column("factory_id", sa.Integer(), nullable=False),
        sa.Column("group_name", sa.String(length=64), nullable=False),
        sa.Column("device_id", sa.String(length=36), nullable=False),
        sa.ForeignKeyConstraint(["factory_id"], ["factories.id"]),
        sa.ForeignKeyConstraint(["device_id"], ["devices.id"]),
        sa.PrimaryKeyConstraint("factory_id", "group_name", "device_id"),
    )


def downgrade() -> None:
    op.drop_table("device_group_members")
    op.drop_table("device_groups")
    op.drop_table("waves")
    with op.batch_alter_table("targets") as batch_op:
        batch_op.drop_column("released_at")
    with op.batch_alter_table("devices") as batch_op:
        batch_op.drop_column("view")
