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

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from datetime import datetime
from typing import Any, Protocol

import attrs
import sqlalchemy as sa

from evals_orm import _tx
from evals_orm.errors import CredentialsError, DatabaseError, SchemaMissingError
from evals_orm.eventlog import CHANNEL, SqlEventLog
from evals_orm.events import uuid7_time
from evals_orm.models import EventRow, TrackingRow

__all__ = ["Backoff", "Lag", "Stop", "Stopping", "is_transient", "lag", "waiter"]

Stop = threading.Event | Callable[[], bool] | None

# How often a wait that cannot be interrupted looks at the stop signal.
_STOP_CHECK_S = 0.05
# A wait that cannot be woken by the stop signal (LISTEN) is cut into slices this long.
_LISTEN_SLICE_S = 0.5
# The first poll after the follower applied something, as a share of the poll interval.
_EAGER_SHARE = 1 / 16


class Stopping:
    """The stop signal of ``follow``: a ``threading.Event``, a callable, or never."""

    def __init__(self, stop: Stop) -> None:
        self._stop = stop

    def is_set(self) -> bool:
        """Return whether the follower should stop."""
        if self._stop is None:
            return False
        if isinstance(self._stop, threading.Event):
            return self._stop.is_set()
        return bool(self._stop())

    def wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds``, less if the signal is set meanwhile; return whether it is."""
        if isinstance(self._stop, threading.Event):
            return self._stop.wait(seconds)
        deadline = time.monotonic() + seconds
        while not self.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            time.sleep(min(remaining, _STOP_CHECK_S))
        return True


@attrs.frozen
class Lag:
    """Where a follower stands: what it applied, what is left, how old the projection is."""

    applied: int  # events this follower has applied so far
    behind: int  # events logged but not projected yet
    newest_applied_at: datetime | None  # when the newest projected event occurred


def lag(bind: _tx.Bind, log: SqlEventLog, name: str, applied: int) -> Lag:
    """Read the projection's position (tracking row ``name``) against the end of ``log``.

    Two short reads, no lock: an idle follower must not keep writers out.
    """
    with _tx.read(bind) as connection:
        position: int = (
            connection.execute(
                sa.select(TrackingRow.position).where(TrackingRow.name == name)
            ).scalar_one_or_none()
            or 0
        )
    with _tx.read(log.bind) as connection:
        last, newest = connection.execute(
            sa.select(
                sa.select(sa.func.max(EventRow.position)).scalar_subquery(),
                sa.select(EventRow.event_id).where(EventRow.position == position).scalar_subquery(),
            )
        ).one()
    newest_at = None if newest is None else uuid7_time(newest)
    return Lag(applied, max((last or 0) - position, 0), newest_at)


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


class _Poller:
    """Polls: soon after activity, then doubling up to the poll interval while idle."""

    def __init__(self, interval: float, stopping: Stopping) -> None:
        self._interval = interval
        self._stopping = stopping
        self._delay = interval

    def wait(self) -> None:
        self._stopping.wait(self._delay)
        self._delay = min(self._delay * 2, self._interval)

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


@contextmanager
def waiter(log: SqlEventLog, interval: float, stopping: Stopping) -> Iterator[Waiter]:
    """Yield the waiter for ``log``'s backend; it is listening before the first look."""
    engine = _tx.engine_of(log.bind)
    if not _tx.backend(engine).notifies:
        yield _Poller(interval, stopping)
        return
    listener = _Listener(engine, interval, stopping)
    try:
        yield listener
    finally:
        listener.close()
