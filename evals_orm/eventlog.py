"""The event log: an append-only ``eval_events`` table, and JSON Lines sources.

Appends are serialised by a lock row, so ``position`` order is commit
order on every backend: a projector that has read up to a position can
never see an event commit below it later.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from datetime import timedelta
from pathlib import Path
from typing import IO, TYPE_CHECKING, Protocol, TypeAlias
from uuid import UUID

import attrs
import sqlalchemy as sa

from evals_orm import _bulk, _locks, _tx
from evals_orm._iter import batched
from evals_orm.converters import dumps, loads, written_decoder
from evals_orm.domain import unchecked_constructor
from evals_orm.errors import EvalsError, EventConflictError, EventOrderError, InvalidEventError
from evals_orm.events import CheckpointRecorded, EvalEvent, StoredEvalEvent, StudyCreated
from evals_orm.models import EventRow

__all__ = [
    "MAX_CLOCK_SKEW",
    "InlineProjection",
    "InvalidLine",
    "LogReader",
    "SqlEventLog",
    "read_jsonl",
    "unstorable",
]

LOG = "log"
_CHUNK = 1000
# The channel an append notifies (PostgreSQL), for followers that LISTEN.
CHANNEL = "evals_orm_events"
_decode_payload = written_decoder(EvalEvent)
# The log holds only events that were valid when appended.
_stored = unchecked_constructor(StoredEvalEvent)
if TYPE_CHECKING:
    # A row of the log as read: position, event id, payload (SQLAlchemy 2.1's
    # Row is generic over its columns' types; 2.0's is not, at run time).
    _LogRow: TypeAlias = sa.Row[int, UUID, str]

# How far ahead of this clock an appended event_id may be dated. An id from
# the future blocks its study until the clock gets there (every later event
# of the study is "not newer"), so the allowance bounds that harm; hosts kept
# by NTP agree to milliseconds, and five minutes is the tolerance Kerberos
# has long used by default for clocks that were never synchronised.
MAX_CLOCK_SKEW = timedelta(minutes=5)


def unstorable(event: EvalEvent) -> str | None:
    """Say why no backend can store ``event`` (a string holding U+0000), else ``None``.

    PostgreSQL's text and jsonb cannot hold U+0000 and embedded libSQL cuts a
    string at it, so such an event is refused on every backend alike.
    """
    texts: list[tuple[str, str | None]]
    if isinstance(event, StudyCreated):
        config = event.config
        texts = [("name", event.name), ("config.description", config.description)]
        texts += [(f"config.tags[{index}]", tag) for index, tag in enumerate(config.tags)]
        for key, value in config.metadata.items():
            texts += [("config.metadata key", key), (f"config.metadata.{key}", value)]
    elif isinstance(event, CheckpointRecorded):
        sessions = event.sessions_included
        # One scan of all the strings; the paths are spelled out only to name a refusal.
        if "\x00" not in "".join(sessions):
            return None
        texts = [(f"sessions_included[{index}]", session) for index, session in enumerate(sessions)]
    else:
        return None
    for path, text in texts:
        if text is not None and "\x00" in text:
            return f"its event.{path} contains U+0000, which PostgreSQL and libSQL cannot store"
    return None


class InlineProjection(Protocol):
    """What ``SqlEventLog.append(..., projection=)`` needs of a projection.

    The log calls both in its own write transaction (holding the log lock):
    ``_before_append`` once, before the first new event is inserted, and
    ``_after_append`` after each chunk of new events, with the log position
    of the chunk's last event.
    """

    @property
    def bind(self) -> _tx.Bind:
        """The projection's bind; it must be on the log's database."""
        ...

    def _before_append(self, connection: sa.Connection, log: SqlEventLog) -> None: ...

    def _after_append(
        self, connection: sa.Connection, events: list[StoredEvalEvent], last_position: int
    ) -> None: ...


class SqlEventLog:
    """An append-only log of ``StoredEvalEvent`` in the ``eval_events`` table.

    ``bind`` is an Engine or a sessionmaker (each call runs and commits its
    own transaction) or a Connection or a Session (each call runs in a
    savepoint of the caller's transaction, which it never ends).
    """

    def __init__(self, bind: _tx.Bind, *, max_clock_skew: timedelta = MAX_CLOCK_SKEW) -> None:
        if max_clock_skew < timedelta(0):
            raise ValueError(f"max_clock_skew must not be negative, got {max_clock_skew}")
        self.bind = _tx.check_bind(bind)
        self.max_clock_skew = max_clock_skew

    def validate(self, stored: StoredEvalEvent) -> None:
        """Raise ``InvalidEventError`` if ``append`` refuses ``stored`` whatever the log holds.

        Refused: an ``event_id`` dated more than ``max_clock_skew`` ahead of
        this clock, and a string holding U+0000 (no backend stores it alike).
        """
        reason = unstorable(stored.event)
        if reason is not None:
            raise InvalidEventError(f"event {stored.event_id} is refused: {reason}")
        # The id's 48-bit millisecond time, compared as integers: an id can
        # carry a time past the year 9999, which no datetime holds.
        ahead = (stored.event_id.int >> 80) - time.time_ns() // 1_000_000
        if ahead > self.max_clock_skew // timedelta(milliseconds=1):
            raise InvalidEventError(
                f"event {stored.event_id} is dated {_describe_ahead(ahead)} ahead of this "
                f"clock, more than the allowed {self.max_clock_skew}; stamp it again "
                "on a host whose clock is right"
            )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({_tx.engine_of(self.bind)!r})"

    def append(
        self,
        events: StoredEvalEvent | Iterable[StoredEvalEvent],
        *,
        projection: InlineProjection | None = None,
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
        if projection is not None and _tx.engine_of(projection.bind) is not _tx.engine_of(
            self.bind
        ):
            raise EvalsError("inline projection needs the log and the projection on one Engine")
        appended = 0
        with _tx.transaction(self.bind) as connection:
            _locks.lock(connection, LOG)
            if projection is not None:
                projection._before_append(connection, self)
            last_of_study: dict[UUID, UUID] = {}
            for chunk in batched(events, _CHUNK):
                new = self._new_events(connection, chunk, last_of_study)
                if not new:
                    continue
                _bulk.insert_rows(
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
                    projection._after_append(
                        connection, [stored for stored, _ in new], self._last_position(connection)
                    )
                appended += len(new)
            if appended:
                _notify(connection)
        return appended

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
                    _bulk.one_of(connection, EventRow.event_id, event_ids)
                )
            ).all()
        )
        unknown = {stored.event.study_id for stored in chunk} - last_of_study.keys()
        if unknown:
            # Log order is event_id order within a study, so the study's last
            # position holds its newest event (PostgreSQL has no max(uuid)).
            newest = (
                sa.select(sa.func.max(EventRow.position).label("position"))
                .where(_bulk.one_of(connection, EventRow.study_id, unknown))
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
            self.validate(stored)
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

    def read(self, after: UUID | None = None, *, limit: int | None = None) -> LogReader:
        """Iterate over the logged events in log order, after the logged event ``after``.

        An ``after`` that is not in the log raises ``EvalsError`` here, not at
        the first ``next()``. Events are fetched in pages, each in its own
        short read, so the log is never held in memory and no cursor stays
        open between pages; each event is decoded as it is drawn, so a row
        edited by hand into an invalid event raises ``InvalidEventError``
        after the events before it.
        """
        if limit is not None and limit < 0:
            raise ValueError(f"limit must not be negative, got {limit}")
        position = 0
        if after is not None:
            with _tx.read(self.bind) as connection:
                found = connection.execute(
                    sa.select(EventRow.position).where(EventRow.event_id == after)
                ).scalar_one_or_none()
            if found is None:
                raise EvalsError(f"event {after} is not in the log")
            position = found
        return LogReader(self, position, limit)

    def fetch(self, after_position: int, limit: int) -> list[tuple[int, StoredEvalEvent]]:
        """Return up to ``limit`` events after ``after_position``, with their positions.

        Inside a write transaction of this database (a projection catching
        up), the read runs in that transaction.
        """
        return [
            (position, _stored(event_id, _decode_payload(payload)))
            for position, event_id, payload in self._fetch_rows(after_position, limit)
        ]

    def _fetch_rows(self, after_position: int, limit: int) -> Sequence[_LogRow]:
        """Return up to ``limit`` rows after ``after_position``, their payloads not decoded."""
        statement = (
            sa.select(EventRow.position, EventRow.event_id, EventRow.payload)
            .where(EventRow.position > after_position)
            .order_by(EventRow.position)
            .limit(limit)
        )
        with _tx.read(self.bind) as connection:
            return connection.execute(statement).all()

    def count(self) -> int:
        """Return how many events the log holds."""
        with _tx.read(self.bind) as connection:
            count: int = connection.execute(
                sa.select(sa.func.count()).select_from(EventRow)
            ).scalar_one()
        return count


def _describe_ahead(millis: int) -> str:
    seconds = round(millis / 1000)
    days = seconds // 86_400
    if days:
        return "1 day" if days == 1 else f"{days} days"
    return str(timedelta(seconds=seconds))


def _notify(connection: sa.Connection) -> None:
    """Tell listening followers that the log grew, where the backend can.

    A NOTIFY sent inside the appending transaction is delivered only when it
    commits (and never if it rolls back), so a follower never wakes before
    the events are visible to it.
    """
    if _tx.backend(connection.engine).notifies:
        connection.execute(sa.select(sa.func.pg_notify(CHANNEL, "")))


class LogReader(Iterator[StoredEvalEvent]):
    """The iterator ``SqlEventLog.read`` returns; it knows the log position it has reached.

    A projection rebuilt from a reader that started at the beginning of the
    log records that position, so its next ``catch_up`` starts there; one
    with no ``limit`` (``None``) also takes in what was logged meanwhile.
    """

    def __init__(self, log: SqlEventLog, position: int, limit: int | None) -> None:
        self.log = log
        self.start = position
        self.position = position
        self.limit = limit
        self._remaining = limit
        self._page: Sequence[_LogRow] = ()
        self._index = 0
        self._exhausted = False

    def __next__(self) -> StoredEvalEvent:
        if not self._fetched() and not self._fetch():
            raise StopIteration
        # Decoded one at a time, not a page at once: an event the caller
        # drops is freed before the cyclic collector ever sees it (a page of
        # decoded events outlives young collections, and the full ones it
        # then triggers traverse the caller's whole heap), and an invalid
        # one is raised after the events before it.
        position, event_id, payload = self._page[self._index]
        stored = _stored(event_id, _decode_payload(payload))
        self._index += 1
        self.position = position
        if self._remaining is not None:
            self._remaining -= 1
        return stored

    def _fetched(self) -> bool:
        """Return whether the next event's row is at hand: ``next()`` then reads nothing."""
        return self._index < len(self._page)

    def _fetch(self) -> bool:
        """Read the next page of rows (the current one used up); return whether it has any."""
        size = _CHUNK if self._remaining is None else min(_CHUNK, self._remaining)
        if self._exhausted or size == 0:
            return False
        self._page = self.log._fetch_rows(self.position, size)
        self._index = 0
        self._exhausted = len(self._page) < size
        return bool(self._page)


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
