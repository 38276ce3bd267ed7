"""What a follower of the log needs: its stop signal, its lag, and how it waits for appends.

A follower looks at the log with one cheap read (no lock) and takes the
projection lock only when there is something to apply, so an idle follower
never holds a writer out. Between looks it waits:

- on PostgreSQL, on its own connection that ``LISTEN``s to the channel an
  append notifies in its transaction, so it wakes as soon as an append
  commits; a look every ``poll_interval`` is only the safety net;
- elsewhere, by polling: right after it applied something it looks again
  soon, and the wait doubles up to ``poll_interval`` while the log is idle.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from datetime import datetime
from typing import Any, Protocol

import attrs
import sqlalchemy as sa
from sqlalchemy.util import await_
from sqlalchemy.util.concurrency import in_greenlet

from evals_orm import _tx
from evals_orm.errors import CredentialsError, DatabaseError, SchemaMissingError
from evals_orm.eventlog import CHANNEL, SqlEventLog
from evals_orm.events import uuid7_time
from evals_orm.models import EventRow, TrackingRow

__all__ = ["Backoff", "Lag", "Stop", "Stopping", "is_transient", "lag", "waiter"]

Stop = threading.Event | asyncio.Event | Callable[[], bool] | None

# How often a wait that cannot be interrupted looks at the stop signal.
_STOP_CHECK_S = 0.05
# A wait that cannot be woken by the stop signal (LISTEN) is cut into slices this long.
_LISTEN_SLICE_S = 0.5
# The first poll after the follower applied something, as a share of the poll interval.
_EAGER_SHARE = 1 / 16
# A follower watching a file still reads the log every this many polls (in
# case a change escapes ``stat``, e.g. a file replaced within one tick).
_UNWATCHED_POLLS = 10
# How long a database file must be still before ``stat`` alone is trusted:
# longer than a commit takes from its write to its visibility on a busy
# machine, and than the tick of the clock that stamps modification times.
_STILL_NS = 250_000_000


class Stopping:
    """The stop signal of ``follow``: a threading or asyncio ``Event``, a callable, or never.

    In an event loop's greenlet (``AsyncSqlEvalProjection.follow``) its
    waits await, so the loop's other tasks run meanwhile.
    """

    def __init__(self, stop: Stop) -> None:
        self._stop = stop

    def is_set(self) -> bool:
        """Return whether the follower should stop."""
        if self._stop is None:
            return False
        if isinstance(self._stop, (threading.Event, asyncio.Event)):
            return self._stop.is_set()
        return bool(self._stop())

    def wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds``, less if the signal is set meanwhile; return whether it is."""
        if in_greenlet():
            return await_(self._wait_async(seconds))
        if isinstance(self._stop, threading.Event):
            return self._stop.wait(seconds)
        deadline = time.monotonic() + seconds
        while not self.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            time.sleep(min(remaining, _STOP_CHECK_S))
        return True

    async def _wait_async(self, seconds: float) -> bool:
        if isinstance(self._stop, asyncio.Event):
            # asyncio.wait, which never drops the task's cancellation (see
            # WriterSlot's wait for why not wait_for).
            waiting = asyncio.ensure_future(self._stop.wait())
            try:
                await asyncio.wait((waiting,), timeout=seconds)
            finally:
                waiting.cancel()
            return self._stop.is_set()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while not self.is_set():
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            await asyncio.sleep(min(remaining, _STOP_CHECK_S))
        return True


@attrs.frozen
class Lag:
    """Where a follower stands: what it applied, what is left, how old the projection is."""

    applied: int  # events this follower has applied so far
    behind: int  # events logged but not projected yet
    newest_applied_at: datetime | None  # when the newest projected event occurred


def lag(bind: _tx.Bind, log: SqlEventLog, name: str, applied: int) -> Lag:
    """Read the projection's position (tracking row ``name``) against the end of ``log``.

    One short read where both share an Engine (else two), and no lock: an
    idle follower must not keep writers out.
    """
    tracked = sa.select(TrackingRow.position).where(TrackingRow.name == name).scalar_subquery()
    position: sa.ColumnElement[int] = sa.func.coalesce(tracked, 0)
    if _tx.engine_of(bind) is not _tx.engine_of(log.bind):
        with _tx.read(bind) as connection:
            position = sa.literal(connection.execute(sa.select(position)).scalar_one())
    with _tx.read(log.bind) as connection:
        reached, last, newest = connection.execute(
            sa.select(
                position,
                sa.select(sa.func.max(EventRow.position)).scalar_subquery(),
                sa.select(EventRow.event_id).where(EventRow.position == position).scalar_subquery(),
            )
        ).one()
    newest_at = None if newest is None else uuid7_time(newest)
    return Lag(applied, max((last or 0) - reached, 0), newest_at)


def is_transient(error: DatabaseError) -> bool:
    """Return whether retrying may cure ``error`` (a lost connection), unlike a missing schema."""
    return not isinstance(error, (SchemaMissingError, CredentialsError))


class Backoff:
    """Delays between retries after a database error: 0.5 s doubling up to 30 s."""

    FIRST_S = 0.5
    MAX_S = 30.0

    def __init__(self) -> None:
        self._next = 0.0

    @property
    def in_incident(self) -> bool:
        """Whether the last attempt failed (a retry is under way)."""
        return self._next > 0

    def next_delay(self) -> float:
        """Return the delay before the next retry, and grow it."""
        delay = self._next or self.FIRST_S
        self._next = min(delay * 2, self.MAX_S)
        return delay

    def reset(self) -> None:
        """Forget the incident: an attempt succeeded."""
        self._next = 0.0


