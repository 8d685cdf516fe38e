"""Weights that build on another version's: `model_versions.weights_base`.

A fine-tuned model with co-occurrence factors carries all its pair counts only in every few
versions' weights (a checkpoint); the versions between carry the pairs added since and name
the checkpoint's version here. A worker restoring such weights loads that version's too, and
retention keeps the weights of every version a kept version names.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("model_versions", sa.Column("weights_base", sa.String(200), nullable=True))


def downgrade() -> None:
    op.drop_column("model_versions", "weights_base")
