"""kv: the kv component's table.

Revision ID: kv_0001
Revises:
Create Date: 2025-01-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "kv_0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = ("kv",)
depends_on: str | Sequence[str] | None = "core_0001"


def upgrade() -> None:
    """Create the kv table."""
    op.create_table(
        "kv",
        sa.Column("key", sa.String(1024), primary_key=True),
        sa.Column("value", sa.LargeBinary(), nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
    )


def downgrade() -> None:
    """Drop the kv table."""
    op.drop_table("kv")
