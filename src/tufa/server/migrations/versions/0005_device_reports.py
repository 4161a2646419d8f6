"""device reports: what a device runs, and the events it reported

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

from tufa.server.migrations.columns import (
    device_id,
    device_ref,
    factory_id,
    factory_ref,
    moment,
    sha256,
    string,
)

revision = "0005"
down_revision = "0004"


def upgrade() -> None:
    with op.batch_alter_table("devices") as batch_op:
        batch_op.add_column(string("installed_version", 64, nullable=True))
        batch_op.add_column(string("installed_target", 255, nullable=True))
        batch_op.add_column(sha256("installed_sha256", nullable=True))
        batch_op.add_column(moment("last_report_at", nullable=True))
    op.create_table(
        "device_events",
        device_id(),
        string("id", 64),
        factory_id(),
        moment("at", nullable=False),
        moment("received_at", nullable=False),
        string("kind", 32),
        string("version", 64, nullable=True),
        string("target", 255, nullable=True),
        sa.Column("detail", sa.Text(), nullable=False),
        device_ref(),
        factory_ref(),
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
