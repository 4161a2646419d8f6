"""staged rollouts: a wave's plan, and which devices each stage served

Revision ID: 0014
Revises: 0013

`tufa waves rollout NAME --plan 5%,25%,100%` stores its plan in `wave_plans`; the
server's background task advances it stage by stage (rollouts.py), so the plan and
its progress must outlive any one process. `wave_devices` records each device a wave
was served to, with the time and the stage, for the health gate.
"""

import sqlalchemy as sa
from alembic import op

from tufa.server.migrations.columns import (
    created_at,
    device_id,
    device_ref,
    factory_id,
    factory_ref,
    moment,
    string,
)

revision = "0014"
down_revision = "0013"


def upgrade() -> None:
    op.create_table(
        "wave_plans",
        factory_id(),
        string("wave", 64),
        sa.Column("stages", sa.Text(), nullable=False),
        sa.Column("soak_seconds", sa.Integer(), nullable=False),
        sa.Column("max_failure_rate", sa.Float(), nullable=False),
        sa.Column("min_reports", sa.Integer(), nullable=False),
        sa.Column("silence_seconds", sa.Integer(), nullable=False),
        sa.Column("stage", sa.Integer(), nullable=False),
        moment("stage_started_at", nullable=False),
        moment("gate_since", nullable=False),
        string("state", 16),
        sa.Column("halt_reason", sa.Text(), nullable=True),
        moment("halted_at", nullable=True),
        created_at(),
        factory_ref(),
        sa.PrimaryKeyConstraint("factory_id", "wave"),
    )
    op.create_table(
        "wave_devices",
        factory_id(),
        string("wave", 64),
        device_id(),
        sa.Column("stage", sa.Integer(), nullable=True),
        moment("served_at", nullable=False),
        factory_ref(),
        device_ref(),
        sa.PrimaryKeyConstraint("factory_id", "wave", "device_id"),
    )


def downgrade() -> None:
    op.drop_table("wave_devices")
    op.drop_table("wave_plans")
