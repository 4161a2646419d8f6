"""device reports: what a device runs, and the events it reported

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("devices") as batch_op:
        batch_op.add_column(sa.Column("installed_version", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("installed_target", sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column("installed_sha256", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("last_report_at", sa.DateTime(), nullable=True))
    op.create_table(
        "device_events",
        sa.Column("device_id", sa.String(length=36), nullable=False),
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("factory_id", sa.Integer(), nullable=False),
        sa.Column("at", sa.DateTime(), nullable=False),
        sa.Column("received_at", sa.DateTime(), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("version", sa.String(length=64), nullable=True),
        sa.Column("target", sa.String(length=255), nullable=True),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(["device_id"], ["devices.id"]),
        sa.ForeignKeyConstraint(["factory_id"], ["factories.id"]),
        sa.PrimaryKeyConstraint("device_id", "id"),
    )
    op.create_index(
        "ix_device_events_factory_id_version",
        "device_events",
        ["factory_id", "version"],
        unique=False,
    )


def downgrade() -> None:
    op.drop_index("ix_device_events_factory_id_version", table_name="device_events")
    op.drop_table("device_events")
    with op.batch_alter_table("devices") as batch_op:
        batch_op.drop_column("last_report_at")
        batch_op.drop_column("installed_sha256")
        batch_op.drop_column("installed_target")
        batch_op.drop_column("installed_version")
