"""clc: a done request's result, so a retried create answers as its first attempt did.

Revision ID: clc_0005
Revises: clc_0004
Create Date: 2026-11-25
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "clc_0005"
down_revision: str | Sequence[str] | None = "clc_0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Add clc_request.result (nullable: rows of deletes have none)."""
    op.add_column("clc_request", sa.Column("result", sa.Text(), nullable=True))


def downgrade() -> None:
    """Drop clc_request.result."""
    with op.batch_alter_table("clc_request") as batch:
        batch.drop_column("result")
