"""initial schema

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

from tufa.server.migrations.columns import (
    created_at,
    factory_id,
    factory_ref,
    moment,
    sha256,
    string,
)

revision = "0001"
down_revision = None


def upgrade() -> None:
    op.create_table(
        "server_facts",
        string("name", 64),
        sa.Column("value", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )
    op.create_table(
        "factories",
        sa.Column("id", sa.Integer(), nullable=False),
        string("name", 64),
        sa.Column("anonymous_read", sa.Boolean(), nullable=False),
        created_at(),
        moment("archive_downloaded_at", nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name"),
    )
    op.create_table(
        "channels",
        factory_id(),
        string("channel", 8),
        *(
            sa.Column(f"{role}_version", sa.Integer(), nullable=False)
            for role in ("root", "targets", "snapshot", "timestamp")
        ),
        factory_ref(),
        sa.PrimaryKeyConstraint("factory_id", "channel"),
    )
    op.create_table(
        "devices",
        string("id", 36),
        factory_id(),
        string("name", 128),
        string("hardware_id", 128),
        string("tag", 128),
        string("channel", 8),
        sha256("secret_sha256"),
        created_at(),
        factory_ref(),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("factory_id", "name"),
        sa.UniqueConstraint("secret_sha256"),
    )
    _index_factory_id("devices")
    op.create_table(
        "key_archives",
        factory_id(),
        sa.Column("archive_encrypted", sa.LargeBinary(), nullable=False),
        sha256(),
        created_at(),
        factory_ref(),
        sa.PrimaryKeyConstraint("factory_id"),
    )
    op.create_table(
        "metadata_files",
        factory_id(),
        string("channel", 8),
        string("view", 128),
        string("role", 16),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("body", sa.LargeBinary(), nullable=False),
        string("etag", 80),
        moment("expires", nullable=False),
        created_at(),
        factory_ref(),
        sa.PrimaryKeyConstraint("factory_id", "channel", "view", "role", "version"),
    )
    op.create_table(
        "online_keys",
        sa.Column("id", sa.Integer(), nullable=False),
        factory_id(),
        string("role", 16),
        string("keyid", 128),
        sa.Column("public", sa.Text(), nullable=False),
        sa.Column("private_encrypted", sa.LargeBinary(), nullable=False),
        created_at(),
        moment("retired_at", nullable=True),
        factory_ref(),
        sa.PrimaryKeyConstraint("id"),
    )
    _index_factory_id("online_keys")
    op.create_table(
        "tokens",
        string("id", 32),
        factory_id(nullable=True),
        sha256("secret_sha256"),
        string("scopes", 200),
        string("description", 200),
        created_at(),
        moment("expires_at", nullable=True),
        moment("revoked_at", nullable=True),
        factory_ref(),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("secret_sha256"),
    )
    _index_factory_id("tokens")


def _index_factory_id(table: str) -> None:
    op.create_index(op.f(f"ix_{table}_factory_id"), table, ["factory_id"], unique=False)


def _drop_with_factory_index(table: str) -> None:
    op.drop_index(op.f(f"ix_{table}_factory_id"), table_name=table)
    op.drop_table(table)


def downgrade() -> None:
    op.drop_table("server_facts")
    _drop_with_factory_index("tokens")
    _drop_with_factory_index("online_keys")
    op.drop_table("metadata_files")
    op.drop_table("key_archives")
    _drop_with_factory_index("devices")
    op.drop_table("channels")
    op.drop_table("factories")
