"""The services for asyncio applications: the sync services, run on the async connection.

``AsyncSqlEventLog``, ``AsyncSqlEvalProjection`` and ``AsyncSqlEvalStorage``
hold the sync service bound to the sync face of their bind (an
``AsyncEngine``'s ``sync_engine``, an ``AsyncConnection``'s
``sync_connection``, an ``AsyncSession``'s ``sync_session``) and run each
call of it in SQLAlchemy's greenlet bridge, as ``AsyncConnection.run_sync``
does: every statement is awaited on the event loop, and the rules - the log's
checks, the projection's fold, the queries - exist once, in the sync code.
So the async classes bind exactly as the sync ones do: given an
``AsyncConnection`` or an ``AsyncSession`` they work in the caller's
transaction (a savepoint per call, never a commit); given an ``AsyncEngine``
or an ``async_sessionmaker`` they run and commit their own transactions.

A writer that must wait for another (the SQLite family's writer slot)
awaits, so the loop's other tasks run meanwhile. A task cancelled in the
middle of a call (``asyncio.timeout``) rolls back the transaction it was in;
committed batches stay, and the next call goes on from there.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterable, AsyncIterator, Callable, Coroutine, Iterable, Iterator
from typing import Any, Concatenate, Generic, ParamSpec, TypeVar, Union, overload
from uuid import UUID

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.util import await_, greenlet_spawn

from evals_orm import _tx
from evals_orm.errors import DatabaseError
from evals_orm.eventlog import LogReader, SqlEventLog
from evals_orm.events import StoredEvalEvent
from evals_orm.projection import Lag, SqlEvalProjection, Stop
from evals_orm.storage import SqlEvalStorage

__all__ = [
    "AsyncBind",
    "AsyncLogReader",
    "AsyncSqlEvalProjection",
    "AsyncSqlEvalStorage",
    "AsyncSqlEventLog",
]

AsyncBind = Union[AsyncEngine, "async_sessionmaker[AsyncSession]", AsyncConnection, AsyncSession]

_ACCEPTED = "an AsyncEngine, an async_sessionmaker, an AsyncConnection or an AsyncSession"

_S = TypeVar("_S", SqlEventLog, SqlEvalProjection, SqlEvalStorage)
_P = ParamSpec("_P")
_R = TypeVar("_R")

Events = Union[Iterable[StoredEvalEvent], AsyncIterable[StoredEvalEvent]]  # noqa: UP007 (3.10 aliases)


def _sync_face(bind: object) -> _tx.Bind:
    """Return the sync face of an async bind; raise ``TypeError`` for anything else."""
    if isinstance(bind, AsyncEngine):
        return bind.sync_engine
    if isinstance(bind, AsyncSession):
        return bind.sync_session
    if isinstance(bind, AsyncConnection):
        return _started(bind)
    if isinstance(bind, async_sessionmaker):
        # Sessions of the same configuration, on the sync face of its bind:
        # each call then runs and commits its own transactions, as with a
        # sync sessionmaker.
        options = dict(bind.kw)
        target = options.pop("bind", None)
        session_class = options.pop("sync_session_class", None) or Session
        if isinstance(target, AsyncEngine):
            return sessionmaker(target.sync_engine, class_=session_class, **options)
        if isinstance(target, AsyncConnection):
            return sessionmaker(_started(target), class_=session_class, **options)
        raise TypeError("the async_sessionmaker must be bound to an AsyncEngine or AsyncConnection")
    raise TypeError(f"bind must be {_ACCEPTED}, not {type(bind).__name__}")


def _started(connection: AsyncConnection) -> sa.Connection:
    if connection.sync_connection is None:
        raise TypeError(
            "the AsyncConnection is not started; use it inside 'async with engine.connect()'"
        )
    return connection.sync_connection


class _AsyncService(Generic[_S]):
    """An async service: its sync twin ``sync``, whose calls run on the event loop."""

    sync: _S

    def __init__(self, bind: AsyncBind) -> None:
        self.bind = bind

    def __repr__(self) -> str:
        return f"{type(self).__name__}({_tx.engine_of(self.sync.bind)!r})"


class _Coroutine(Generic[_S, _P, _R]):
    """A method of the sync service, as a coroutine method of its async twin."""

    def __init__(self, method: Callable[Concatenate[_S, _P], _R]) -> None:
        self._name = method.__name__
        self.__doc__ = method.__doc__

    @overload
    def __get__(self, instance: None, owner: type[Any]) -> _Coroutine[_S, _P, _R]: ...

    @overload
    def __get__(
        self, instance: _AsyncService[_S], owner: type[Any]
    ) -> Callable[_P, Coroutine[Any, Any, _R]]: ...

    def __get__(
        self, instance: _AsyncService[_S] | None, owner: type[Any]
    ) -> _Coroutine[_S, _P, _R] | Callable[_P, Coroutine[Any, Any, _R]]:
        if instance is None:
            return self
        method: Callable[_P, _R] = getattr(instance.sync, self._name)

        @functools.wraps(method)
        async def call(*args: _P.args, **kwargs: _P.kwargs) -> _R:
            return await greenlet_spawn(functools.partial(method, *args, **kwargs))

        return call


class _Pull(Iterator[StoredEvalEvent]):
    """A sync iterator over an async iterable, for sync code running in the bridge.

    Each ``next`` awaits the async iterator's next item on the event loop,
    so the events are consumed as lazily as the sync code consumes them.
    """

    def __init__(self, events: AsyncIterable[StoredEvalEvent]) -> None:
        self._events = aiter(events)

    def __next__(self) -> StoredEvalEvent:
        try:
            return await_(anext(self._events))
        except StopAsyncIteration:
            raise StopIteration from None


def _sync_events(events: Events) -> Iterable[StoredEvalEvent]:
    """Return ``events`` as the iterable the sync service takes; call it in the bridge."""
    if isinstance(events, AsyncLogReader):
        return events.sync_reader()
    if isinstance(events, AsyncIterable):
        return _Pull(events)
    return events


class AsyncSqlEventLog(_AsyncService[SqlEventLog]):
    """``SqlEventLog`` for asyncio: the same methods, as coroutines.

    ``bind`` is an AsyncEngine or an async_sessionmaker (each call runs and
    commits its own transaction) or an AsyncConnection or an AsyncSession
    (each call runs in a savepoint of the caller's transaction, which it
    never ends).
    """

    def __init__(self, bind: AsyncBind) -> None:
        super().__init__(bind)
        self.sync = SqlEventLog(_sync_face(bind))

    async def append(
        self,
        events: StoredEvalEvent | Events,
        *,
        projection: AsyncSqlEvalProjection | None = None,
    ) -> int:
        """Append one event or an iterable (sync or async) in one transaction; return how many.

        The rules are ``SqlEventLog.append``'s; given a ``projection`` on the
        same database, the new events are projected in the same transaction.
        """
        inline = None if projection is None else projection.sync
        if isinstance(events, StoredEvalEvent):
            return await greenlet_spawn(self.sync.append, events, projection=inline)
        return await greenlet_spawn(
            lambda: self.sync.append(_sync_events(events), projection=inline)
        )

    def read(self, after: UUID | None = None, *, limit: int | None = None) -> AsyncLogReader:
        """Iterate asynchronously over the logged events in log order, after event ``after``.

        ``async for stored in log.read()``. An ``after`` that is not in the
        log raises ``EvalsError`` at the first step.
        """
        return AsyncLogReader(functools.partial(self.sync.read, after, limit=limit))

    count = _Coroutine(SqlEventLog.count)


class AsyncLogReader(AsyncIterator[StoredEvalEvent]):
    """The async iterator ``AsyncSqlEventLog.read`` returns.

    Events come from the log in pages, each fetched in its own short read on
    the event loop; none is held between pages. As with the sync reader,
    each event is decoded as it is drawn.
    """

    def __init__(self, open_reader: Callable[[], LogReader]) -> None:
        self._open_reader = open_reader
        self._reader: LogReader | None = None

    def sync_reader(self) -> LogReader:
        """Return the log's own reader, at the events not yet yielded; call it in the bridge.

        A projection rebuilt from it, untouched, records the position it
        replayed to.
        """
        if self._reader is None:
            self._reader = self._open_reader()
        return self._reader

    async def __anext__(self) -> StoredEvalEvent:
        reader = self._reader
        if reader is None:
            reader = await greenlet_spawn(self.sync_reader)
        # Only reading a page goes through the bridge; decoding does not.
        if not reader._fetched() and not await greenlet_spawn(reader._fetch):
            raise StopAsyncIteration
        return next(reader)


class AsyncSqlEvalProjection(_AsyncService[SqlEvalProjection]):
    """``SqlEvalProjection`` for asyncio: the same methods, as coroutines.

    ``bind`` as for ``AsyncSqlEventLog``. ``apply_many`` and ``rebuild``
    take an iterable or an async iterable, consumed lazily in batches.
    """

    def __init__(self, bind: AsyncBind, *, batch_size: int | None = None) -> None:
        super().__init__(bind)
        self.sync = SqlEvalProjection(_sync_face(bind), batch_size=batch_size)

    @property
    def batch_size(self) -> int:
        """How many events one write transaction takes."""
        return self.sync.batch_size

    async def apply_many(self, events: Events) -> int:
        """Apply ``events`` in transactions of ``batch_size``; return how many were new.

        On an invalid event, or a cancellation, the batches before the one
        it happens in stay committed.
        """
        return await greenlet_spawn(lambda: self.sync.apply_many(_sync_events(events)))

    async def rebuild(
        self,
        events: Events | AsyncSqlEventLog,
        *,
        on_progress: Callable[[int], None] | None = None,
    ) -> int:
        """Replace the projection by replaying ``events``; return how many were applied.

        As ``SqlEvalProjection.rebuild``: the events are replayed into the
        rebuild tables a batch per transaction, then one short transaction
        writes the rows that differ, so readers see the old projection until
        then and the new one whole after; given the log or a fresh
        ``log.read()``, the position replayed to is recorded for the next
        ``catch_up``.
        """
        if isinstance(events, AsyncSqlEventLog):
            return await greenlet_spawn(self.sync.rebuild, events.sync, on_progress=on_progress)
        return await greenlet_spawn(
            lambda: self.sync.rebuild(_sync_events(events), on_progress=on_progress)
        )

    async def catch_up(self, log: AsyncSqlEventLog) -> int:
        """Apply every logged event not applied yet, in log order; return how many."""
        return await greenlet_spawn(self.sync.catch_up, log.sync)

    async def lag(self, log: AsyncSqlEventLog) -> Lag:
        """Return how far the projection is behind ``log`` (``applied`` is 0); takes no lock."""
        return await greenlet_spawn(self.sync.lag, log.sync)

    async def follow(
        self,
        log: AsyncSqlEventLog,
        *,
        poll_interval: float | None = None,
        stop: Stop = None,
        on_progress: Callable[[Lag], None] | None = None,
        on_error: Callable[[DatabaseError], None] | None = None,
    ) -> int:
        """Keep the projection caught up with ``log`` until ``stop``; return how many were applied.

        ``SqlEvalProjection.follow`` on the event loop, for a follower task
        of an asyncio service: ``stop`` is best an ``asyncio.Event`` (its
        waits end as soon as it is set; a ``threading.Event`` or a callable
        is looked at every 50 ms), and every wait awaits - on PostgreSQL a
        ``LISTEN`` on a connection of its own - so the loop's other tasks
        run meanwhile. Once ``stop`` is set, the batch in hand is committed
        and the call returns; cancelling the task instead rolls that batch
        back (the batches before it stay). ``on_progress`` and ``on_error``
        are called on the loop: they must not block.
        """
        return await greenlet_spawn(
            self.sync.follow,
            log.sync,
            poll_interval=poll_interval,
            stop=stop,
            on_progress=on_progress,
            on_error=on_error,
        )

    apply = _Coroutine(SqlEvalProjection.apply)
    clear = _Coroutine(SqlEvalProjection.clear)


class AsyncSqlEvalStorage(_AsyncService[SqlEvalStorage]):
    """``SqlEvalStorage`` for asyncio: the same queries, as coroutines.

    ``bind`` as for ``AsyncSqlEventLog``; given an AsyncConnection or an
    AsyncSession, the reads see its uncommitted writes.
    """

    def __init__(self, bind: AsyncBind) -> None:
        super().__init__(bind)
        self.sync = SqlEvalStorage(_sync_face(bind))

    get_study = _Coroutine(SqlEvalStorage.get_study)
    list_studies = _Coroutine(SqlEvalStorage.list_studies)
    list_studies_by_status = _Coroutine(SqlEvalStorage.list_studies_by_status)
    get_checkpoints = _Coroutine(SqlEvalStorage.get_checkpoints)
    get_latest_checkpoint = _Coroutine(SqlEvalStorage.get_latest_checkpoint)
    get_checkpoints_in_range = _Coroutine(SqlEvalStorage.get_checkpoints_in_range)
    checkpoint_counts = _Coroutine(SqlEvalStorage.checkpoint_counts)
