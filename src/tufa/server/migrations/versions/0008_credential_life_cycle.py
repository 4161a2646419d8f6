"""credential life cycle: revoked devices, rotated credentials, retired credentials

Revision ID: 0008
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Columns are only added (and the index created): on SQLite anything more would
    # rebuild `devices`, which its events and group memberships refer to.
    with op.batch_alter_table("devices") as batch_op:
        batch_op.add_column(sa.Column("credential_since", sa.DateTime(), nullable=True))
        batch_op.add_column(sa.Column("pending_secret_sha256", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("revoked_at", sa.DateTime(), nullable=True))
    op.create_index(
        "ix_devices_pending_secret_sha256", "devices", ["pending_secret_sha256"], unique=True
    )
    # Every credential so far was issued at registration.
    op.execute("UPDATE devices SET credential_since = created_at")
    op.create_table(
        "retired_credentials",
        sa.Column("secret_sha256", sa.String(length=64), nullable=False),
        sa.Column("factory_id", sa.Integer(), nullable=False),
        sa.Column("device_id", sa.String(length=36), nullable=False),
        sa.Column("device_name", sa.String(length=128), nullable=False),
        sa.Column("reason", sa.String(length=16), nullable=False),
        sa.Column("retired_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(["factory_id"], ["factories.id"]),
        sa.PrimaryKeyConstraint("secret_sha256"),
    )
    op.create_index(
        "ix_retired_credentials_factory_id_device_name",
        "retired_credentials",
        ["factory_id", "device_name"],
        unique=False,
    )


def downgrade() -> None:
    op.drop_index("ix_retired_credentials_factory_id_device_name", table_name="retired_credentials")
    op.drop_table("retired_credentials")
    op.drop_index("ix_devices_pending_secret_sha256", table_name="devices")
    with op.batch_alter_table("devices") as batch_op:
        batch_op.drop_column("revoked_at")
        batch_op.drop_column("pending_secret_sha256")
        batch_op.drop_column("credential_since")
