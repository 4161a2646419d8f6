"""CI views per hardware id and tag: stored target entries, which view lists what

Revision ID: 0009
Revises: 0008

Rows are not converted here: encoding a target's entry and naming its views are the
server's rules, so the server fills them in at start (`ci_views.upgrade`), with the
CI devices moved to their views and those views published in the same transaction.
"""

import sqlalchemy as sa
from alembic import op

from tufa.server.migrations.columns import factory_id, factory_ref, string

revision = "0009"
down_revision = "0008"

VIEW_LENGTH = 300


def upgrade() -> None:
    with op.batch_alter_table("targets") as batch_op:
        batch_op.add_column(sa.Column("entry", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("entry_canonical", sa.Text(), nullable=True))
    op.create_index("ix_targets_factory_id_version", "targets", ["factory_id", "version"])
    op.create_table(
        "ci_view_targets",
        factory_id(),
        string("view", VIEW_LENGTH),
        string("name", 255),
        factory_ref(),
        sa.PrimaryKeyConstraint("factory_id", "view", "name"),
    )
    op.create_index("ix_ci_view_targets_factory_id_name", "ci_view_targets", ["factory_id", "name"])
    # SQLite does not enforce lengths; rebuilding these tables there would gain nothing.
    if op.get_bind().dialect.name != "sqlite":
        op.alter_column(
            "metadata_files", "view", type_=sa.String(VIEW_LENGTH), existing_nullable=False
        )
        op.alter_column("devices", "view", type_=sa.String(VIEW_LENGTH), existing_nullable=False)


def downgrade() -> None:
    op.drop_index("ix_ci_view_targets_factory_id_name", table_name="ci_view_targets")
    op.drop_table("ci_view_targets")
    op.drop_index("ix_targets_factory_id_version", table_name="targets")
    with op.batch_alter_table("targets") as batch_op:
        batch_op.drop_column("entry_canonical")
        batch_op.drop_column("entry")
