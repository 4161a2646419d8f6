"""blob owners: which factory may use which stored file

Revision ID: 0007
Revises: 0005

Until now any factory could publish a target naming a blob another factory uploaded.
Access is now per factory. Factories that already publish targets keep the blobs those
targets name: nobody can tell any more who uploaded them, and their devices must keep
downloading what they are served (see ADR 0010).
"""

import sqlalchemy as sa
from alembic import op

from tufa.server.migrations.columns import created_at, factory_id, factory_ref, length, sha256

revision = "0007"
down_revision = "0006"


def upgrade() -> None:
    op.create_table(
        "blob_owners",
        factory_id(),
        sha256(),
        length(),
        created_at(),
        factory_ref(),
        sa.PrimaryKeyConstraint("factory_id", "sha256"),
    )
    # The length a target signed is what its devices check; targets of one factory that
    # name one hash with different lengths cannot all be right, and the next upload of
    # the file by that factory records its true length.
    op.execute(
        "INSERT INTO blob_owners (factory_id, sha256, length, created_at) "
        "SELECT factory_id, sha256, MIN(length), MIN(created_at) FROM targets "
        "WHERE url IS NULL GROUP BY factory_id, sha256"
    )


def downgrade() -> None:
    op.drop_table("blob_owners")
