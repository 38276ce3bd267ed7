"""The write side: ``EvalProjection`` and its SQL implementation.

Each batch of events runs in one transaction that

1. takes the projection's write lock (a row of ``eval_tracking``),
2. loads the current state of the batch's studies in one query (and, on
   PostgreSQL, its checkpoint ids already stored, in another),
3. folds the events over that state in memory - the pure state machine of
   ``_fold`` - and
4. writes the final rows back with one upsert of ``studies`` and one bulk
   insert of ``checkpoints``; where that insert skips stored ids, the
   skipped ones are read back and must carry the same payload.

``studies.last_event_id`` records the newest event applied to each study in
the same row as the state it produced, so an event at or below it is a
duplicate: redelivery changes nothing, and a crash leaves a prefix.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable
from uuid import UUID

import attrs
import sqlalchemy as sa

from evals_orm import _db
from evals_orm.domain import Checkpoint, PeriodType, StudyConfig, StudyStatus
from evals_orm.errors import ProjectionError
from evals_orm.events import (
    CheckpointRecorded,
    StoredEvalEvent,
    StudyCreated,
    StudyPaused,
    StudyResumed,
    StudyStarted,
    StudyStopped,
    uuid7_time,
)
from evals_orm.models import CheckpointRow, StudyRow
from evals_orm.storage import CHECKPOINT_COLUMNS, checkpoint_from_row

if TYPE_CHECKING:
    from evals_orm.eventlog import SqlEventLog

__all__ = ["EvalProjection", "SqlEvalProjection"]

PROJECTION = "projection"


@runtime_checkable
class EvalProjection(Protocol):
    """Maintains the studies/checkpoints read model from the event stream."""

    def apply(self, stored: StoredEvalEvent) -> bool:
        """Apply one event; return ``False`` if it was already applied."""
        ...

    def apply_many(self, events: Iterable[StoredEvalEvent]) -> int:
        """Apply events in batched transactions; return how many were new."""
        ...

    def rebuild(self, events: Iterable[StoredEvalEvent]) -> int:
        """Replace the whole projection by replaying ``events``, atomically."""
        ...

    def clear(self) -> None:
        """Empty the projection."""
        ...


@attrs.define
class _StudyState:
    """A study's row while a batch is folded over it."""

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

    def row(self) -> dict[str, Any]:
        return attrs.asdict(self, recurse=False)


_STATE_COLUMNS = tuple(getattr(StudyRow, field.name) for field in attrs.fields(_StudyState))
_UPDATED_COLUMNS = tuple(field.name for field in attrs.fields(_StudyState) if field.name != "id")

# (status, event type) -> new status; every pair not listed leaves the row as it is.
_TRANSITIONS: dict[tuple[StudyStatus, type[object]], StudyStatus] = {
    (StudyStatus.PENDING, StudyStarted): StudyStatus.RUNNING,
    (StudyStatus.RUNNING, StudyPaused): StudyStatus.PAUSED,
    (StudyStatus.PAUSED, StudyResumed): StudyStatus.RUNNING,
    (StudyStatus.PENDING, StudyStopped): StudyStatus.STOPPED,
    (StudyStatus.RUNNING, StudyStopped): StudyStatus.STOPPED,
    (StudyStatus.PAUSED, StudyStopped): StudyStatus.STOPPED,
}


@attrs.define
class _Batch:
    """What folding a batch produced: the rows to write."""

    studies: dict[UUID, _StudyState]
    changed: set[UUID] = attrs.field(factory=set)
    checkpoints: dict[UUID, Checkpoint] = attrs.field(factory=dict)
    # (event_id, checkpoint) of the checkpoints this batch records, in order.
    new_checkpoints: list[tuple[UUID, Checkpoint]] = attrs.field(factory=list)
    applied: int = 0