class Waiter(Protocol):
    """Waits for the log to grow between two looks at it."""

    def wait(self) -> None:
        """Return when the log may have grown, the poll interval passed, or the stop is set."""
        ...

    def active(self) -> None:
        """Note that the last look found events (the log is busy)."""
        ...


class _FileWatch:
    """Tells whether a local database file (or its WAL) may have changed, from ``stat`` alone.

    Every commit writes the WAL (or, without one, the file), so an unchanged
    size, inode and modification time mean nothing was committed: a poll
    then costs a system call instead of a query. But a commit writes the
    file before it becomes visible (measured: a look right after the write
    can miss it), and the kernel stamps modification times with a coarse
    clock; so after the files changed, polls keep counting as changes until
    they have been still for ``_STILL_NS``.
    """

    def __init__(self, path: str) -> None:
        self._paths = (path, f"{path}-wal")
        self._last = self._signature()
        self._moving = True

    def _signature(self) -> tuple[tuple[int, int, int] | None, ...]:
        signature: list[tuple[int, int, int] | None] = []
        for path in self._paths:
            try:
                found = os.stat(path)
            except OSError:
                signature.append(None)
            else:
                signature.append((found.st_ino, found.st_size, found.st_mtime_ns))
        return tuple(signature)

    def changed(self) -> bool:
        """Return whether a commit may have happened since the last call."""
        signature = self._signature()
        now = time.time_ns()
        changed = self._moving or signature != self._last
        self._moving = signature != self._last or any(
            found is not None and now - found[2] < _STILL_NS for found in signature
        )
        self._last = signature
        return changed


class _Poller:
    """Polls: soon after activity, then doubling up to the poll interval while idle.

    With a ``_FileWatch``, a poll that finds the files unchanged goes back to
    sleep; the log is still read at least every ``_UNWATCHED_POLLS`` polls.
    """

    def __init__(self, interval: float, stopping: Stopping, watch: _FileWatch | None) -> None:
        self._interval = interval
        self._stopping = stopping
        self._watch = watch
        self._delay = interval

    def wait(self) -> None:
        for _ in range(_UNWATCHED_POLLS):
            if self._stopping.wait(self._delay):
                return
            self._delay = min(self._delay * 2, self._interval)
            if self._watch is None or self._watch.changed():
                return

    def active(self) -> None:
        self._delay = self._interval * _EAGER_SHARE


class _Listener:
    """Waits on a PostgreSQL connection of its own that LISTENs to the log's channel."""

    def __init__(self, engine: sa.Engine, interval: float, stopping: Stopping) -> None:
        self._interval = interval
        self._stopping = stopping
        self._errors: type[Exception] = engine.dialect.loaded_dbapi.Error
        with self._translated():
            proxy = engine.raw_connection()
            # Out of the pool for good: no other checkout may inherit the LISTEN.
            proxy.detach()
            connection: Any = proxy.dbapi_connection
            self._connection = connection
            self._connection.autocommit = True
            self._connection.execute(f"LISTEN {CHANNEL}")

    @contextmanager
    def _translated(self) -> Iterator[None]:
        # The raw driver connection bypasses SQLAlchemy's error wrapping.
        try:
            yield
        except self._errors as error:
            message = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
            raise DatabaseError(f"the database connection failed: {message}") from error

    def wait(self) -> None:
        deadline = time.monotonic() + self._interval
        with self._translated():
            while not self._stopping.is_set():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                slice_s = min(remaining, _LISTEN_SLICE_S)
                if any(True for _ in self._connection.notifies(timeout=slice_s, stop_after=1)):
                    # Several appends may have committed meanwhile: one look covers them all.
                    for _ in self._connection.notifies(timeout=0):
                        pass
                    return

    def active(self) -> None:
        pass

    def close(self) -> None:
        # A connection already lost has nothing left to release.
        with suppress(self._errors):
            self._connection.close()


class _AsyncListener(_Listener):
    """``_Listener`` on an async engine: psycopg's async connection, awaited in the greenlet."""

    def __init__(self, engine: sa.Engine, interval: float, stopping: Stopping) -> None:
        self._interval = interval
        self._stopping = stopping
        self._errors = engine.dialect.loaded_dbapi.Error
        with self._translated():
            proxy = engine.raw_connection()
            # The driver's own AsyncConnection: SQLAlchemy's adapter has no notifies().
            connection: Any = proxy.driver_connection
            proxy.detach()
            self._connection = connection
            await_(connection.set_autocommit(True))
            await_(connection.execute(f"LISTEN {CHANNEL}"))

    def wait(self) -> None:
        with self._translated():
            await_(self._wait())

    async def _wait(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._interval
        while not self._stopping.is_set():
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            slice_s = min(remaining, _LISTEN_SLICE_S)
            heard = False
            async for _ in self._connection.notifies(timeout=slice_s, stop_after=1):
                heard = True
            if heard:
                async for _ in self._connection.notifies(timeout=0):
                    pass
                return

    def close(self) -> None:
        with suppress(self._errors):
            await_(self._connection.close())


@contextmanager
def waiter(log: SqlEventLog, interval: float, stopping: Stopping) -> Iterator[Waiter]:
    """Yield the waiter for ``log``'s backend; it is listening before the first look."""
    engine = _tx.engine_of(log.bind)
    backend = _tx.backend(engine)
    if not backend.notifies:
        local_file = backend.family == "sqlite" and not backend.remote and not backend.in_memory
        database = engine.url.database
        watch = _FileWatch(database) if local_file and database else None
        yield _Poller(interval, stopping, watch)
        return
    listener = (_AsyncListener if engine.dialect.is_async else _Listener)(
        engine, interval, stopping
    )
    try:
        yield listener
    finally:
        listener.close()
