"""poll generations: per-factory counters that tell a server its poll cache is stale

Revision ID: 0010
Revises: 0009

Each server process keeps who holds a credential and each view's newest timestamp in
memory (ADR 0014). Two counters on `factories` say when that memory is stale; triggers
bump them in the very transaction of every change, whoever writes it:

* `auth_generation`: a device's credentials, revocation, channel or view change, a
  device is deleted, a token changes or is deleted, a credential is retired, or the
  factory's name or anonymous reads change;
* `metadata_generation`: a metadata file is added, changed or removed.

Device reports (which update other columns of `devices`) bump nothing.
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"

# The columns of `devices` whose change alters who a credential is, or what it reads.
_DEVICE_COLUMNS = "secret_sha256, pending_secret_sha256, revoked_at, view, channel, factory_id"
# (table, counter, events) that bump a counter of the row's factory.
_BUMPS = [
    ("devices", "auth_generation", "UPDATE", f"UPDATE OF {_DEVICE_COLUMNS}"),
    ("devices", "auth_generation", "DELETE", "DELETE"),
    ("tokens", "auth_generation", "UPDATE", "UPDATE"),
    ("tokens", "auth_generation", "DELETE", "DELETE"),
    ("retired_credentials", "auth_generation", "INSERT", "INSERT"),
    ("metadata_files", "metadata_generation", "INSERT", "INSERT"),
    ("metadata_files", "metadata_generation", "UPDATE", "UPDATE"),
    ("metadata_files", "metadata_generation", "DELETE", "DELETE"),
]


def _sqlite_triggers() -> None:
    for table, counter, kind, event in _BUMPS:
        rows = {"INSERT": "NEW.factory_id", "DELETE": "OLD.factory_id"}.get(
            kind, "OLD.factory_id, NEW.factory_id"
        )
        bump = f"UPDATE factories SET {counter} = {counter} + 1 WHERE id IN ({rows})"  # noqa: S608
        op.execute(
            f"CREATE TRIGGER bump_{counter}_{table}_{kind.lower()} AFTER {event} ON {table} "
            f"BEGIN {bump}; END"
        )
    # Only `name` and `anonymous_read` listed: the bump itself does not fire it again.
    op.execute(
        "CREATE TRIGGER bump_auth_generation_factories AFTER UPDATE OF name, anonymous_read "
        "ON factories BEGIN UPDATE factories SET auth_generation = auth_generation + 1 "
        "WHERE id = NEW.id; END"
    )


def _postgresql_triggers() -> None:
    for counter in ("auth_generation", "metadata_generation"):
        op.execute(f"""
            CREATE FUNCTION bump_{counter}() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                IF TG_OP <> 'INSERT' THEN
                    UPDATE factories SET {counter} = {counter} + 1 WHERE id = OLD.factory_id;
                END IF;
                IF TG_OP = 'INSERT'
                        OR (TG_OP = 'UPDATE' AND NEW.factory_id IS DISTINCT FROM OLD.factory_id)
                THEN
                    UPDATE factories SET {counter} = {counter} + 1 WHERE id = NEW.factory_id;
                END IF;
                RETURN NULL;
            END $$
        """)  # fmt: skip  # noqa: S608 (names from this module, no input)
    for table, counter, kind, event in _BUMPS:
        op.execute(
            f"CREATE TRIGGER bump_{counter}_{table}_{kind.lower()} AFTER {event} ON {table} "
            f"FOR EACH ROW EXECUTE FUNCTION bump_{counter}()"
        )
    op.execute("""
        CREATE FUNCTION bump_auth_generation_of_factory() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            NEW.auth_generation := OLD.auth_generation + 1;
            RETURN NEW;
        END $$
    """)  # fmt: skip
    op.execute(
        "CREATE TRIGGER bump_auth_generation_factories BEFORE UPDATE ON factories FOR EACH ROW "
        "WHEN (OLD.name IS DISTINCT FROM NEW.name "
        "OR OLD.anonymous_read IS DISTINCT FROM NEW.anonymous_read) "
        "EXECUTE FUNCTION bump_auth_generation_of_factory()"
    )


def upgrade() -> None:
    with op.batch_alter_table("factories") as batch_op:
        for counter in ("auth_generation", "metadata_generation"):
            batch_op.add_column(
                sa.Column(counter, sa.BigInteger(), nullable=False, server_default="0")
            )
    if op.get_bind().dialect.name == "sqlite":
        _sqlite_triggers()
    else:
        _postgresql_triggers()


def downgrade() -> None:
    for table, counter, kind, _event in _BUMPS:
        op.execute(f"DROP TRIGGER bump_{counter}_{table}_{kind.lower()}" + _on(table))
    op.execute("DROP TRIGGER bump_auth_generation_factories" + _on("factories"))
    if op.get_bind().dialect.name != "sqlite":
        for function in ("auth_generation", "metadata_generation", "auth_generation_of_factory"):
            op.execute(f"DROP FUNCTION bump_{function}()")
    with op.batch_alter_table("factories") as batch_op:
        batch_op.drop_column("metadata_generation")
        batch_op.drop_column("auth_generation")


def _on(table: str) -> str:
    return "" if op.get_bind().dialect.name == "sqlite" else f" ON {table}"
