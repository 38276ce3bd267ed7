"""Add the tables a rebuild replays into before it replaces the projection.

Revision ID: evals_orm_0002
Revises: evals_orm_0001
Create Date: 2026-12-05

``eval_rebuild_studies`` and ``eval_rebuild_checkpoints`` have the columns
of ``studies`` and ``checkpoints``; a rebuild fills them in short
transactions, outside the projection's lock, and then changes only what
differs in the live tables, in one short transaction.

Types are spelled out per backend, as in ``evals_orm_0001``.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql, postgresql

revision: str = "evals_orm_0002"
down_revision: str | Sequence[str] | None = "evals_orm_0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

PG = "postgresql"
MY = ("mysql", "mariadb")
MY_TABLE = {
    f"{prefix}_{option}": value
    for prefix in MY
    for option, value in (("engine", "InnoDB"), ("charset", "utf8mb4"), ("collate", "utf8mb4_bin"))
}


def _uuid() -> sa.types.TypeEngine[object]:
    return (
        sa.Text()
        .with_variant(postgresql.UUID(as_uuid=True), PG)
        .with_variant(mysql.BINARY(16), *MY)
    )


def _timestamp() -> sa.types.TypeEngine[object]:
    return (
        sa.Text()
        .with_variant(postgresql.TIMESTAMP(timezone=True), PG)
        .with_variant(mysql.DATETIME(fsp=6), *MY)
    )


def _json() -> sa.types.TypeEngine[object]:
    return sa.Text().with_variant(postgresql.JSONB(), PG).with_variant(mysql.LONGTEXT(), *MY)


def upgrade() -> None:
    op.create_table(
        "eval_rebuild_studies",
        sa.Column("id", _uuid(), nullable=False),
        sa.Column("name", sa.Text().with_variant(mysql.LONGTEXT(), *MY), nullable=False),
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column("period_type", sa.Text(), nullable=False),
        sa.Column(
            "period_value",
            sa.Integer()
            .with_variant(sa.BigInteger(), PG)
            .with_variant(mysql.INTEGER(unsigned=True), *MY),
            nullable=True,
        ),
        sa.Column("config", _json(), nullable=False),
        sa.Column("created_at", _timestamp(), nullable=False),
        sa.Column("started_at", _timestamp(), nullable=True),
        sa.Column("stopped_at", _timestamp(), nullable=True),
        sa.Column("last_event_id", _uuid(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_eval_rebuild_studies")),
        **MY_TABLE,
    )
    op.create_table(
        "eval_rebuild_checkpoints",
        sa.Column("id", _uuid(), nullable=False),
        sa.Column("study_id", _uuid(), nullable=False),
        sa.Column("timestamp", _timestamp(), nullable=False),
        sa.Column("metrics", _json(), nullable=False),
        sa.Column(
            "events_analyzed",
            sa.Integer()
            .with_variant(sa.Numeric(20, 0), PG)
            .with_variant(mysql.BIGINT(unsigned=True), *MY),
            nullable=False,
        ),
        sa.Column("sessions_included", _json(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_eval_rebuild_checkpoints")),
        **MY_TABLE,
    )


def downgrade() -> None:
    op.drop_table("eval_rebuild_checkpoints")
    op.drop_table("eval_rebuild_studies")
