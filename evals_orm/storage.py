"""The read side: ``EvalStorage`` and its SQL implementation."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Protocol, runtime_checkable
from uuid import UUID

import sqlalchemy as sa
from typing_extensions import Unpack

from evals_orm import _tx
from evals_orm._rows import CHECKPOINT_COLUMNS, STUDY_COLUMNS, checkpoint_from_row, study_from_row
from evals_orm.domain import Checkpoint, Study, StudyId, StudyStatus, ensure_utc
from evals_orm.models import CheckpointRow, StudyRow

__all__ = ["EvalStorage", "SqlEvalStorage"]


@runtime_checkable
class EvalStorage(Protocol):
    """Queries over the studies/checkpoints projection, returning domain objects."""

    def get_study(self, id: UUID) -> Study | None:
        """Return the study ``id``, or ``None``."""
        ...

    def list_studies(self) -> list[Study]:
        """Return every study, newest ``created_at`` first."""
        ...

    def list_studies_by_status(self, status: StudyStatus) -> list[Study]:
        """Return the studies in ``status``, newest ``created_at`` first."""
        ...

    def get_checkpoints(self, study_id: UUID) -> list[Checkpoint]:
        """Return the study's checkpoints, oldest ``timestamp`` first."""
        ...

    def get_latest_checkpoint(self, study_id: UUID) -> Checkpoint | None:
        """Return the study's newest checkpoint, or ``None``."""
        ...

    def get_checkpoints_in_range(
        self, study_id: UUID, start: datetime, end: datetime
    ) -> list[Checkpoint]:
        """Return the study's checkpoints with ``start <= timestamp < end``, oldest first."""
        ...


_Select = sa.Select[Unpack[tuple[Any, ...]]]

_STUDY_ORDER = (StudyRow.created_at.desc(), StudyRow.id.desc())
_CHECKPOINT_ORDER = (CheckpointRow.timestamp.asc(), CheckpointRow.id.asc())


class SqlEvalStorage:
    """``EvalStorage`` on any supported backend.

    ``bind`` is an Engine or a sessionmaker, or a Connection or a Session whose
    transaction the reads then run in (seeing its uncommitted writes).
    """

    def __init__(self, bind: _tx.Bind) -> None:
        self.bind = _tx.check_bind(bind)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({_tx.engine_of(self.bind)!r})"

    def get_study(self, id: UUID) -> Study | None:
        """Return the study ``id``, or ``None``."""
        statement = sa.select(*STUDY_COLUMNS).where(StudyRow.id == id)
        with _tx.read(self.bind) as connection:
            row = connection.execute(statement).one_or_none()
        return None if row is None else study_from_row(row)

    def list_studies(self) -> list[Study]:
        """Return every study, newest ``created_at`` first (ties: highest id first)."""
        return self._studies(sa.select(*STUDY_COLUMNS).order_by(*_STUDY_ORDER))

    def list_studies_by_status(self, status: StudyStatus) -> list[Study]:
        """Return the studies in ``status``, in ``list_studies`` order."""
        status = StudyStatus(status)
        statement = (
            sa.select(*STUDY_COLUMNS).where(StudyRow.status == status).order_by(*_STUDY_ORDER)
        )
        return self._studies(statement)

    def get_checkpoints(self, study_id: UUID) -> list[Checkpoint]:
        """Return the study's checkpoints, oldest ``timestamp`` first (ties: lowest id)."""
        return self._checkpoints(self._of_study(study_id).order_by(*_CHECKPOINT_ORDER))

    def get_latest_checkpoint(self, study_id: UUID) -> Checkpoint | None:
        """Return the last checkpoint in ``get_checkpoints`` order, or ``None``."""
        statement = (
            self._of_study(study_id)
            .order_by(CheckpointRow.timestamp.desc(), CheckpointRow.id.desc())
            .limit(1)
        )
        found = self._checkpoints(statement)
        return found[0] if found else None

    def get_checkpoints_in_range(
        self, study_id: UUID, start: datetime, end: datetime
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

    def checkpoint_counts(self) -> dict[StudyId, int]:
        """Return how many checkpoints each study has (studies without any are left out)."""
        statement = sa.select(CheckpointRow.study_id, sa.func.count()).group_by(
            CheckpointRow.study_id
        )
        with _tx.read(self.bind) as connection:
            return {StudyId(study_id): count for study_id, count in connection.execute(statement)}

    @staticmethod
    def _of_study(study_id: UUID) -> _Select:
        return sa.select(*CHECKPOINT_COLUMNS).where(CheckpointRow.study_id == study_id)

    # Rows are fetched all at once: iterating a result fetches them one by
    # one, which costs psycopg as much as decoding them.
    def _studies(self, statement: _Select) -> list[Study]:
        with _tx.read(self.bind) as connection:
            rows = connection.execute(statement).all()
        return [study_from_row(row) for row in rows]

    def _checkpoints(self, statement: _Select) -> list[Checkpoint]:
        with _tx.read(self.bind) as connection:
            rows = connection.execute(statement).all()
        return [checkpoint_from_row(row) for row in rows]
