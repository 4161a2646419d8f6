"""metadata generation per statement: on PostgreSQL, one bump of a factory's counter per
statement that changes its metadata files, not one per row

Revision ID: 0011
Revises: 0010

Migration 0010's row triggers bump `factories.metadata_generation` once for every
metadata file added, changed or removed. On PostgreSQL each bump writes a new version
of the factory's row, and within one transaction the versions it wrote cannot be
pruned: each further bump walks them all, so a transaction storing many files (a key
rotation re-signs every live CI view: 30,000 files for 10,000 views) costs the square
of their number. Measured on 2 cores, inserting 3,000 / 10,000 / 30,000 metadata rows
in one statement: 0.21 / 1.4 / 11.3 s with the row trigger, 0.07 / 0.20 / 0.65 s with
the statement trigger below, 0.06 / 0.20 / 0.58 s with none.

Here each statement bumps the counter of every factory whose files it changed, once,
at its end and in its transaction, from the rows it changed (its transition tables).
The server stores each group of files in one statement (`Repository.store_files`).
What readers rely on is unchanged (ADR 0014): every change to a factory's metadata
files moves its counter before the transaction commits; a statement that changes no
row moves nothing. Only the amount differs, and readers compare for equality.

SQLite has row triggers only; there a bump updates the row in place and costs the
same at every row (measured: 30,000 rows in 130 ms with the trigger, 68 ms without), so SQLite
keeps migration 0010's triggers. The row function `bump_metadata_generation` stays,
for the downgrade.
"""

from alembic import op

revision = "0011"
down_revision = "0010"

# (event, the transition tables it has, the SQL listing the factories it changed)
_EVENTS = [
    ("INSERT", "NEW TABLE AS new_rows", "SELECT factory_id FROM new_rows"),
    (
        "UPDATE",
        "OLD TABLE AS old_rows NEW TABLE AS new_rows",
        "SELECT factory_id FROM old_rows UNION SELECT factory_id FROM new_rows",
    ),
    ("DELETE", "OLD TABLE AS old_rows", "SELECT factory_id FROM old_rows"),
]


def _trigger(event: str) -> str:
    return f"bump_metadata_generation_metadata_files_{event.lower()}"


def upgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        return
    for event, tables, changed in _EVENTS:
        function = f"bump_metadata_generation_per_{event.lower()}"
        op.execute(f"""
            CREATE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                UPDATE factories SET metadata_generation = metadata_generation + 1
                WHERE id IN ({changed});
                RETURN NULL;
            END $$
        """)  # fmt: skip  # noqa: S608 (names from this module, no input)
        op.execute(f"DROP TRIGGER {_trigger(event)} ON metadata_files")
        op.execute(
            f"CREATE TRIGGER {_trigger(event)} AFTER {event} ON metadata_files "
            f"REFERENCING {tables} FOR EACH STATEMENT EXECUTE FUNCTION {function}()"
        )


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        return
    for event, _tables, _changed in _EVENTS:
        op.execute(f"DROP TRIGGER {_trigger(event)} ON metadata_files")
        op.execute(f"DROP FUNCTION bump_metadata_generation_per_{event.lower()}()")
        op.execute(
            f"CREATE TRIGGER {_trigger(event)} AFTER {event} ON metadata_files "
            "FOR EACH ROW EXECUTE FUNCTION bump_metadata_generation()"
        )
