"""clc: EC2 records (images, reservations, instances, volume and snapshot owner records).

Revision ID: clc_0003
Revises: clc_0002
Create Date: 2026-11-26
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "clc_0003"
down_revision: str | Sequence[str] | None = "clc_0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Create ec2_image, ec2_reservation, ec2_instance, ec2_volume and ec2_snapshot."""
    op.create_table(
        "ec2_image",
        sa.Column("image_id", sa.String(32), primary_key=True),
        sa.Column("account", sa.String(64), nullable=False),
        sa.Column("owner_id", sa.String(12), nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("description", sa.String(255), nullable=True),
        sa.Column("location", sa.String(255), nullable=True),
        sa.Column("architecture", sa.String(16), nullable=False),
        sa.Column("is_public", sa.Boolean(), nullable=False),
        sa.Column("created_ts", sa.Float(), nullable=False),
        sa.Column("request_id", sa.String(160), nullable=True),
    )
    op.create_table(
        "ec2_reservation",
        sa.Column("reservation_id", sa.String(32), primary_key=True),
        sa.Column("account", sa.String(64), nullable=False),
        sa.Column("owner_id", sa.String(12), nullable=False),
        sa.Column("zone", sa.String(64), nullable=False),
        sa.Column("created_ts", sa.Float(), nullable=False),
        sa.Column("request_id", sa.String(160), nullable=True),
    )
    op.create_table(
        "ec2_instance",
        sa.Column("instance_id", sa.String(32), primary_key=True),
        sa.Column("reservation_id", sa.String(32), nullable=False),
        sa.Column("account", sa.String(64), nullable=False),
        sa.Column("image_id", sa.String(32), nullable=False),
        sa.Column("instance_type", sa.String(32), nullable=False),
        sa.Column("zone", sa.String(64), nullable=False),
        sa.Column("launch_index", sa.Integer(), nullable=False),
        sa.Column("launch_ts", sa.Float(), nullable=False),
        sa.Column("phase", sa.String(16), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("node", sa.String(64), nullable=True),
        sa.Column("client_token", sa.String(64), nullable=True),
        sa.Column("reason", sa.String(255), nullable=True),
        sa.Column("terminated_ts", sa.Float(), nullable=True),
    )
    op.create_table(
        "ec2_volume",
        sa.Column("volume_id", sa.String(32), primary_key=True),
        sa.Column("account", sa.String(64), nullable=False),
        sa.Column("owner_id", sa.String(12), nullable=False),
        sa.Column("zone", sa.String(64), nullable=False),
        sa.Column("size_gib", sa.Integer(), nullable=False),
        sa.Column("snapshot_id", sa.String(32), nullable=True),
        sa.Column("created_ts", sa.Float(), nullable=False),
        sa.Column("phase", sa.String(16), nullable=False),
        sa.Column("request_id", sa.String(160), nullable=True),
    )
    op.create_table(
        "ec2_snapshot",
        sa.Column("snapshot_id", sa.String(32), primary_key=True),
        sa.Column("account", sa.String(64), nullable=False),
        sa.Column("owner_id", sa.String(12), nullable=False),
        sa.Column("volume_id", sa.String(32), nullable=False),
        sa.Column("zone", sa.String(64), nullable=False),
        sa.Column("size_gib", sa.Integer(), nullable=False),
        sa.Column("description", sa.String(255), nullable=True),
        sa.Column("created_ts", sa.Float(), nullable=False),
        sa.Column("phase", sa.String(16), nullable=False),
        sa.Column("request_id", sa.String(160), nullable=True),
    )


def downgrade() -> None:
    """Drop the EC2 tables."""
    for name in ("ec2_snapshot", "ec2_volume", "ec2_instance", "ec2_reservation", "ec2_image"):
        op.drop_table(name)
