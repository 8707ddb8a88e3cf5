"""sc: volumes and snapshots of one cluster's storage controller.

Revision ID: sc_0001
Revises:
Create Date: 2026-11-26
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "sc_0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = ("sc",)
depends_on: str | Sequence[str] | None = "core_0001"


def upgrade() -> None:
    """Create sc_volume and sc_snapshot."""
    op.create_table(
        "sc_volume",
        sa.Column("volume_id", sa.String(32), primary_key=True),
        sa.Column("size_gib", sa.Integer(), nullable=False),
        sa.Column("snapshot_id", sa.String(32), nullable=True),
        sa.Column("create_time", sa.Float(), nullable=False),
        sa.Column("attach_instance", sa.String(32), nullable=True),
        sa.Column("attach_device", sa.String(64), nullable=True),
        sa.Column("attach_status", sa.String(16), nullable=True),
        sa.Column("attach_time", sa.Float(), nullable=True),
    )
    op.create_table(
        "sc_snapshot",
        sa.Column("snapshot_id", sa.String(32), primary_key=True),
        sa.Column("volume_id", sa.String(32), nullable=False),
        sa.Column("size_gib", sa.Integer(), nullable=False),
        sa.Column("start_time", sa.Float(), nullable=False),
    )


def downgrade() -> None:
    """Drop the sc tables."""
    op.drop_table("sc_snapshot")
    op.drop_table("sc_volume")
