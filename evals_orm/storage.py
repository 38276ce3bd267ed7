"""The read side: ``EvalStorage`` and its SQL implementation."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, Protocol, runtime_checkable

import sqlalchemy as sa
from typing_extensions import Unpack

from evals_orm import _db
from evals_orm.domain import Checkpoint, Study, StudyId, StudyStatus, ensure_utc
from evals_orm.models import CheckpointRow, StudyRow

__all__ = ["EvalStorage", "SqlEvalStorage"]


@runtime_checkable
class EvalStorage(Protocol):
    """Queries over the studies/checkpoints projection, returning domain objects."""

    def get_study(self, id: StudyId) -> Study | None:
        """Return the study ``id``, or ``None``."""
        ...

    def list_studies(self) -> list[Study]:
        """Return every study, newest ``created_at`` first."""
        ...

    def list_studies_by_status(self, status: StudyStatus) -> list[Study]:
        """Return the studies in ``status``, newest ``created_at`` first."""
        ...

    def get_checkpoints(self, study_id: StudyId) -> list[Checkpoint]:
        """Return the study's checkpoints, oldest ``timestamp`` first."""
        ...

    def get_latest_checkpoint(self, study_id: StudyId) -> Checkpoint | None:
        """Return the study's newest checkpoint, or ``None``."""
        ...

    def get_checkpoints_in_range(
        self, study_id: StudyId, start: datetime, end: datetime
    ) -> list[Checkpoint]:
        """Return the study's checkpoints with ``start <= timestamp < end``, oldest first."""
        ...


_Select = sa.Select[Unpack[tuple[Any, ...]]]

_STUDY_COLUMNS = (
    StudyRow.id,
    StudyRow.name,
    StudyRow.status,
    StudyRow.period_type,
    StudyRow.period_value,
    StudyRow.config,
    StudyRow.created_at,
    StudyRow.started_at,
    StudyRow.stopped_at,
)
CHECKPOINT_COLUMNS = (
    CheckpointRow.id,
    CheckpointRow.study_id,
    CheckpointRow.timestamp,
    CheckpointRow.metrics,
    CheckpointRow.events_analyzed,
    CheckpointRow.sessions_included,
)
_STUDY_ORDER = (StudyRow.created_at.desc(), StudyRow.id.desc())
_CHECKPOINT_ORDER = (CheckpointRow.timestamp.asc(), CheckpointRow.id.asc())


def study_from_row(row: Sequence[object]) -> Study:
    """Build a ``Study`` from a row of ``_STUDY_COLUMNS``."""
    return Study(*row)  # type: ignore[arg-type]


def checkpoint_from_row(row: Sequence[object]) -> Checkpoint:
    """Build a ``Checkpoint`` from a row of ``CHECKPOINT_COLUMNS``."""
    return Checkpoint(*row)  # type: ignore[arg-type]


class SqlEvalStorage:
    """``EvalStorage`` over an Engine or a sessionmaker, on any supported backend."""

    def __init__(self, bind: _db.Bind) -> None:
        self.bind = bind

    def __repr__(self) -> str:
        return f"{type(self).__name__}({_db.engine_of(self.bind)!r})"

    def get_study(self, id: StudyId) -> Study | None:
        """Return the study ``id``, or ``None``."""
        statement = sa.select(*_STUDY_COLUMNS).where(StudyRow.id == id)
        with _db.read(self.bind) as connection:
            row = connection.execute(statement).one_or_none()
        return None if row is None else study_from_row(row)

    def list_studies(self) -> list[Study]:
        """Return every study, newest ``created_at`` first (ties: highest id first)."""
        return self._studies(sa.select(*_STUDY_COLUMNS).order_by(*_STUDY_ORDER))

    def list_studies_by_status(self, status: StudyStatus) -> list[Study]:
        """Return the studies in ``status``, in ``list_studies`` order."""
        status = StudyStatus(status)
        statement = (
            sa.select(*_STUDY_COLUMNS).where(StudyRow.status == status).order_by(*_STUDY_ORDER)
        )
        return self._studies(statement)

    def get_checkpoints(self, study_id: StudyId) -> list[Checkpoint]:
        """Return the study's checkpoints, oldest ``timestamp`` first (ties: lowest id)."""
        return self._checkpoints(self._of_study(study_id).order_by(*_CHECKPOINT_ORDER))

    def get_latest_checkpoint(self, study_id: StudyId) -> Checkpoint | None:
        """Return the last checkpoint in ``get_checkpoints`` order, or ``None``."""
        statement = (
            self._of_study(study_id)
            .order_by(CheckpointRow.timestamp.desc(), CheckpointRow.id.desc())
            .limit(1)
        )
        found = self._checkpoints(statement)
        return found[0] if found else None

    def get_checkpoints_in_range(
        self, study_id: StudyId, start: datetime, end: datetime
    ) -> list[Checkpoint]:
        """Return the study's checkpoints with ``start <= timestamp < end``, oldest first."""
        start = ensure_utc(start, "start")
        end = ensure_utc(end, "end")
        statement = (
            self._of_study(study_id)
            .where(CheckpointRow.timestamp >= start, CheckpointRow.timestamp < end)
            .order_by(*_CHECKPOINT_ORDER)
        )
        return self._checkpoints(statement)

    @staticmethod
    def _of_study(study_id: StudyId) -> _Select:
        return sa.select(*CHECKPOINT_COLUMNS).where(CheckpointRow.study_id == study_id)

    def _studies(self, statement: _Select) -> list[Study]:
        with _db.read(self.bind) as connection:
            return [study_from_row(row) for row in connection.execute(statement)]

    def _checkpoints(self, statement: _Select) -> list[Checkpoint]:
        with _db.read(self.bind) as connection:
            return [checkpoint_from_row(row) for row in connection.execute(statement)]
