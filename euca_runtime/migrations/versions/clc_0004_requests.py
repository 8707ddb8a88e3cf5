"""clc: requests that deleted something, so a retry after a failover gets the same answer.

Revision ID: clc_0004
Revises: clc_0003
Create Date: 2026-11-25
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "clc_0004"
down_revision: str | Sequence[str] | None = "clc_0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Create clc_request."""
    op.create_table(
        "clc_request",
        sa.Column("request_id", sa.String(160), primary_key=True),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("created_ts", sa.Float(), nullable=False),
    )


def downgrade() -> None:
    """Drop clc_request."""
    op.drop_table("clc_request")
