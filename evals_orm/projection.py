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

A rebuild folds the same way into copies of the two tables (``_Replay``),
a batch per transaction without the projection's lock, then replaces only
the live rows that differ, in one short transaction holding it.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Collection, Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any, Protocol, runtime_checkable
from uuid import UUID

import attrs
import sqlalchemy as sa
from sqlalchemy.orm import Session

from evals_orm import _bulk, _follow, _locks, _tx, _writer
from evals_orm._follow import Lag, Stop
from evals_orm._iter import batched, batched_without_gc
from evals_orm._rows import (
    CHECKPOINT_COLUMNS,
    STUDY_STATE_COLUMNS,
    StudyState,
    checkpoint_from_row,
    checkpoint_values,
)
from evals_orm.domain import Checkpoint, StudyStatus
from evals_orm.errors import DatabaseError, EvalsError, ProjectionError
from evals_orm.eventlog import LogReader, SqlEventLog, unstorable
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
from evals_orm.models import (
    Base,
    CheckpointRow,
    RebuildCheckpointRow,
    RebuildStudyRow,
    StudyRow,
)

__all__ = ["EvalProjection", "Lag", "SqlEvalProjection", "Stop"]

PROJECTION = "projection"
# The lock row of the rebuild tables; its position is the generation of the
# rebuild filling them (each rebuild takes the next one).
REBUILD = "rebuild"
# Ids per statement where a list of ids is bound (SQLite's parameter limit).
_ID_CHUNK = 10_000
# How many checkpoint ids a rebuild keeps in memory to narrow its final
# transaction to the rows that changed (about 15 MB); past that, so many
# rows change that the final transaction compares them all instead.
_MAX_IDS = 100_000
# A writer of another process waiting in SQLite's busy handler looks again
# at least every 50 ms during its first 228 ms, then every 100 ms: after
# holding the database this long, a rebuild leaves it free for a while.
_LONG_RUN_S = 0.25


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


_UPDATED_COLUMNS = tuple(field.name for field in attrs.fields(StudyState) if field.name != "id")


@attrs.frozen
class _Tables:
    """Where a batch is applied: the live projection or a rebuild's copy of it."""

    studies: sa.Table
    checkpoints: sa.Table
    state_columns: tuple[sa.Column[Any], ...]
    checkpoint_columns: tuple[sa.Column[Any], ...]

    @classmethod
    def of(cls, studies_entity: type[Base], checkpoints_entity: type[Base]) -> _Tables:
        """Return the tables, columns in ``StudyState``'s and ``Checkpoint``'s order."""
        studies, checkpoints = studies_entity.__table__, checkpoints_entity.__table__
        assert isinstance(studies, sa.Table)
        assert isinstance(checkpoints, sa.Table)
        return cls(
            studies,
            checkpoints,
            tuple(studies.c[column.key] for column in STUDY_STATE_COLUMNS),
            tuple(checkpoints.c[column.key] for column in CHECKPOINT_COLUMNS),
        )


