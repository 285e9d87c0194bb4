"""Reviewer decisions, replayed onto a job's label file.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    tz = sa.DateTime(timezone=True)
    op.create_table(
        "review_actions",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("recording_id", sa.String(32), sa.ForeignKey("recordings.id"), nullable=False),
        sa.Column("job_id", sa.Integer, sa.ForeignKey("jobs.id"), nullable=False),
        sa.Column("action", sa.JSON, nullable=False),
        sa.Column("actor", sa.String(64), nullable=False),
        sa.Column("at", tz, nullable=False),
        sa.Column("undone_at", tz, nullable=True),
        sa.Column("undone_by", sa.String(64), nullable=True),
    )
    op.create_index("ix_review_actions_job", "review_actions", ["job_id", "id"])


def downgrade() -> None:
    op.drop_table("review_actions")
