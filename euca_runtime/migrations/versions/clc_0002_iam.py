"""clc: identity tables (accounts, users, access keys with encrypted secrets).

Revision ID: clc_0002
Revises: clc_0001
Create Date: 2026-11-25
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "clc_0002"
down_revision: str | Sequence[str] | None = "clc_0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Create iam_account, iam_user and iam_access_key."""
    op.create_table(
        "iam_account",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("account_id", sa.String(12), nullable=False, unique=True),
        sa.Column("created_ts", sa.Float(), nullable=False),
    )
    op.create_table(
        "iam_user",
        sa.Column("account", sa.String(64), primary_key=True),
        sa.Column("name_key", sa.String(64), primary_key=True),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("user_id", sa.String(32), nullable=False),
        sa.Column("path", sa.String(512), nullable=False),
        sa.Column("created_ts", sa.Float(), nullable=False),
        sa.Column("request_id", sa.String(64), nullable=True),
    )
    op.create_table(
        "iam_access_key",
        sa.Column("access_key", sa.String(128), primary_key=True),
        sa.Column("account", sa.String(64), nullable=False),
        sa.Column("user_key", sa.String(64), nullable=False),
        sa.Column("secret", sa.LargeBinary(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("created_ts", sa.Float(), nullable=False),
        sa.Column("request_id", sa.String(64), nullable=True),
    )


def downgrade() -> None:
    """Drop the identity tables."""
    for name in ("iam_access_key", "iam_user", "iam_account"):
        op.drop_table(name)
