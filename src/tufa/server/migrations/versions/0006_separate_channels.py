"""separate channels: online keys per channel, root key pairs

Revision ID: 0006
Revises: 0005

Factories created before this revision used one set of online keys, and one set of root
keys, for both channels (ADR 0009). Their online key rows are copied to each channel
(same keys, so nothing served changes), and each of their root keys becomes a "pair"
whose two halves are the same key. Their next root update separates the channels.

A root update left open across the upgrade is cancelled (with the online keys it
generated): only an update opened now stages the keys that separate the channels, and
its signatures would not cover them. The owner opens it again.
"""

import json

import sqlalchemy as sa
from alembic import op

from tufa.server.migrations.columns import factory_id, factory_ref, string

revision = "0006"
down_revision = "0005"

_COPIED = ("factory_id", "role", "keyid", "public", "private_encrypted", "created_at")


def _root_keyids(root_json: bytes) -> list[str]:
    keyids: list[str] = json.loads(root_json)["signed"]["roles"]["root"]["keyids"]
    return keyids


def upgrade() -> None:
    conn = op.get_bind()
    conn.execute(sa.text("DELETE FROM online_keys WHERE pending = :yes"), {"yes": True})
    conn.execute(sa.text("DELETE FROM root_updates"))
    with op.batch_alter_table("online_keys") as batch_op:
        batch_op.add_column(sa.Column("channel", sa.String(length=8), nullable=True))
    columns = ", ".join(_COPIED)
    conn.execute(sa.text("UPDATE online_keys SET channel = 'ci'"))
    conn.execute(
        sa.text(
            f"INSERT INTO online_keys ({columns}, retired_at, pending, channel) "  # noqa: S608
            f"SELECT {columns}, retired_at, pending, 'prod' FROM online_keys"
        )
    )
    with op.batch_alter_table("online_keys") as batch_op:
        batch_op.alter_column("channel", existing_type=sa.String(length=8), nullable=False)

    pairs = op.create_table(
        "root_key_pairs",
        factory_id(),
        string("ci_keyid", 128),
        string("prod_keyid", 128),
        factory_ref(),
        sa.PrimaryKeyConstraint("factory_id", "ci_keyid"),
    )
    newest_ci_roots = conn.execute(
        sa.text(
            "SELECT m.factory_id, m.body FROM metadata_files m WHERE m.channel = 'ci' "
            "AND m.role = 'root' AND m.version = (SELECT MAX(n.version) FROM metadata_files n "
            "WHERE n.factory_id = m.factory_id AND n.channel = 'ci' AND n.role = 'root')"
        )
    ).all()
    rows = [
        {"factory_id": factory_id, "ci_keyid": keyid, "prod_keyid": keyid}
        for factory_id, body in newest_ci_roots
        for keyid in _root_keyids(body)
    ]
    if rows:
        op.bulk_insert(pairs, rows)

    with op.batch_alter_table("root_updates") as batch_op:
        batch_op.add_column(
            sa.Column("root_key_pairs", sa.Text(), nullable=False, server_default="[]")
        )


def downgrade() -> None:
    conn = op.get_bind()
    separated = conn.execute(
        sa.text("SELECT COUNT(*) FROM root_key_pairs WHERE ci_keyid != prod_keyid")
    ).scalar_one()
    if separated:
        # Revision 0005 has one set of online keys for both channels; these factories'
        # production roots list keys of their own, which it would lose.
        raise RuntimeError(
            f"{separated} root key(s) have separate channel halves: the factories created or "
            "updated since revision 0006 cannot be served by an older tufa"
        )
    with op.batch_alter_table("root_updates") as batch_op:
        batch_op.drop_column("root_key_pairs")
    op.drop_table("root_key_pairs")
    op.execute("DELETE FROM online_keys WHERE channel = 'prod'")
    with op.batch_alter_table("online_keys") as batch_op:
        batch_op.drop_column("channel")
