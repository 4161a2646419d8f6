"""secondary indexes of targets and ci_view_targets led by their own column, not by the
factory

Revision ID: 0012
Revises: 0011

`ix_targets_factory_id_version` (factory_id, version) and
`ix_ci_view_targets_factory_id_name` (factory_id, name) each matched a condition on the
factory alone, as the primary keys do. Without statistics on a table (a bulk load
outruns autovacuum's analysis; CI databases run without autovacuum), PostgreSQL takes
the table for a few rows and a lookup by (factory_id, view) or (factory_id, name) to
cost the same through either index; psycopg prepares a statement after five runs, and
the generic plan then kept, made on a small table, took the secondary index with the
factory as its only condition. A publish then read every row of the factory to find
its batch's views: measured in a bulk load in batches of 1,000, buffers read by that
lookup rose from 3,050 to 10,140 between 18,000 and 29,000 targets, 210 more a batch.

Led by `version` and `name`, neither index matches the factory alone, and lookups by
(factory_id, view) and (factory_id, name) have only their primary keys; lookups by
version or by name use these indexes as before, with the factory as second column.
"""

from alembic import op

revision = "0012"
down_revision = "0011"

# (table, old name, old columns, new name, new columns)
_INDEXES = [
    (
        "targets",
        "ix_targets_factory_id_version",
        ["factory_id", "version"],
        "ix_targets_version_factory_id",
        ["version", "factory_id"],
    ),
    (
        "ci_view_targets",
        "ix_ci_view_targets_factory_id_name",
        ["factory_id", "name"],
        "ix_ci_view_targets_name_factory_id",
        ["name", "factory_id"],
    ),
]


def upgrade() -> None:
    for table, old, _old_columns, new, columns in _INDEXES:
        op.create_index(new, table, columns)
        op.drop_index(old, table_name=table)


def downgrade() -> None:
    for table, old, old_columns, new, _columns in _INDEXES:
        op.create_index(old, table, old_columns)
        op.drop_index(new, table_name=table)
