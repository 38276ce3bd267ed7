"""Declarative models of the read projection and the event log.

``studies``, ``checkpoints`` and ``idx_checkpoints_study_time`` mirror the
original service's schema; the tables the package adds are prefixed ``eval_``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any
from uuid import UUID

import sqlalchemy as sa
from sqlalchemy.dialects import mysql
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from evals_orm.domain import LongitudinalMetrics, PeriodType, StudyConfig, StudyStatus
from evals_orm.types import (
    GUID,
    MYSQL_DIALECTS,
    EnumText,
    UInt32,
    UInt64,
    UTCDateTime,
    WireJSON,
)

__all__ = [
    "NAMING_CONVENTION",
    "Base",
    "CheckpointRow",
    "EventRow",
    "RebuildCheckpointRow",
    "RebuildStudyRow",
    "StudyRow",
    "TrackingRow",
    "metadata",
]

NAMING_CONVENTION: dict[str, str] = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = sa.MetaData(naming_convention=NAMING_CONVENTION)

# MariaDB/MySQL tables: InnoDB (row locks, MVCC, crash safety), utf8mb4 so
# every Unicode string round-trips, and a binary collation so text compares
# as on the other backends. The "mariadb" dialect reads only its own prefix.
_MYSQL_TABLE: dict[str, str] = {
    f"{prefix}_{option}": value
    for prefix in MYSQL_DIALECTS
    for option, value in (("engine", "InnoDB"), ("charset", "utf8mb4"), ("collate", "utf8mb4_bin"))
}


class Base(DeclarativeBase):
    """Declarative base of evals_orm's tables, on the package's own ``metadata``."""

    metadata = metadata
    type_annotation_map: dict[Any, Any] = {  # noqa: RUF012 - SQLAlchemy reads it as a class attribute
        # MySQL's TEXT holds 64 KiB; the other backends' text has no such limit.
        str: sa.Text().with_variant(mysql.LONGTEXT(), *MYSQL_DIALECTS),
        int: sa.Integer(),
        UUID: GUID(),
        datetime: UTCDateTime(),
    }


class _StudyColumns:
    """The columns of ``studies`` (and of the rebuild's copy of it)."""

    id: Mapped[UUID] = mapped_column(primary_key=True)
    name: Mapped[str]
    status: Mapped[StudyStatus] = mapped_column(EnumText(StudyStatus))
    period_type: Mapped[PeriodType] = mapped_column(EnumText(PeriodType))
    period_value: Mapped[int | None] = mapped_column(UInt32())
    config: Mapped[StudyConfig] = mapped_column(WireJSON(StudyConfig))
    created_at: Mapped[datetime]
    started_at: Mapped[datetime | None]
    stopped_at: Mapped[datetime | None]
    # The newest event applied to this study: the exactly-once record, written
    # in the same statement as the state it produced.
    last_event_id: Mapped[UUID]


class _CheckpointColumns:
    """The columns of ``checkpoints`` (and of the rebuild's copy of it)."""

    id: Mapped[UUID] = mapped_column(primary_key=True)
    study_id: Mapped[UUID]
    timestamp: Mapped[datetime]
    metrics: Mapped[LongitudinalMetrics] = mapped_column(WireJSON(LongitudinalMetrics))
    events_analyzed: Mapped[int] = mapped_column(UInt64())
    sessions_included: Mapped[tuple[str, ...]] = mapped_column(WireJSON(tuple[str, ...]))


class StudyRow(_StudyColumns, Base):
    """One row per study: its current state as the event stream left it."""

    __tablename__ = "studies"
    __table_args__ = _MYSQL_TABLE


class CheckpointRow(_CheckpointColumns, Base):
    """One row per recorded checkpoint."""

    __tablename__ = "checkpoints"
    __table_args__ = (
        sa.Index("idx_checkpoints_study_time", "study_id", "timestamp"),
        _MYSQL_TABLE,
    )


class RebuildStudyRow(_StudyColumns, Base):
    """``studies`` as a rebuild replays it, before it replaces the live rows."""

    __tablename__ = "eval_rebuild_studies"
    __table_args__ = _MYSQL_TABLE


class RebuildCheckpointRow(_CheckpointColumns, Base):
    """``checkpoints`` as a rebuild replays it, before it replaces the live rows."""

    __tablename__ = "eval_rebuild_checkpoints"
    __table_args__ = _MYSQL_TABLE


class EventRow(Base):
    """The append-only event log: one row per event, in commit order."""

    __tablename__ = "eval_events"

    position: Mapped[int] = mapped_column(
        sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
        primary_key=True,
        autoincrement=True,
    )
    event_id: Mapped[UUID] = mapped_column(unique=True)
    study_id: Mapped[UUID]
    payload: Mapped[str]

    __table_args__ = (
        sa.Index("ix_eval_events_study_id_position", "study_id", "position"),
        _MYSQL_TABLE,
    )


class TrackingRow(Base):
    """Named positions; locking a row serialises the writers it names."""

    __tablename__ = "eval_tracking"

    # A MySQL key cannot be a TEXT column.
    name: Mapped[str] = mapped_column(
        sa.Text().with_variant(sa.String(64), *MYSQL_DIALECTS), primary_key=True
    )
    position: Mapped[int] = mapped_column(sa.BigInteger(), default=0)

    __table_args__ = _MYSQL_TABLE
