"""SHA-256 of each published weights blob, checked before a worker loads it.

`model_versions.weights_sha256` (64 hex characters) is written with the blob at
publish and compared with the blob's digest when a worker adopts a version. Rows
published before this revision have none. Those blobs were pickles (`torch.save`),
which no worker loads any longer, so the column is not back-filled: such a row is
refused like any other unreadable blob, and the trainer publishes a fresh version.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("model_versions", sa.Column("weights_sha256", sa.String(64), nullable=True))


def downgrade() -> None:
    op.drop_column("model_versions", "weights_sha256")
