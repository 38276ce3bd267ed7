"""The event log: an append-only ``eval_events`` table, and JSON Lines sources.

Appends are serialised by a lock row, so ``position`` order is commit
order on every backend: a projector that has read up to a position can
never see an event commit below it later.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO
from uuid import UUID

import attrs
import sqlalchemy as sa

from evals_orm import _db
from evals_orm.converters import dumps, loads
from evals_orm.errors import EvalsError, EventConflictError, EventOrderError, InvalidEventError
from evals_orm.events import EvalEvent, StoredEvalEvent
from evals_orm.models import EventRow
from evals_orm.projection import PROJECTION, SqlEvalProjection, apply_batch

__all__ = ["InvalidLine", "SqlEventLog", "read_jsonl"]

LOG = "log"
_CHUNK = 1000


class SqlEventLog:
    """An append-only log of ``StoredEvalEvent`` in the ``eval_events`` table."""

    def __init__(self, bind: _db.Bind) -> None:
        self.bind = bind

    def __repr__(self) -> str:
        return f"{type(self).__name__}({_db.engine_of(self.bind)!r})"

    def append(
        self,
        events: StoredEvalEvent | Iterable[StoredEvalEvent],
        *,
        projection: SqlEvalProjection | None = None,
    ) -> int:
        """Append one event or an iterable in one transaction; return how many were new.

        An event already logged with the same payload is skipped; with another
        payload it raises ``EventConflictError``. An ``event_id`` not newer than
        the last logged event of its study raises ``EventOrderError``. Given a
        ``projection`` on the same database, the new events are projected in
        the same transaction (inline projection). On any error nothing is written.
        """
        if isinstance(events, StoredEvalEvent):
            events = (events,)
        if projection is not None and _db.engine_of(projection.bind) is not _db.engine_of(
            self.bind
        ):
            raise EvalsError("inline projection needs the log and the projection on one Engine")
        appended = 0
        with _db.transaction(self.bind) as connection:
            _db.lock(connection, LOG)
            if projection is not None:
                # Bring the projection up to the log first: applying a new event
                # of a study before an older, unprojected one would make a later
                # catch_up take the older one for a duplicate and skip it.
                self._catch_up(connection, _db.lock(connection, PROJECTION))
            last_of_study: dict[UUID, UUID] = {}
            for chunk in _chunks(events):
                new = self._new_events(connection, chunk, last_of_study)
                if not new:
                    continue
                _db.insert_rows(
                    connection,
                    EventRow,
                    [
                        {
                            "event_id": stored.event_id,
                            "study_id": stored.event.study_id,
                            "payload": payload,
                        }
                        for stored, payload in new
                    ],
                )
                if projection is not None:
                    apply_batch(connection, [stored for stored, _ in new])
                appended += len(new)
            if projection is not None:
                _db.set_position(connection, PROJECTION, self._last_position(connection))
        return appended

    def _catch_up(self, connection: sa.Connection, position: int) -> None:
        """Apply the logged events after ``position`` on ``connection`` (both locks held)."""
        while rows := self.fetch(position, _CHUNK, connection=connection):
            apply_batch(connection, [stored for _, stored in rows])
            position = rows[-1][0]

    def _new_events(
        self,
        connection: sa.Connection,
        chunk: list[StoredEvalEvent],
        last_of_study: dict[UUID, UUID],
    ) -> list[tuple[StoredEvalEvent, str]]:
        """Check a chunk against the log; return the events to insert with their payloads."""
        event_ids = {stored.event_id for stored in chunk}
        logged = dict(
            connection.execute(
                sa.select(EventRow.event_id, EventRow.payload).where(
                    _db.one_of(connection, EventRow.event_id, event_ids)
                )
            ).all()
        )
        unknown = {stored.event.study_id for stored in chunk} - last_of_study.keys()
        if unknown:
            # Log order is event_id order within a study, so the study's last
            # position holds its newest event (PostgreSQL has no max(uuid)).
            newest = (
                sa.select(sa.func.max(EventRow.position).label("position"))
                .where(_db.one_of(connection, EventRow.study_id, unknown))
                .group_by(EventRow.study_id)
                .subquery()
            )
            last_of_study.update(
                connection.execute(
                    sa.select(EventRow.study_id, EventRow.event_id).join(
                        newest, EventRow.position == newest.c.position
                    )
                ).all()
            )
        new: list[tuple[StoredEvalEvent, str]] = []
        for stored in chunk:
            payload = dumps(stored.event)
            known = logged.get(stored.event_id)
            if known is not None:
                if known != payload and loads(known, EvalEvent) != stored.event:
                    raise EventConflictError(
                        f"event {stored.event_id} is already logged with another payload"
                    )
                continue
            study_id = stored.event.study_id
            last = last_of_study.get(study_id)
            if last is not None and stored.event_id <= last:
                raise EventOrderError(
                    f"event {stored.event_id} is not newer than event {last}, the last "
                    f"logged for study {study_id}; stamp it again and retry"
                )
            last_of_study[study_id] = stored.event_id
            logged[stored.event_id] = payload
            new.append((stored, payload))
        return new

    @staticmethod
    def _last_position(connection: sa.Connection) -> int:
        last: int = connection.execute(
            sa.select(sa.func.coalesce(sa.func.max(EventRow.position), 0))
        ).scalar_one()
        return last

    def read(
        self, after: UUID | None = None, *, limit: int | None = None
    ) -> Iterator[StoredEvalEvent]:
        """Iterate over the logged events in log order, after the logged event ``after``.

        An ``after`` that is not in the log raises ``EvalsError`` here, not at
        the first ``next()``. Events are fetched in pages, each in its own
        short read, so the log is never held in memory and no cursor stays
        open between pages.
        """
        if limit is not None and limit < 0:
            raise ValueError(f"limit must not be negative, got {limit}")
        position = 0
        if after is not None:
            with _db.read(self.bind) as connection:
                found = connection.execute(
                    sa.select(EventRow.position).where(EventRow.event_id == after)
                ).scalar_one_or_none()
            if found is None:
                raise EvalsError(f"event {after} is not in the log")
            position = found
        return self._pages(position, limit)

    def _pages(self, position: int, remaining: int | None) -> Iterator[StoredEvalEvent]:
        while remaining is None or remaining > 0:
            page = _CHUNK if remaining is None else min(_CHUNK, remaining)
            rows = self.fetch(position, page)
            yield from (stored for _, stored in rows)
            if len(rows) < page:
                return
            position = rows[-1][0]
            if remaining is not None:
                remaining -= len(rows)

    def fetch(
        self, after_position: int, limit: int, *, connection: sa.Connection | None = None
    ) -> list[tuple[int, StoredEvalEvent]]:
        """Return up to ``limit`` events after ``after_position``, with their positions.

        ``connection`` is used when it is on the log's own Engine (so a
        projector reads the log inside its transaction); otherwise the log
        opens its own.
        """
        statement = (
            sa.select(EventRow.position, EventRow.event_id, EventRow.payload)
            .where(EventRow.position > after_position)
            .order_by(EventRow.position)
            .limit(limit)
        )
        if connection is not None and connection.engine is _db.engine_of(self.bind):
            rows = connection.execute(statement).all()
        else:
            with _db.read(self.bind) as own:
                rows = own.execute(statement).all()
        return [
            (position, StoredEvalEvent(event_id, loads(payload, EvalEvent)))
            for position, event_id, payload in rows
        ]

    def count(self) -> int:
        """Return how many events the log holds."""
        with _db.read(self.bind) as connection:
            count: int = connection.execute(
                sa.select(sa.func.count()).select_from(EventRow)
            ).scalar_one()
        return count


def _chunks(events: Iterable[StoredEvalEvent]) -> Iterator[list[StoredEvalEvent]]:
    iterator = iter(events)
    while chunk := list(itertools.islice(iterator, _CHUNK)):
        yield chunk


@attrs.frozen
class InvalidLine:
    """A line of a JSON Lines source that is not a valid event."""

    source: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.source}:{self.line}: {self.reason}"


def read_jsonl(
    source: str | Path | IO[str] | IO[bytes],
    *,
    errors: list[InvalidLine] | None = None,
) -> Iterator[StoredEvalEvent]:
    """Iterate over the ``StoredEvalEvent`` lines of a JSON Lines file (``"-"``: stdin).

    Blank lines are skipped. A bad line raises ``InvalidEventError`` naming
    the file and line number, unless ``errors`` is given: then it is recorded
    there as an ``InvalidLine`` and reading goes on.
    """
    if isinstance(source, (str, Path)):
        name = str(source)
        if name == "-":
            yield from _parse_lines(sys.stdin.buffer, "<stdin>", errors)
            return
        with open(source, "rb") as stream:
            yield from _parse_lines(stream, name, errors)
        return
    yield from _parse_lines(source, str(getattr(source, "name", "<stream>")), errors)


def _parse_lines(
    stream: Iterable[str | bytes], name: str, errors: list[InvalidLine] | None
) -> Iterator[StoredEvalEvent]:
    for number, line in enumerate(stream, start=1):
        if not line.strip():
            continue
        try:
            yield loads(line)
        except InvalidEventError as error:
            if errors is None:
                raise InvalidEventError(f"{name}:{number}: {error}") from None
            errors.append(InvalidLine(name, number, str(error)))
