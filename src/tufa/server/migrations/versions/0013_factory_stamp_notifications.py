"""factory stamp notifications: on PostgreSQL, every change of a factory's row tells
the servers listening, by its name

Revision ID: 0013
Revises: 0012

A server started with `--poll-invalidation notify` keeps each factory's stamp (its id,
anonymous-read flag and two generations, ADR 0014) in memory and forgets it when told
it changed, instead of reading it for every batch of polls. The telling is this
trigger: a notification on the channel `tufa_factory_stamps` whose payload is the
factory's name, sent when the transaction that changed the row commits (PostgreSQL
folds a transaction's identical notifications into one). Every change of a credential,
a token or metadata moves a generation on that row (migrations 0009 to 0011), so it
notifies too; a new factory notifies, for a server that remembered it absent, and a
renamed one under both names.

SQLite has no notifications; there the server reads the wal-index (ADR 0014).
"""

from alembic import op

revision = "0013"
down_revision = "0012"


def upgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        return
    op.execute("""
        CREATE FUNCTION notify_factory_stamp() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF TG_OP <> 'INSERT' THEN
                PERFORM pg_notify('tufa_factory_stamps', OLD.name);
            END IF;
            IF TG_OP <> 'DELETE' AND (TG_OP = 'INSERT' OR NEW.name <> OLD.name) THEN
                PERFORM pg_notify('tufa_factory_stamps', NEW.name);
            END IF;
            RETURN NULL;
        END $$
    """)  # fmt: skip
    op.execute(
        "CREATE TRIGGER notify_factory_stamp AFTER INSERT OR UPDATE OR DELETE ON factories "
        "FOR EACH ROW EXECUTE FUNCTION notify_factory_stamp()"
    )


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        return
    op.execute("DROP TRIGGER notify_factory_stamp ON factories")
    op.execute("DROP FUNCTION notify_factory_stamp()")
