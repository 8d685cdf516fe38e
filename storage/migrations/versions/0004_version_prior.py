"""Each model version's prior: what a user the model knows nothing of is served.

`model_versions.prior_vector` (real[], nullable) holds the vector the version's model
gives a user with no history, no search and no profile (for the learned default, an
interest part of zeros and a bias weight of 1: time-decayed popularity). Models without
one (the untrained mean) leave it NULL. `user_top_items` serves it, from the newest
version that has one, to a user without a stored vector, and `istream evaluate` ranks
such a user's events by it, as the backtest does. Before, both gave such users nothing.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import ARRAY

from storage.functions import user_top_items_sql
from storage.vectors import recorded_backend, recorded_dim

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

DROP = "DROP FUNCTION IF EXISTS user_top_items(text, int, boolean)"


def _recreate(prior: bool) -> None:
    conn = op.get_bind()
    op.execute(DROP)
    op.execute(user_top_items_sql(recorded_backend(conn), recorded_dim(conn), prior=prior))


def upgrade() -> None:
    op.add_column("model_versions", sa.Column("prior_vector", ARRAY(sa.REAL), nullable=True))
    _recreate(prior=True)


def downgrade() -> None:
    _recreate(prior=False)
    op.drop_column("model_versions", "prior_vector")
