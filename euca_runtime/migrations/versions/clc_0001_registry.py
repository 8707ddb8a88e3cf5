"""clc: the service registry (the first table of the clc component).

Revision ID: clc_0001
Revises:
Create Date: 2026-11-25
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "clc_0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = ("clc",)
depends_on: str | Sequence[str] | None = "core_0001"


def upgrade() -> None:
    """Create the registry table."""
    op.create_table(
        "registry",
        sa.Column("name", sa.String(200), primary_key=True),
        sa.Column("type", sa.String(32), nullable=False),
        sa.Column("partition", sa.String(64), nullable=True),
        sa.Column("node", sa.String(64), nullable=False),
        sa.Column("host", sa.String(255), nullable=True),
        sa.Column("registered", sa.Boolean(), nullable=False),
        sa.Column("updated_ts", sa.Float(), nullable=False),
    )


def downgrade() -> None:
    """Drop the registry table."""
    op.drop_table("registry")