def _fold(batch: _Batch, stored: StoredEvalEvent) -> None:
    """Apply one event to the in-memory state, or raise ``ProjectionError``."""
    event = stored.event
    event_id = stored.event_id
    study_id = event.study_id
    state = batch.studies.get(study_id)
    if state is not None and event_id <= state.last_event_id:
        return
    if isinstance(event, StudyCreated):
        if state is not None:
            raise ProjectionError(event_id, f"study {study_id} already exists")
        batch.studies[study_id] = _StudyState(
            id=study_id,
            name=event.name,
            status=StudyStatus.PENDING,
            period_type=event.period_type,
            period_value=event.period_value,
            config=event.config,
            created_at=_occurred_at(event_id),
            started_at=None,
            stopped_at=None,
            last_event_id=event_id,
        )
    elif state is None:
        raise ProjectionError(event_id, f"study {study_id} does not exist")
    elif isinstance(event, CheckpointRecorded):
        checkpoint = event.to_checkpoint()
        existing = batch.checkpoints.get(checkpoint.id)
        if existing is None:
            batch.checkpoints[checkpoint.id] = checkpoint
            batch.new_checkpoints.append((event_id, checkpoint))
        elif existing != checkpoint:
            raise ProjectionError(
                event_id, f"checkpoint {checkpoint.id} is already recorded with another payload"
            )
        state.last_event_id = event_id
    else:
        new_status = _TRANSITIONS.get((state.status, type(event)))
        if new_status is not None:
            state.status = new_status
            if new_status is StudyStatus.RUNNING and state.started_at is None:
                state.started_at = _occurred_at(event_id)
            elif new_status is StudyStatus.STOPPED:
                state.stopped_at = _occurred_at(event_id)
        state.last_event_id = event_id
    batch.changed.add(study_id)
    batch.applied += 1


def _occurred_at(event_id: UUID) -> datetime:
    try:
        return uuid7_time(event_id)
    except ValueError:
        raise ProjectionError(event_id, "its time is after the year 9999") from None


def _batched(events: Iterable[StoredEvalEvent], size: int) -> Iterator[list[StoredEvalEvent]]:
    iterator = iter(events)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def apply_batch(connection: sa.Connection, events: list[StoredEvalEvent]) -> int:
    """Apply ``events`` on ``connection``, whose transaction holds the projection lock.

    Return how many were new. Nothing is written if an event is invalid.
    """
    if not events:
        return 0
    study_ids = {stored.event.study_id for stored in events}
    studies = {
        row[0]: _StudyState(*row)
        for row in connection.execute(
            sa.select(*_STATE_COLUMNS).where(_db.one_of(connection, StudyRow.id, study_ids))
        )
    }
    batch = _Batch(studies=studies)
    # Where a bulk insert can skip existing keys and count what it inserted,
    # stored checkpoints are looked up only if one of the batch's ids is
    # taken; elsewhere (PostgreSQL's COPY) they are loaded before the fold.
    skips = _db.bulk_insert_skips_conflicts(connection)
    if not skips:
        batch.checkpoints = _stored_checkpoints(
            connection,
            {stored.event.id for stored in events if isinstance(stored.event, CheckpointRecorded)},
        )
    try:
        for stored in events:
            _fold(batch, stored)
    except ProjectionError:
        if skips:
            # A stored checkpoint conflicting with an earlier event of the
            # batch is the first error of the stream.
            _check_stored_checkpoints(connection, batch.new_checkpoints)
        raise
    _db.upsert(
        connection,
        StudyRow,
        [batch.studies[study_id].row() for study_id in sorted(batch.changed)],
        key=("id",),
        update=_UPDATED_COLUMNS,
    )
    rows = [
        # Spelled out: attrs.asdict looks the fields up again for every row.
        {
            "id": c.id,
            "study_id": c.study_id,
            "timestamp": c.timestamp,
            "metrics": c.metrics,
            "events_analyzed": c.events_analyzed,
            "sessions_included": c.sessions_included,
        }
        for _, c in batch.new_checkpoints
    ]
    inserted = _db.insert_rows(connection, CheckpointRow, rows, skip_conflicts=skips)
    if inserted < len(rows):
        _check_stored_checkpoints(connection, batch.new_checkpoints)
    return batch.applied


