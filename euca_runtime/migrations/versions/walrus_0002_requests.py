"""walrus: requests that deleted something, so a retry after a failover gets the same answer.

Revision ID: walrus_0002
Revises: walrus_0001
Create Date: 2026-11-25
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "walrus_0002"
down_revision: str | Sequence[str] | None = "walrus_0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Create walrus_request."""
    op.create_table(
        "walrus_request",
        sa.Column("request_id", sa.String(160), primary_key=True),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("created_ts", sa.Float(), nullable=False),
    )


def downgrade() -> None:
    """Drop walrus_request."""
    op.drop_table("walrus_request")
