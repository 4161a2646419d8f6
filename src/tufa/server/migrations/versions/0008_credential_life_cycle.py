"""credential life cycle: revoked devices, rotated credentials, retired credentials

Revision ID: 0008
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

from tufa.server.migrations.columns import (
    device_id,
    factory_id,
    factory_ref,
    moment,
    sha256,
    string,
)

revision = "0008"
down_revision = "0007"


def upgrade() -> None:
    # Columns are only added (and the index created): on SQLite anything more would
    # rebuild `devices`, which its events and group memberships refer to.
    with op.batch_alter_table("devices") as batch_op:
        batch_op.add_column(moment("credential_since", nullable=True))
        batch_op.add_column(sha256("pending_secret_sha256", nullable=True))
        batch_op.add_column(moment("revoked_at", nullable=True))
    op.create_index(
        "ix_devices_pending_secret_sha256", "devices", ["pending_secret_sha256"], unique=True
    )
    # Every credential so far was issued at registration.
    op.execute("UPDATE devices SET credential_since = created_at")
    op.create_table(
        "retired_credentials",
        sha256("secret_sha256"),
        factory_id(),
        device_id(),
        string("device_name", 128),
        string("reason", 16),
        moment("retired_at", nullable=False),
        factory_ref(),
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
