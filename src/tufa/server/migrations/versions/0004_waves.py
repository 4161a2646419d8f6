"""waves, device groups and per-device production views

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

from tufa.server.migrations.columns import (
    created_at,
    device_id,
    device_ref,
    factory_id,
    factory_ref,
    moment,
    string,
)

revision = "0004"
down_revision = "0003"


def upgrade() -> None:
    with op.batch_alter_table("devices") as batch_op:
        batch_op.add_column(
            sa.Column("view", sa.String(length=200), nullable=False, server_default="")
        )
    with op.batch_alter_table("targets") as batch_op:
        batch_op.add_column(moment("released_at", nullable=True))
    op.create_table(
        "waves",
        factory_id(),
        string("name", 64),
        string("tag", 128),
        string("version", 64),
        sa.Column("targets_version", sa.Integer(), nullable=False),
        string("status", 16),
        sa.Column("targets", sa.LargeBinary(), nullable=False),
        created_at(),
        moment("finished_at", nullable=True),
        factory_ref(),
        sa.PrimaryKeyConstraint("factory_id", "name"),
    )
    op.create_table(
        "device_groups",
        factory_id(),
        string("name", 64),
        created_at(),
        factory_ref(),
        sa.PrimaryKeyConstraint("factory_id", "name"),
    )
    op.create_table(
        "device_group_members",
        factory_id(),
        string("group_name", 64),
        device_id(),
        factory_ref(),
        device_ref(),
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
