"""core: fence, changelog, voter_promise, service_state.

Revision ID: core_0001
Revises:
Create Date: 2025-01-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "core_0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = ("core",)
depends_on: str | Sequence[str] | None = None

_seq = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    """Create the store's own tables."""
    op.create_table(
        "fence",
        sa.Column("group_name", sa.String(200), primary_key=True),
        sa.Column("epoch", sa.BigInteger(), nullable=False),
        sa.Column("applied_epoch", sa.BigInteger(), nullable=False),
        sa.Column("applied_seq", sa.BigInteger(), nullable=False),
        sa.Column("base_epoch", sa.BigInteger(), nullable=False),
        sa.Column("base_seq", sa.BigInteger(), nullable=False),
        sa.Column("updated_ts", sa.Float(), nullable=False),
    )
    op.create_table(
        "changelog",
        sa.Column("seq", _seq, primary_key=True, autoincrement=False),
        sa.Column("epoch", sa.BigInteger(), nullable=False),
        sa.Column("ops", sa.LargeBinary(), nullable=False),
        sa.Column("undo", sa.LargeBinary(), nullable=False),
        sa.Column("ts", sa.Float(), nullable=False),
    )
    op.create_table(
        "voter_promise",
        sa.Column("group_name", sa.String(200), primary_key=True),
        sa.Column("promise", sa.Text(), nullable=False),
        sa.Column("updated_ts", sa.Float(), nullable=False),
    )
    op.create_table(
        "service_state",
        sa.Column("service", sa.String(200), primary_key=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("updated_ts", sa.Float(), nullable=False),
    )


def downgrade() -> None:
    """Drop the store's own tables."""
    for name in ("service_state", "voter_promise", "changelog", "fence"):
        op.drop_table(name)
