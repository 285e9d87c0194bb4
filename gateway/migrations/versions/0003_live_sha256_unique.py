"""One live recording per content (a partial unique index on sha256), so racing uploads cannot both be stored.

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

LIVE = sa.text("status != 'deleted'")


def upgrade() -> None:
    twins = (
        op.get_bind()
        .execute(
            sa.text(
                "SELECT sha256, COUNT(*) FROM recordings WHERE status != 'deleted' GROUP BY sha256 HAVING COUNT(*) > 1"
            )
        )
        .all()
    )
    if twins:
        listed = ", ".join(f"{sha[:12]}... ({n} recordings)" for sha, n in twins[:5])
        raise RuntimeError(
            f"migration 0003: expected at most one live recording per sha256, got {len(twins)} duplicated: {listed}. "
            "Delete the extra copies (DELETE /recordings/ID) with the previous version, then migrate again."
        )
    op.create_index(
        "ux_recordings_live_sha256", "recordings", ["sha256"], unique=True, sqlite_where=LIVE, postgresql_where=LIVE
    )


def downgrade() -> None:
    op.drop_index("ux_recordings_live_sha256", table_name="recordings")
