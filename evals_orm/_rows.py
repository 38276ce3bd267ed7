"""Row <-> domain mappers of ``studies`` and ``checkpoints``, shared by reads and writes."""

from __future__ import annotations

from datetime import datetime
from typing import Any
from uuid import UUID

import attrs
import sqlalchemy as sa

from evals_orm.domain import (
    Checkpoint,
    PeriodType,
    Study,
    StudyConfig,
    StudyStatus,
    unchecked_constructor,
)
from evals_orm.models import CheckpointRow, StudyRow

__all__ = [
    "CHECKPOINT_COLUMNS",
    "STUDY_COLUMNS",
    "STUDY_STATE_COLUMNS",
    "StudyState",
    "checkpoint_from_row",
    "checkpoint_values",
    "study_from_row",
]

STUDY_COLUMNS = tuple(getattr(StudyRow, field.name) for field in attrs.fields(Study))
CHECKPOINT_COLUMNS = tuple(getattr(CheckpointRow, field.name) for field in attrs.fields(Checkpoint))


# Rows of the package's tables hold values that were valid when written.
_study = unchecked_constructor(Study)
_checkpoint = unchecked_constructor(Checkpoint)


def study_from_row(row: sa.Row[Any]) -> Study:
    """Build a ``Study`` from a row of ``STUDY_COLUMNS``."""
    return _study(*row)


def checkpoint_from_row(row: sa.Row[Any]) -> Checkpoint:
    """Build a ``Checkpoint`` from a row of ``CHECKPOINT_COLUMNS``."""
    return _checkpoint(*row)


def checkpoint_values(checkpoint: Checkpoint) -> dict[str, Any]:
    """Return the ``checkpoints`` row of ``checkpoint``."""
    # Spelled out: attrs.asdict looks the fields up again for every row.
    return {
        "id": checkpoint.id,
        "study_id": checkpoint.study_id,
        "timestamp": checkpoint.timestamp,
        "metrics": checkpoint.metrics,
        "events_analyzed": checkpoint.events_analyzed,
        "sessions_included": checkpoint.sessions_included,
    }


@attrs.define
class StudyState:
    """A study's ``studies`` row while the projection folds events over it."""

    id: UUID
    name: str
    status: StudyStatus
    period_type: PeriodType
    period_value: int | None
    config: StudyConfig
    created_at: datetime
    started_at: datetime | None
    stopped_at: datetime | None
    last_event_id: UUID

    @classmethod
    def from_row(cls, row: sa.Row[Any]) -> StudyState:
        """Build the state from a row of ``STUDY_STATE_COLUMNS``."""
        return cls(
            id=row.id,
            name=row.name,
            status=row.status,
            period_type=row.period_type,
            period_value=row.period_value,
            config=row.config,
            created_at=row.created_at,
            started_at=row.started_at,
            stopped_at=row.stopped_at,
            last_event_id=row.last_event_id,
        )

    def values(self) -> dict[str, Any]:
        """Return the ``studies`` row of this state."""
        return attrs.asdict(self, recurse=False)


STUDY_STATE_COLUMNS = tuple(getattr(StudyRow, field.name) for field in attrs.fields(StudyState))
