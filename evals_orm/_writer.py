"""The writer slot: how writers of one database in this process wait for each other.

SQLite, embedded libSQL and remote libSQL take one writer at a time. Writers
of this process queue for a per-database slot in Python, before the database
lock: the libSQL driver keeps the GIL while it waits on a locked database, so
a thread waiting there would freeze the thread that holds the lock (measured:
a 30 s stall). The slot is held for the whole write transaction - from its
first write to the driver's commit or rollback - by an owner: the running
asyncio task, else the thread. A second transaction of the same owner can
never get it (its first transaction cannot end while it waits), so it fails
at once with an error that says what to do.

Every write on an Engine handed to the services takes the slot, the host
application's own writes included, so a host Session and the services'
transactions queue in the same line.

Where the database queues its writers itself (PostgreSQL's row locks), only
the lock rows the services take are recorded, to refuse at once a wait for
a lock row held by another transaction of the same owner.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.util import await_
from sqlalchemy.util.concurrency import in_greenlet

from evals_orm._backend import backend_of
from evals_orm.errors import DatabaseError

__all__ = ["WriterSlot", "before_lock", "install", "locked", "owner", "pause", "slot_of"]

# As long as the busy timeout the engines set: a writer that waits longer
# would have failed inside the database too.
WAIT_S = 30.0

_READS = ("SELECT", "PRAGMA", "EXPLAIN", "SAVEPOINT", "RELEASE", "ROLLBACK")


def pause(seconds: float) -> None:
    """Sleep ``seconds``; in an event loop's greenlet (async services), without blocking it."""
    if in_greenlet():
        await_(asyncio.sleep(seconds))
    else:
        time.sleep(seconds)


def owner() -> object:
    """Return who is writing: the running asyncio task, else the current thread."""
    try:
        task = asyncio.current_task()
    except RuntimeError:
        task = None
    return task if task is not None else threading.current_thread()


