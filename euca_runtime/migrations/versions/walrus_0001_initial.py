"""walrus: buckets, objects, blobs, multipart uploads and parts.

Revision ID: walrus_0001
Revises:
Create Date: 2026-11-25
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "walrus_0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = ("walrus",)
depends_on: str | Sequence[str] | None = "core_0001"


def upgrade() -> None:
    """Create the walrus tables."""
    op.create_table(
        "buckets",
        sa.Column("name", sa.String(63), primary_key=True),
        sa.Column("owner", sa.String(128), nullable=False),
        sa.Column("created", sa.Float(), nullable=False),
    )
    op.create_table(
        "objects",
        sa.Column("bucket", sa.String(63), primary_key=True),
        sa.Column("key", sa.String(1024), primary_key=True),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("etag", sa.String(64), nullable=False),
        sa.Column("last_modified", sa.Float(), nullable=False),
        sa.Column("content_type", sa.String(255), nullable=True),
        sa.Column("meta", sa.Text(), nullable=False),
        sa.Column("headers", sa.Text(), nullable=False),
        sa.Column("segments", sa.Text(), nullable=False),
    )
    op.create_table(
        "blobs",
        sa.Column("blob_id", sa.String(32), primary_key=True),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("md5", sa.String(32), nullable=False),
        sa.Column("refs", sa.Integer(), nullable=False),
    )
    op.create_table(
        "uploads",
        sa.Column("upload_id", sa.String(64), primary_key=True),
        sa.Column("bucket", sa.String(63), nullable=False),
        sa.Column("key", sa.String(1024), nullable=False),
        sa.Column("initiated", sa.Float(), nullable=False),
        sa.Column("owner", sa.String(128), nullable=False),
        sa.Column("content_type", sa.String(255), nullable=True),
        sa.Column("meta", sa.Text(), nullable=False),
        sa.Column("headers", sa.Text(), nullable=False),
    )
    op.create_index("ix_uploads_bucket", "uploads", ["bucket"])
    op.create_table(
        "parts",
        sa.Column("upload_id", sa.String(64), primary_key=True),
        sa.Column("part_number", sa.Integer(), primary_key=True),
        sa.Column("blob_id", sa.String(32), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("etag", sa.String(64), nullable=False),
        sa.Column("last_modified", sa.Float(), nullable=False),
    )


def downgrade() -> None:
    """Drop the walrus tables."""
    for table in ("parts", "uploads", "blobs", "objects", "buckets"):
        op.drop_table(table)
