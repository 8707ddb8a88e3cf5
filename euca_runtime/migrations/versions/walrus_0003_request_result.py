"""walrus: a done request's result, so a retried create answers as its first attempt did.

Revision ID: walrus_0003
Revises: walrus_0002
Create Date: 2026-11-25
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "walrus_0003"
down_revision: str | Sequence[str] | None = "walrus_0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Add walrus_request.result (nullable: rows of deletes have none)."""
    op.add_column("walrus_request", sa.Column("result", sa.Text(), nullable=True))


def downgrade() -> None:
    """Drop walrus_request.result."""
    with op.batch_alter_table("walrus_request") as batch:
        batch.drop_column("result")