_LIVE = _Tables.of(StudyRow, CheckpointRow)
_COPY = _Tables.of(RebuildStudyRow, RebuildCheckpointRow)

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

    studies: dict[UUID, StudyState]
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
    _require_storable(stored)
    if isinstance(event, StudyCreated):
        if state is not None:
            raise ProjectionError(event_id, f"study {study_id} already exists")
        batch.studies[study_id] = StudyState(
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


def _require_storable(stored: StoredEvalEvent) -> None:
    reason = unstorable(stored.event)
    if reason is not None:
        raise ProjectionError(stored.event_id, reason)


def _occurred_at(event_id: UUID) -> datetime:
    try:
        return uuid7_time(event_id)
    except ValueError:
        raise ProjectionError(event_id, "its time is after the year 9999") from None


def apply_batch(
    connection: sa.Connection, events: list[StoredEvalEvent], tables: _Tables = _LIVE
) -> int:
    """Apply ``events`` to ``tables`` on ``connection``, whose transaction holds their lock.

    Return how many were new. Nothing is written if an event is invalid.
    """
    if not events:
        return 0
    study_ids = {stored.event.study_id for stored in events}
    studies = {
        row.id: StudyState.from_row(row)
        for row in connection.execute(
            sa.select(*tables.state_columns).where(
                _bulk.one_of(connection, tables.studies.c.id, study_ids)
            )
        )
    }
    batch = _Batch(studies=studies)
    # Where a bulk insert can skip existing keys and count what it inserted,
    # stored checkpoints are looked up only if one of the batch's ids is
    # taken; elsewhere (PostgreSQL's COPY) they are loaded before the fold.
    skips = _tx.backend(connection.engine).skips_conflicts
    if not skips:
        batch.checkpoints = _stored_checkpoints(
            connection,
            tables,
            {stored.event.id for stored in events if isinstance(stored.event, CheckpointRecorded)},
        )
    try:
        for stored in events:
            _fold(batch, stored)
    except ProjectionError:
        if skips:
            # A stored checkpoint conflicting with an earlier event of the
            # batch is the first error of the stream.
            _check_stored_checkpoints(connection, tables, batch.new_checkpoints)
        raise
    _bulk.upsert(
        connection,
        tables.studies,
        [batch.studies[study_id].values() for study_id in sorted(batch.changed)],
        key=("id",),
        update=_UPDATED_COLUMNS,
    )
    rows = [checkpoint_values(checkpoint) for _, checkpoint in batch.new_checkpoints]
    inserted = _bulk.insert_rows(connection, tables.checkpoints, rows, skip_conflicts=skips)
    if inserted < len(rows):
        _check_stored_checkpoints(connection, tables, batch.new_checkpoints)
    return batch.applied


def _stored_checkpoints(
    connection: sa.Connection, tables: _Tables, ids: set[UUID]
) -> dict[UUID, Checkpoint]:
    if not ids:
        return {}
    statement = sa.select(*tables.checkpoint_columns).where(
        _bulk.one_of(connection, tables.checkpoints.c.id, ids)
    )
    return {row.id: checkpoint_from_row(row) for row in connection.execute(statement)}


def _check_stored_checkpoints(
    connection: sa.Connection, tables: _Tables, recorded: list[tuple[UUID, Checkpoint]]
) -> None:
    """Raise for the first recorded checkpoint whose id is stored with another payload."""
    stored = _stored_checkpoints(connection, tables, {checkpoint.id for _, checkpoint in recorded})
    for event_id, checkpoint in recorded:
        found = stored.get(checkpoint.id)
        if found is not None and found != checkpoint:
            raise ProjectionError(
                event_id, f"checkpoint {checkpoint.id} is already recorded with another payload"
            )


@attrs.define
class _CopyPages:
    """Deletes the rows of the rebuild tables a page of ``_ID_CHUNK`` at a time, in key order.

    A page at a time, so that emptying a million rows never holds SQLite's
    one write lock for seconds; the last page of a table is a ``DELETE`` of
    the whole table, which SQLite runs without visiting the rows one by one
    (its truncate optimisation).
    """

    # Where the next page of each table starts (all below it is deleted).
    starts: dict[str, UUID] = attrs.field(factory=dict)

    def delete(self, connection: sa.Connection) -> bool:
        """Delete the next page (the tables' lock held); return whether any rows are left."""
        for table in (_COPY.checkpoints, _COPY.studies):
            start = self.starts.get(table.name)
            end = _page_end(connection, table.c.id, start)
            if end is not None:
                connection.execute(sa.delete(table).where(_id_range(table.c.id, start, end)))
                self.starts[table.name] = end
                return True
            connection.execute(sa.delete(table))
        return False


def _differing_checkpoints(connection: sa.Connection) -> list[UUID] | None:
    """Return the ids of the copied checkpoints not identical live (a read, no lock).

    ``None`` if there are more than ``_MAX_IDS``. Live checkpoints are never
    updated, and only ``clear`` and ``rebuild`` delete them, both ending a
    rebuild under way: a checkpoint found identical stays so until the
    replacement.
    """
    live, copy = _LIVE.checkpoints, _COPY.checkpoints
    # Joined on the key alone, the other columns compared on the joined
    # rows: as NOT EXISTS, PostgreSQL hashes every column, jsonb included
    # (measured: this takes half the time there). They are all NOT NULL.
    differing = (
        sa.select(copy.c.id)
        .select_from(copy.outerjoin(live, live.c.id == copy.c.id))
        .where(
            sa.or_(
                live.c.id.is_(None),
                *(column != live.c[column.key] for column in copy.c if column is not copy.c.id),
            )
        )
    )
    return _at_most(connection, differing)


def _not_copied(connection: sa.Connection) -> list[UUID] | None:
    """Return the ids of live checkpoints the copy does not hold (a read, no lock).

    ``None`` if there are more than ``_MAX_IDS``.
    """
    live, copy = _LIVE.checkpoints, _COPY.checkpoints
    copied = sa.exists().where(copy.c.id == live.c.id)
    return _at_most(connection, sa.select(live.c.id).where(~copied))


def _at_most(connection: sa.Connection, ids: sa.Select[UUID]) -> list[UUID] | None:
    found = list(connection.execute(ids.limit(_MAX_IDS + 1)).scalars())
    return found if len(found) <= _MAX_IDS else None


# The condition selecting one page of ids, on whichever id column it is given.
_Page = Callable[[sa.ColumnElement[UUID]], sa.ColumnElement[bool]]


def _pages(
    connection: sa.Connection, column: sa.Column[UUID], ids: Collection[UUID] | None
) -> Iterator[_Page]:
    """Yield a page per ``_ID_CHUNK`` of ``ids``.

    ``None`` for all the ids of ``column``'s table: then a page per range of
    ``_ID_CHUNK`` of them, in key order. Never all at once: SQLite copies the
    rows an ``INSERT ... SELECT`` reading its own target selects before it
    inserts them (embedded libSQL, into memory). The statements put the page
    on both sides of their subqueries: PostgreSQL plans a rebuild's tables
    by their size on disk, and scanned the whole of the other one each time.
    """
    if ids is not None:
        for chunk in batched(ids, _ID_CHUNK):
            yield functools.partial(_bulk.one_of, connection, values=chunk)
        return
    start: UUID | None = None
    while True:
        end = _page_end(connection, column, start)
        yield functools.partial(_id_range, start=start, end=end)
        if end is None:
            return
        start = end


def _page_end(
    connection: sa.Connection, column: sa.ColumnElement[UUID], start: UUID | None
) -> UUID | None:
    """Return the id ``_ID_CHUNK`` ids after ``start`` (the first id if ``None``); ``None`` if none.

    Everything below ``start`` is passed over without a look: PostgreSQL
    would otherwise scan the index over the dead rows of the pages deleted.
    """
    rest = sa.select(column).order_by(column).offset(_ID_CHUNK).limit(1)
    return connection.execute(rest if start is None else rest.where(column >= start)).scalar()


def _id_range(
    column: sa.ColumnElement[UUID], start: UUID | None, end: UUID | None
) -> sa.ColumnElement[bool]:
    """``start <= column < end``, either bound left out if ``None``."""
    return sa.and_(
        sa.true() if start is None else column >= start,
        sa.true() if end is None else column < end,
    )


def _replace_live(
    connection: sa.Connection,
    differing: Collection[UUID] | None,
    not_copied: Collection[UUID] | None,
) -> None:
    """Make the live projection what the rebuild tables hold (both locks held).

    Only rows that differ are written: a live row the copy holds as it is
    stays untouched, so rows of other tables keep their foreign keys to it.
    Of the checkpoints, only those found ``differing`` from (or missing in)
    the live table and the live ones ``not_copied`` are looked at, so the
    work here grows with what changed, not with the size of the projection;
    ``None`` stands for too many to list: then all of them are compared.
    """
    live, copy = _LIVE.checkpoints, _COPY.checkpoints
    for page in _pages(connection, live.c.id, differing):
        identical = sa.exists().where(
            page(copy.c.id), *(column == live.c[column.key] for column in copy.c)
        )
        connection.execute(sa.delete(live).where(page(live.c.id), ~identical))
    for page in _pages(connection, live.c.id, not_copied):
        copied = sa.exists().where(page(copy.c.id), copy.c.id == live.c.id)
        connection.execute(sa.delete(live).where(page(live.c.id), ~copied))
    _replace_studies(connection)
    names = [column.key for column in _COPY.checkpoint_columns]
    for page in _pages(connection, copy.c.id, differing):
        stored = sa.exists().where(page(live.c.id), live.c.id == copy.c.id)
        missing = sa.select(*_COPY.checkpoint_columns).where(page(copy.c.id), ~stored)
        connection.execute(sa.insert(live).from_select(names, missing))


def _replace_studies(connection: sa.Connection) -> None:
    """Upsert the studies that differ; delete those the copy does not hold."""
    live, copy = _LIVE, _COPY
    unchanged = sa.exists().where(
        *(column.is_not_distinct_from(live.studies.c[column.key]) for column in copy.state_columns)
    )
    _bulk.upsert_from_select(
        connection,
        live.studies,
        sa.select(*copy.state_columns).where(~unchanged),
        key=("id",),
        update=_UPDATED_COLUMNS,
    )
    replayed = sa.exists().where(copy.studies.c.id == live.studies.c.id)
    try:
        connection.execute(sa.delete(live.studies).where(~replayed))
    except sa.exc.IntegrityError:
        raise DatabaseError(
            "cannot remove studies the events no longer create: rows of other tables "
            "reference them; delete those rows first"
        ) from None


def _clear_rows(connection: sa.Connection) -> None:
    """Delete the projection's rows and reset the catch-up position (lock held)."""
    connection.execute(sa.delete(CheckpointRow))
    try:
        connection.execute(sa.delete(StudyRow))
    except sa.exc.IntegrityError:
        raise DatabaseError(
            "cannot clear the projection: rows of other tables reference its studies; "
            "delete those rows first, or rebuild instead"
        ) from None
    _locks.set_position(connection, PROJECTION, 0)


class _Superseded(EvalsError):
    """A later rebuild (or a ``clear``) has taken the rebuild tables over."""


@attrs.define
class _Replay:
    """One rebuild's replay into the rebuild tables, which it owns while its generation lasts."""

    bind: _tx.Bind
    generation: int
    on_progress: Callable[[int], None] | None
    applied: int = 0
    replayed: int = 0
    reported: int = 0
    # After ``compare``: the ids of the copied checkpoints to compare with
    # the live ones again under the lock (those found different, and every
    # one replayed since), or None for all of them (too many to list).
    differing: set[UUID] | None = None
    # When the last step ended, and how long the steps have held the
    # database since it was last free for the backend's ``step_gap``.
    ended: float = 0.0
    run: float = 0.0

    @classmethod
    def start(cls, bind: _tx.Bind, on_progress: Callable[[int], None] | None) -> _Replay:
        """Take the rebuild tables over (the next generation) and empty them."""
        with _tx.transaction(bind) as connection:
            generation = _locks.lock(connection, REBUILD) + 1
            _locks.set_position(connection, REBUILD, generation)
            # What a rebuild that did not finish left there.
            pages = _CopyPages()
            more = pages.delete(connection)
        replay = cls(bind, generation, on_progress)
        if more:
            replay.empty(pages)
        return replay

    @contextmanager
    def step(self) -> Iterator[sa.Connection]:
        """Yield a Connection in a transaction of its own that owns the rebuild tables.

        Once the steps have held the database for ``_LONG_RUN_S`` with no
        free moment as long as the backend's ``step_gap`` between them
        (reading and decoding count), the next one first leaves the
        database free that long (see ``Backend``).
        """
        self.leave_gap()
        began = time.monotonic()
        with _tx.transaction(self.bind) as connection:
            self.check(connection)
            yield connection
        self.ended = time.monotonic()
        self.run += self.ended - began

    def leave_gap(self) -> None:
        """Leave the database free for ``step_gap`` if the steps have held it long."""
        gap = _tx.backend(self.bind).step_gap
        free = time.monotonic() - self.ended
        if free >= gap:
            self.run = 0.0
        elif self.run >= _LONG_RUN_S:
            _writer.pause(gap - free)
            self.run = 0.0

    def check(self, connection: sa.Connection) -> None:
        """Take the rebuild tables' lock; raise if a later rebuild has taken them over."""
        if _locks.lock(connection, REBUILD) != self.generation:
            raise _Superseded(
                "another rebuild of the projection started meanwhile and replaces this one"
            )

    def apply(self, connection: sa.Connection, events: list[StoredEvalEvent]) -> None:
        """Apply ``events`` to the rebuild tables (their lock held)."""
        self.applied += apply_batch(connection, events, _COPY)
        self.replayed += len(events)
        if self.differing is not None:
            self.differing.update(
                stored.event.id for stored in events if isinstance(stored.event, CheckpointRecorded)
            )
            if len(self.differing) > _MAX_IDS:
                self.differing = None

    def report(self) -> None:
        """Tell ``on_progress`` how many events are replayed, if more than last time."""
        if self.on_progress is not None and self.replayed > self.reported:
            self.reported = self.replayed
            self.on_progress(self.replayed)

    def catch_up(
        self,
        log: SqlEventLog,
        position: int,
        limit: int,
        connection: sa.Connection | None = None,
    ) -> tuple[int, bool]:
        """Apply up to ``limit`` events logged after ``position``.

        On ``connection`` (whose transaction holds the lock), or else in a
        step of their own if there are any. Return the position reached and
        whether more may follow.
        """
        rows = log.fetch(position, limit)
        if not rows:
            return position, False
        events = [stored for _, stored in rows]
        if connection is None:
            with self.step() as step:
                self.apply(step, events)
        else:
            self.apply(connection, events)
        return rows[-1][0], len(rows) == limit

    def compare(self) -> list[UUID] | None:
        """Compare the copied checkpoints with the live ones (reads only: no lock).

        Keep the ids of those not identical live in ``differing`` (and from
        now on, those of every checkpoint replayed); return the ids of the
        live checkpoints the copy does not hold. Either is ``None`` past
        ``_MAX_IDS`` ids: the final transaction then compares all rows.
        """
        with _tx.read(self.bind) as connection:
            differing = _differing_checkpoints(connection)
            not_copied = _not_copied(connection)
        self.differing = None if differing is None else set(differing)
        return not_copied

    def empty(self, pages: _CopyPages | None = None) -> None:
        """Empty the rebuild tables, a page per step, unless a later rebuild takes them over."""
        pages = _CopyPages() if pages is None else pages
        more = True
        while more:
            try:
                with self.step() as connection:
                    more = pages.delete(connection)
            except _Superseded:
                return


class SqlEvalProjection:
    """``EvalProjection`` on any supported backend.

    ``bind`` is an Engine or a sessionmaker (each call runs and commits its
    own transactions) or a Connection or a Session (each call runs in a
    savepoint of the caller's transaction, which it never ends; the lock row
    is then held until the caller ends it). Writers are serialised by a lock
    row, so several processes may apply, rebuild and catch up at the same
    time; readers are never blocked and see each committed batch whole.
    """

    def __init__(self, bind: _tx.Bind, *, batch_size: int | None = None) -> None:
        bind = _tx.check_bind(bind)
        if batch_size is None:
            batch_size = _tx.backend(bind).batch_size
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.bind = bind
        self.batch_size = batch_size

    def __repr__(self) -> str:
        return f"{type(self).__name__}({_tx.engine_of(self.bind)!r})"

    @contextmanager
    def _locked(
        self, stopping: Callable[[], bool] | None = None
    ) -> Iterator[tuple[sa.Connection, int]]:
        """Yield a Connection in a transaction holding the projection lock, and the position.

        ``stopping``: see ``_locks.lock``.
        """
        with _tx.transaction(self.bind) as connection:
            yield connection, _locks.lock(connection, PROJECTION, stopping=stopping)

    def apply(self, stored: StoredEvalEvent) -> bool:
        """Apply one event in its own transaction; ``False`` if it was already applied."""
        return self.apply_many((stored,)) == 1

    def apply_many(self, events: Iterable[StoredEvalEvent]) -> int:
        """Apply ``events`` in transactions of ``batch_size``; return how many were new.

        The iterable is consumed lazily. On an invalid event, the batches
        before its own stay committed and ``ProjectionError`` is raised.
        """
        applied = 0
        for chunk in batched_without_gc(events, self.batch_size):
            with self._locked() as (connection, _):
                applied += apply_batch(connection, chunk)
        return applied

    def rebuild(
        self,
        events: Iterable[StoredEvalEvent] | SqlEventLog,
        *,
        on_progress: Callable[[int], None] | None = None,
    ) -> int:
        """Replace the projection by replaying ``events``; return how many were applied.

        The events are replayed into the rebuild tables, a batch per short
        transaction, without the projection's lock: appends and their inline
        projection go on meanwhile. Then one short transaction holding the
        lock writes to the live tables only the rows that differ. Readers see
        the old projection until then and the new one whole after; live rows
        that stay as they are (and the foreign keys of other tables to them)
        are untouched.

        Given the log itself, or ``log.read()`` without a limit and with no
        event drawn from it yet, the replay
        also takes in what was logged meanwhile, and the position replayed to
        is recorded, so the next ``catch_up`` starts there (after
        ``log.read(limit=N)``: the position of those N). After any other
        iterable, ``catch_up`` starts from the beginning of the log and skips
        what the projection already has. ``on_progress`` gets the count of
        events replayed so far after each committed step.

        A rebuild started meanwhile takes the rebuild tables over, and
        ``clear`` ends a rebuild under way too: this one then raises
        ``EvalsError`` and leaves the projection as the other call made it.
        Given a Connection or a Session, every step runs in the caller's
        transaction.
        """
        if isinstance(events, SqlEventLog):
            events = events.read()
        # A reader of the whole log no event was drawn from yet.
        whole = (
            events
            if isinstance(events, LogReader) and events.start == events.position == 0
            else None
        )
        replay = _Replay.start(self.bind, on_progress)
        for chunk in batched_without_gc(events, self.batch_size):
            with replay.step() as connection:
                replay.apply(connection, chunk)
            replay.report()
        log, position = None, 0
        if whole is not None:
            position = whole.position
            if whole.limit is None:
                log = whole.log
        more = log is not None
        while log is not None and more:
            # What was logged meanwhile, still without the projection's lock.
            position, more = replay.catch_up(log, position, self.batch_size)
            replay.report()
        not_copied = replay.compare()
        replay.leave_gap()
        with self._locked() as (connection, _):
            replay.check(connection)
            more = log is not None
            while log is not None and more:
                position, more = replay.catch_up(log, position, self.batch_size, connection)
            _replace_live(connection, replay.differing, not_copied)
            _locks.set_position(connection, PROJECTION, position)
        replay.report()
        replay.empty()
        return replay.applied

    def clear(self) -> None:
        """Empty the projection and reset its catch-up position.

        Refused with ``DatabaseError`` while rows of other tables reference
        its studies.
        """
        with self._locked() as (connection, _):
            _clear_rows(connection)
            # A rebuild under way has compared its copy with the rows just
            # deleted: it must not replace the projection (see ``_Replay``).
            _locks.set_position(connection, REBUILD, _locks.lock(connection, REBUILD) + 1)

    def catch_up(self, log: SqlEventLog) -> int:
        """Apply every logged event not applied yet, in log order; return how many."""
        applied = 0
        while True:
            with self._locked() as (connection, position):
                caught_up, reached = self._catch_up_batch(connection, log, position)
            applied += caught_up
            if reached is None:
                return applied

    def lag(self, log: SqlEventLog) -> Lag:
        """Return how far the projection is behind ``log`` (``applied`` is 0); takes no lock."""
        return _follow.lag(self.bind, log, PROJECTION, 0)

    def follow(
        self,
        log: SqlEventLog,
        *,
        poll_interval: float | None = None,
        stop: Stop = None,
        on_progress: Callable[[Lag], None] | None = None,
        on_error: Callable[[DatabaseError], None] | None = None,
    ) -> int:
        """Keep the projection caught up with ``log`` until ``stop``; return how many were applied.

        ``stop`` is a ``threading.Event`` (the prompt way: waits end as soon as
        it is set), a callable returning true to stop, or ``None`` (run until
        interrupted). Once it is set, the batch in hand is finished and
        committed, and ``follow`` returns (a batch whose lock a remote libSQL
        server refuses for now is not in hand: it is left to the next run).

        On PostgreSQL the follower wakes on the NOTIFY each append sends when
        it commits, and looks at the log every ``poll_interval`` seconds
        anyway (default 5). Elsewhere it polls: soon after it applied
        something, then less often up to ``poll_interval`` while the log is
        idle (default 0.1 s; 0.25 s on a remote libSQL server).

        Each batch is one transaction under the projection lock, with the
        position, so any number of followers in any number of processes may
        run: one applies at a time, none applies an event twice, and one
        killed at any instant leaves a prefix the next one continues from.
        ``on_progress`` gets the ``Lag`` after each look at the log. A lost
        database connection is retried with a backoff (0.5 s doubling up to
        30 s); ``on_error`` gets the error once per incident. A missing
        schema, refused credentials and invalid events are raised.
        """
        if isinstance(self.bind, (sa.Connection, Session)):
            raise EvalsError("follow needs an Engine or a sessionmaker: it commits every batch")
        stopping = _follow.Stopping(stop)
        if poll_interval is None:
            poll_interval = _tx.backend(log.bind).poll_interval
        if poll_interval <= 0:
            raise ValueError(f"poll_interval must be positive, got {poll_interval}")
        applied = 0
        backoff = _follow.Backoff()
        while not stopping.is_set():
            try:
                with _follow.waiter(log, poll_interval, stopping) as waiter:
                    while not stopping.is_set():
                        state = _follow.lag(self.bind, log, PROJECTION, applied)
                        backoff.reset()
                        if on_progress is not None:
                            on_progress(state)
                        if not state.behind:
                            waiter.wait()
                            continue
                        try:
                            with self._locked(stopping.is_set) as (connection, position):
                                applied += self._catch_up_batch(connection, log, position)[0]
                        except _locks.Abandoned:
                            # Stopped before this batch was in hand: nothing of it was written.
                            break
                        waiter.active()
            except DatabaseError as error:
                if not _follow.is_transient(error):
                    raise
                if not backoff.in_incident and on_error is not None:
                    on_error(error)
                stopping.wait(backoff.next_delay())
        return applied

    def _catch_up_batch(
        self, connection: sa.Connection, log: SqlEventLog, position: int
    ) -> tuple[int, int | None]:
        """Apply a batch of the log after ``position`` (lock held).

        Return how many events were new and the position reached (``None``:
        nothing was left to apply).
        """
        rows = log.fetch(position, self.batch_size)
        if not rows:
            return 0, None
        applied = apply_batch(connection, [stored for _, stored in rows])
        reached = rows[-1][0]
        _locks.set_position(connection, PROJECTION, reached)
        return applied, reached

    def _before_append(self, connection: sa.Connection, log: SqlEventLog) -> None:
        """Take the projection lock and bring the projection up to the log (log lock held).

        Applying a new event of a study before an older, unprojected one would
        make a later catch_up take the older one for a duplicate and skip it.
        """
        position: int | None = _locks.lock(connection, PROJECTION)
        while position is not None:
            _, position = self._catch_up_batch(connection, log, position)

    def _after_append(
        self, connection: sa.Connection, events: list[StoredEvalEvent], last_position: int
    ) -> None:
        """Project events the log just inserted, up to ``last_position`` (both locks held)."""
        apply_batch(connection, events)
        _locks.set_position(connection, PROJECTION, last_position)
