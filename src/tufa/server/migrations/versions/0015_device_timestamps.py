"""device timestamps: the timestamp each device last verified, and how often it polls

Revision ID: 0015
Revises: 0014

A device's report may carry the version and expiry of the timestamp it verified last
and its poll interval in seconds (ADR 0018); the server keeps what the latest report
said, to tell devices fed stale metadata. All three stay NULL for a device whose agent
does not send them. `view_since` is when a wave last moved the device to another view.
"""

import sqlalchemy as sa
from alembic import op

from tufa.server.migrations.columns import moment

revision = "0015"
down_revision = "0014"


def upgrade() -> None:
    with op.batch_alter_table("devices") as batch_op:
        batch_op.add_column(sa.Column("verified_timestamp_version", sa.Integer(), nullable=True))
        batch_op.add_column(moment("verified_timestamp_expires", nullable=True))
        batch_op.add_column(sa.Column("poll_interval", sa.Integer(), nullable=True))
        batch_op.add_column(moment("view_since", nullable=True))


def downgrade() -> None:
    # ALTER TABLE, not a batch: on SQLite a batch copies the table, and the copy would
    # lose the auth_generation triggers of revision 0010.
    for column in (
        "view_since",
        "poll_interval",
        "verified_timestamp_expires",
        "verified_timestamp_version",
    ):
        op.execute(f"ALTER TABLE devices DROP COLUMN {column}")
