"""Create the studies/checkpoints projection, the event log and tracking.

Revision ID: evals_orm_0001
Revises:
Create Date: 2026-11-26

Types are spelled out per backend (not imported from evals_orm.types), so
this revision stays what it is whatever the package's types become.

Released as ``0001``; renamed so it cannot collide with a host application's
own revisions. The environment rewrites the old id in the version table.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql, postgresql

revision: str = "evals_orm_0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = ("evals_orm",)
depends_on: str | Sequence[str] | None = None

PG = "postgresql"
# A ``mariadb://`` URL's dialect is named "mariadb"; "mysql" variants miss it.
MY = ("mysql", "mariadb")
# InnoDB, utf8mb4 and byte-wise comparisons on MariaDB/MySQL; each dialect
# reads only the options of its own prefix.
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


def _long_text() -> sa.types.TypeEngine[object]:
    return sa.Text().with_variant(mysql.LONGTEXT(), *MY)


def _json_checks(table: str, *columns: str) -> list[sa.CheckConstraint]:
    """Return MariaDB/MySQL checks that ``columns`` hold JSON (the other backends type it)."""
    if op.get_context().dialect.name not in MY:
        return []
    return [
        sa.CheckConstraint(f"json_valid({column})", name=op.f(f"ck_{table}_{column}_json"))
        for column in columns
    ]


def upgrade() -> None:
    op.create_table(
        "studies",
        sa.Column("id", _uuid(), nullable=False),
        sa.Column("name", _long_text(), nullable=False),
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
        sa.PrimaryKeyConstraint("id", name=op.f("pk_studies")),
        *_json_checks("studies", "config"),
        **MY_TABLE,
    )
    op.create_table(
        "checkpoints",
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
        sa.PrimaryKeyConstraint("id", name=op.f("pk_checkpoints")),
        *_json_checks("checkpoints", "metrics", "sessions_included"),
        **MY_TABLE,
    )
    op.create_index("idx_checkpoints_study_time", "checkpoints", ["study_id", "timestamp"])
    op.create_table(
        "eval_events",
        sa.Column(
            "position",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("event_id", _uuid(), nullable=False),
        sa.Column("study_id", _uuid(), nullable=False),
        sa.Column("payload", _long_text(), nullable=False),
        sa.PrimaryKeyConstraint("position", name=op.f("pk_eval_events")),
        sa.UniqueConstraint("event_id", name=op.f("uq_eval_events_event_id")),
        **MY_TABLE,
    )
    op.create_index("ix_eval_events_study_id_position", "eval_events", ["study_id", "position"])
    op.create_table(
        "eval_tracking",
        # A MySQL key cannot be a TEXT column.
        sa.Column("name", sa.Text().with_variant(sa.String(64), *MY), nullable=False),
        sa.Column("position", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_eval_tracking")),
        **MY_TABLE,
    )


def downgrade() -> None:
    op.drop_table("eval_tracking")
    op.drop_index("ix_eval_events_study_id_position", table_name="eval_events")
    op.drop_table("eval_events")
    op.drop_index("idx_checkpoints_study_time", table_name="checkpoints")
    op.drop_table("checkpoints")
    op.drop_table("studies")