class WriterSlot:
    """One writer transaction at a time per database, among this process's connections."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._holder: object | None = None  # the DBAPI connection of the writing transaction
        self._owner: object | None = None
        self._waiters: list[Callable[[], None]] = []

    def try_acquire(self, holder: object, who: object) -> bool:
        """Take the slot for ``holder`` if it is free (or already ``holder``'s); never wait.

        Raise ``DatabaseError`` if ``who`` already writes through another
        connection: waiting could never end.
        """
        with self._condition:
            return self._try(holder, who)

    def _try(self, holder: object, who: object) -> bool:
        if self._holder is None:
            self._holder, self._owner = holder, who
            return True
        if self._holder is holder:
            # In-memory databases share one connection between threads: the
            # same connection of another owner is another writer.
            return self._owner is who
        if self._owner is who:
            raise DatabaseError(_SELF_WAIT)
        return False

    def acquire(self, holder: object, who: object) -> None:
        """Take the slot, waiting (without the GIL) up to ``WAIT_S`` for another owner.

        Sync code an event loop runs in SQLAlchemy's greenlet (an async
        engine's writes) waits by awaiting, so the loop's other tasks - the
        slot's holder among them - keep running.
        """
        if in_greenlet():
            await_(self._acquire_async(holder, who))
            return
        deadline = time.monotonic() + WAIT_S
        with self._condition:
            while not self._try(holder, who):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise DatabaseError(_TIMEOUT)
                self._condition.wait(remaining)

    async def _acquire_async(self, holder: object, who: object) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + WAIT_S
        while not self.try_acquire(holder, who):
            released = loop.create_future()
            self.notify_on_release(_waker(loop, released))
            # asyncio.wait, not wait_for: before Python 3.12, wait_for returns
            # the result of a future done in the same turn as the task's
            # cancellation and drops the cancellation (the write went on).
            await asyncio.wait((released,), timeout=max(deadline - loop.time(), 0))
            if not released.done():
                raise DatabaseError(_TIMEOUT)

    def release(self, holder: object) -> None:
        """Free the slot if ``holder`` has it, and wake the waiters."""
        with self._condition:
            if self._holder is not holder:
                return
            self._holder = self._owner = None
            waiters, self._waiters = self._waiters, []
            self._condition.notify_all()
        for wake in waiters:
            wake()

    def notify_on_release(self, wake: Callable[[], None]) -> None:
        """Call ``wake`` once the slot is next released (an async waiter's hook)."""
        with self._condition:
            if self._holder is None:
                wake_now = True
            else:
                self._waiters.append(wake)
                wake_now = False
        if wake_now:
            wake()


def _waker(loop: asyncio.AbstractEventLoop, future: asyncio.Future[None]) -> Callable[[], None]:
    """Return a callback, safe from any thread, that resolves ``future`` on ``loop``."""

    def wake() -> None:
        # The slot may be released on another thread (a sync engine's
        # writer): the loop is woken through its own queue.
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits any more
            loop.call_soon_threadsafe(_resolve, future)

    return wake


def _resolve(future: asyncio.Future[None]) -> None:
    # A waiter cancelled meanwhile has a done future; nothing to wake.
    if not future.done():
        future.set_result(None)


_TIMEOUT = (
    f"another writer kept this database for {WAIT_S:.0f} s; retry once its transaction has ended"
)

_SELF_WAIT = (
    "this thread (or task) already has an open write transaction on this "
    "database, so this write would wait for itself; pass that Session or "
    "Connection to evals_orm, or commit it first"
)


class _Database:
    """What this process knows of the writers of one database."""

    def __init__(self) -> None:
        self.writer = WriterSlot()
        # Lock rows held, by name: (holder, owner). Only where the database
        # itself queues the writers (PostgreSQL); there the table is only read
        # to refuse a wait that could never end.
        self._locks: dict[str, tuple[object, object]] = {}
        self._guard = threading.Lock()

    def before_lock(self, name: str, holder: object, who: object) -> None:
        """Refuse to wait for lock row ``name`` if ``who`` holds it through another connection."""
        with self._guard:
            held = self._locks.get(name)
        if held is not None and held[1] is who and held[0] is not holder:
            raise DatabaseError(_SELF_WAIT)

    def locked(self, name: str, holder: object, who: object) -> None:
        """Record that ``holder`` (of ``who``) now holds lock row ``name``."""
        with self._guard:
            self._locks[name] = (holder, who)

    def release(self, holder: object) -> None:
        """Forget everything ``holder`` held: its transaction has ended."""
        self.writer.release(holder)
        with self._guard:
            for name in [name for name, held in self._locks.items() if held[0] is holder]:
                del self._locks[name]


_DATABASES: dict[str, _Database] = {}
_GUARD = threading.Lock()
_INSTALLED = "_evals_orm_writers_installed"
_DATABASE = "_evals_orm_database"


def _database_of(engine: sa.Engine) -> _Database:
    """Return the writers of ``engine``'s database, shared by every Engine on it."""
    with _GUARD:
        if backend_of(engine).in_memory:
            # Each in-memory Engine is its own database.
            database: _Database | None = getattr(engine.dialect, _DATABASE, None)
            if database is None:
                database = _Database()
                setattr(engine.dialect, _DATABASE, database)
            return database
        # Files and servers are named by their URL.
        return _DATABASES.setdefault(engine.url.render_as_string(), _Database())


def slot_of(engine: sa.Engine) -> WriterSlot:
    """Return the writer slot of ``engine``'s database."""
    return _database_of(engine).writer


def before_lock(connection: sa.Connection, name: str) -> None:
    """Refuse at once a lock row this thread (or task) holds through another connection."""
    if not backend_of(connection.engine).single_writer:
        holder = _dbapi(connection.connection)
        _database_of(connection.engine).before_lock(name, holder, owner())


def locked(connection: sa.Connection, name: str) -> None:
    """Record that ``connection``'s transaction holds lock row ``name`` until it ends."""
    if not backend_of(connection.engine).single_writer:
        _database_of(connection.engine).locked(name, _dbapi(connection.connection), owner())


def _dbapi(connection: Any) -> object:
    """Return the raw DBAPI connection behind a pool proxy (or itself)."""
    return getattr(connection, "dbapi_connection", connection)


def install(engine: sa.Engine) -> None:
    """Make ``engine``'s writers take the slot, and its savepoints transactional (idempotent)."""
    dialect = engine.dialect
    with _GUARD:
        if getattr(dialect, _INSTALLED, False):
            return
        setattr(dialect, _INSTALLED, True)
    database = _database_of(engine)
    # SQLAlchemy's commit and rollback events fire before the driver call; a
    # transaction's slot and locks must be freed only once the driver has
    # ended it (a libSQL waiter would otherwise hold the GIL the committer
    # still needs).
    # An async connection whose task was cancelled mid-statement is
    # terminated, not closed.
    for name in ("do_commit", "do_rollback", "do_close", "do_terminate"):
        _release_after(dialect, name, database)
    if not backend_of(engine).single_writer:
        return
    slot = database.writer

    @event.listens_for(engine, "before_cursor_execute")
    def before_write(
        connection: sa.Connection,
        cursor: Any,
        statement: str,
        _parameters: Any,
        _context: Any,
        _executemany: bool,
    ) -> None:
        head = statement.lstrip()[:9].upper()
        if head.startswith(_READS):
            if head.startswith("SAVEPOINT") and not _in_transaction(connection):
                # The sqlite3 and libSQL drivers begin a transaction only
                # before a write, so a SAVEPOINT first would start one of its
                # own, which its RELEASE would commit - under the caller's
                # open transaction. Begin the real one first.
                cursor.execute("BEGIN")
            return
        slot.acquire(_dbapi(connection.connection), owner())


def _in_transaction(connection: sa.Connection) -> bool:
    """Tell whether the driver has begun a transaction on ``connection``.

    aiosqlite's own connection answers for SQLAlchemy's adapter of it.
    """
    proxy = connection.connection
    for dbapi in (proxy.dbapi_connection, proxy.driver_connection):
        known = getattr(dbapi, "in_transaction", None)
        if known is not None:
            return bool(known)
    return True


def _release_after(dialect: sa.Dialect, name: str, database: _Database) -> None:
    original = getattr(dialect, name)

    def wrapped(dbapi_connection: Any) -> None:
        try:
            original(dbapi_connection)
        finally:
            database.release(_dbapi(dbapi_connection))

    setattr(dialect, name, wrapped)