def _stored_checkpoints(connection: sa.Connection, ids: set[UUID]) -> dict[UUID, Checkpoint]:
    if not ids:
        return {}
    statement = sa.select(*CHECKPOINT_COLUMNS).where(_db.one_of(connection, CheckpointRow.id, ids))
    return {row[0]: checkpoint_from_row(row) for row in connection.execute(statement)}


def _check_stored_checkpoints(
    connection: sa.Connection, recorded: list[tuple[UUID, Checkpoint]]
) -> None:
    """Raise for the first recorded checkpoint whose id is stored with another payload."""
    stored = _stored_checkpoints(connection, {checkpoint.id for _, checkpoint in recorded})
    for event_id, checkpoint in recorded:
        found = stored.get(checkpoint.id)
        if found is not None and found != checkpoint:
            raise ProjectionError(
                event_id, f"checkpoint {checkpoint.id} is already recorded with another payload"
            )


def clear_rows(connection: sa.Connection) -> None:
    """Delete the projection's rows and reset the catch-up position (lock held)."""
    connection.execute(sa.delete(CheckpointRow))
    connection.execute(sa.delete(StudyRow))
    _db.set_position(connection, PROJECTION, 0)


class SqlEvalProjection:
    """``EvalProjection`` over an Engine or a sessionmaker, on any supported backend.

    Writers are serialised by a lock row, so several processes may apply,
    rebuild and catch up at the same time; readers are never blocked and see
    each committed batch whole.
    """

    def __init__(self, bind: _db.Bind, *, batch_size: int | None = None) -> None:
        if batch_size is None:
            batch_size = _db.batch_size(_db.engine_of(bind))
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.bind = bind
        self.batch_size = batch_size

    def __repr__(self) -> str:
        return f"{type(self).__name__}({_db.engine_of(self.bind)!r})"

    @contextmanager
    def _locked(self) -> Iterator[tuple[sa.Connection, int]]:
        """Yield a Connection in a transaction holding the projection lock, and the position."""
        with _db.transaction(self.bind) as connection:
            yield connection, _db.lock(connection, PROJECTION)

    def apply(self, stored: StoredEvalEvent) -> bool:
        """Apply one event in its own transaction; ``False`` if it was already applied."""
        return self.apply_many((stored,)) == 1

    def apply_many(self, events: Iterable[StoredEvalEvent]) -> int:
        """Apply ``events`` in transactions of ``batch_size``; return how many were new.

        The iterable is consumed lazily. On an invalid event, the batches
        before its own stay committed and ``ProjectionError`` is raised.
        """
        applied = 0
        for chunk in _batched(events, self.batch_size):
            with self._locked() as (connection, _):
                applied += apply_batch(connection, chunk)
        return applied

    def rebuild(self, events: Iterable[StoredEvalEvent]) -> int:
        """Replace the projection by replaying ``events`` in one transaction.

        Readers see the old projection until the new one is committed.
        """
        with self._locked() as (connection, _):
            clear_rows(connection)
            return sum(
                apply_batch(connection, chunk) for chunk in _batched(events, self.batch_size)
            )

    def clear(self) -> None:
        """Empty the projection and reset its catch-up position."""
        with self._locked() as (connection, _):
            clear_rows(connection)

    def catch_up(self, log: SqlEventLog) -> int:
        """Apply every logged event not applied yet, in log order; return how many."""
        applied = 0
        while True:
            with self._locked() as (connection, position):
                rows = log.fetch(position, self.batch_size, connection=connection)
                if not rows:
                    return applied
                applied += apply_batch(connection, [stored for _, stored in rows])
                _db.set_position(connection, PROJECTION, rows[-1][0])
