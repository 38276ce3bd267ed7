"""``sqlite+evals_aiolibsql``: the libSQL driver behind SQLAlchemy's asyncio adapter.

libSQL has no asyncio API, and sqlalchemy-libsql's ``aiolibsql`` dialect only
flags the blocking driver as async: every call still blocks the event loop.
Here each libSQL connection lives on its own worker thread (its objects must
stay on the thread that made them) and every call is awaited on that thread,
the way aiosqlite serves sqlite3. Embedded files, memory and remote servers
all work, and a cancelled task does not wait for its connection's thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib
import os
import time
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any, TypeVar

from sqlalchemy import pool
from sqlalchemy.connectors.asyncio import (
    AsyncAdapt_dbapi_connection,
    AsyncAdapt_dbapi_module,
    AsyncAdapt_dbapi_ss_cursor,
    AsyncAdapt_terminate,
)
from sqlalchemy.dialects.sqlite.base import SQLiteExecutionContext
from sqlalchemy.engine import URL
from sqlalchemy.util import await_


def _import_driver_quietly() -> ModuleType:
    """Import libsql_experimental with its Rust logger off, unless the host set RUST_LOG.

    The logger writes to stdout (replica handshakes, a primary that is down),
    which must stay clean for the CLI's --json, and reads RUST_LOG once, at
    import. The variable is removed again so that child processes (a sqld
    server, say) log as usual.
    """
    quiet = "RUST_LOG" not in os.environ
    if quiet:
        os.environ["RUST_LOG"] = "off"
    try:
        return importlib.import_module("libsql_experimental")
    finally:
        if quiet:
            del os.environ["RUST_LOG"]


libsql_experimental = _import_driver_quietly()

# It imports the driver: only after the quiet import above.
from sqlalchemy_libsql.libsql import SQLiteDialect_libsql  # noqa: E402

__all__ = ["BUSY_TIMEOUT_MS", "AsyncLibsqlConnection", "AsyncLibsqlDialect"]

BUSY_TIMEOUT_MS = 30_000

_T = TypeVar("_T")


def _wait_for_lock(execute: Callable[[], _T], raw_connection: Any) -> _T:
    """Run ``execute`` (a statement on ``raw_connection``), waiting while the database is locked.

    The driver keeps the GIL while SQLite's busy handler waits for a lock, so
    a waiting thread stops every other thread - the lock holder's included -
    and the event loop with it. The adapter's connections run with busy
    timeout 0, and the wait happens here instead, in sleeps that release the
    GIL. ``execute`` must also take the first row: the driver steps a
    statement that returns rows (``RETURNING``) only when it is fetched. Only
    a statement that opens the transaction waits: inside one, "locked" can
    mean a stale WAL snapshot, which waiting never cures (SQLite's own busy
    handler does not wait for it either).
    """
    opens_transaction = not raw_connection.in_transaction
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    pause = 0.001
    while True:
        try:
            return execute()
        except ValueError as error:
            locked = "database is locked" in str(error)
            if not (locked and opens_transaction) or time.monotonic() + pause > deadline:
                raise
        time.sleep(pause)
        pause = min(2 * pause, 0.05)


class _ThreadConnection:
    """One libSQL connection and the single thread every call on it runs on."""

    def __init__(self, executor: concurrent.futures.ThreadPoolExecutor, raw: Any) -> None:
        self._executor = executor
        self.raw = raw

    @classmethod
    async def open(
        cls, driver: ModuleType, args: Sequence[Any], kwargs: dict[str, Any]
    ) -> _ThreadConnection:
        executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="evals-libsql")
        try:
            future = executor.submit(driver.connect, *args, **kwargs)
            raw = await asyncio.wrap_future(future)
        except BaseException:
            executor.shutdown(wait=False)
            raise
        return cls(executor, raw)

    async def run(self, function: Callable[..., _T], *args: Any) -> _T:
        return await asyncio.wrap_future(self.submit(function, *args))

    def submit(self, function: Callable[..., _T], *args: Any) -> concurrent.futures.Future[_T]:
        return self._executor.submit(function, *args)

    def cursor(self, *, streaming: bool = False) -> _ThreadCursor:
        return _ThreadStreamingCursor(self) if streaming else _ThreadCursor(self)

    async def commit(self) -> None:
        await self.run(self.raw.commit)

    async def rollback(self) -> None:
        await self.run(self.raw.rollback)

    async def close(self) -> None:
        try:
            await self.run(self.raw.close)
        finally:
            self._executor.shutdown(wait=False)

    def stop(self) -> None:
        """Drop the connection without waiting for a call still running on its thread."""
        self.submit(self._discard)
        self._executor.shutdown(wait=False)

    def _discard(self) -> None:
        # close() alone leaves an open transaction's locks held until the
        # driver's objects are freed; roll back first.
        try:
            self.raw.rollback()
        finally:
            self.raw.close()


class _ThreadCursor:
    """A libSQL cursor whose rows are fetched on the connection's thread with the execute."""

    arraysize = 1
    _prefetch = True

    def __init__(self, connection: _ThreadConnection) -> None:
        self._connection = connection
        self._cursor: Any = None
        self.description: Any = None
        self.rowcount = -1
        self.lastrowid: int | None = None
        self._rows: list[Any] = []

    async def __aenter__(self) -> _ThreadCursor:
        self._cursor = await self._connection.run(self._connection.raw.cursor)
        return self

    async def execute(self, operation: str, parameters: Any = None) -> None:
        await self._connection.run(self._execute, "execute", operation, parameters or ())

    async def executemany(self, operation: str, parameters: Any) -> None:
        await self._connection.run(self._execute, "executemany", operation, parameters)

    def _execute(self, method: str, operation: str, parameters: Any) -> None:
        cursor = self._cursor

        def execute() -> list[Any]:
            getattr(cursor, method)(operation, parameters)
            if not cursor.description:
                return []
            rows: list[Any] = cursor.fetchall() if self._prefetch else cursor.fetchmany(1)
            return rows

        rows = _wait_for_lock(execute, self._connection.raw)
        # Everything the adapter reads afterwards is taken now, on this thread.
        self.description = cursor.description
        self.rowcount = cursor.rowcount
        self.lastrowid = cursor.lastrowid
        self._rows = rows

    async def fetchall(self) -> list[Any]:
        rows, self._rows = self._rows, []
        return rows

    async def close(self) -> None:
        # Queued behind any statement still running (a cancelled one, say),
        # without making the loop wait for it.
        self._connection.submit(self._cursor.close)


class _ThreadStreamingCursor(_ThreadCursor):
    """A cursor whose rows stay in the driver until fetched, a batch at a time (``stream()``).

    Its first row was taken with the execute; it is handed out first.
    """

    _prefetch = False

    async def fetchone(self) -> Any:
        rows = await self.fetchmany(1)
        return rows[0] if rows else None

    async def fetchmany(self, size: int | None = None) -> list[Any]:
        return await self._connection.run(self._take, size or self.arraysize)

    async def fetchall(self) -> list[Any]:
        return await self._connection.run(self._take, None)

    def _take(self, size: int | None) -> list[Any]:
        head, self._rows = self._rows, []
        if size is not None and len(head) >= size:
            self._rows = head[size:]
            return head[:size]
        rest: list[Any] = (
            self._cursor.fetchall() if size is None else self._cursor.fetchmany(size - len(head))
        )
        return head + rest


class _AdaptedStreamingCursor(AsyncAdapt_dbapi_ss_cursor):
    __slots__ = ()

    def _make_new_cursor(self, connection: Any) -> Any:
        return connection.cursor(streaming=True)


class _ExecutionContext(SQLiteExecutionContext):
    def create_server_side_cursor(self) -> Any:
        return self._dbapi_connection.cursor(server_side=True)


class AsyncLibsqlConnection(AsyncAdapt_terminate, AsyncAdapt_dbapi_connection):
    """The DBAPI connection SQLAlchemy sees; each call waits for the libSQL thread."""

    __slots__ = ()
    _connection: _ThreadConnection  # type: ignore[assignment]
    _ss_cursor_cls = _AdaptedStreamingCursor

    def run_on_thread(self, function: Callable[[Any], _T]) -> _T:
        """Call ``function(libsql_connection)`` on the connection's thread (greenlet context)."""
        try:
            return await_(self._connection.run(function, self._connection.raw))
        except Exception as error:
            self._handle_exception(error)

    async def _terminate_graceful_close(self) -> None:
        # libSQL cannot interrupt a running statement: the thread closes the
        # connection once it returns, and the loop does not wait for that.
        self._connection.stop()

    def _terminate_force_close(self) -> None:
        self._connection.stop()


class _AsyncLibsqlModule(AsyncAdapt_dbapi_module):
    def __init__(self, libsql: ModuleType) -> None:
        super().__init__(libsql, dbapi_module=libsql)
        self.paramstyle = libsql.paramstyle
        self.sqlite_version_info = libsql.sqlite_version_info
        self.Error = libsql.Error
        # The driver has no Binary; LargeBinary values are plain bytes.
        self.Binary = bytes

    def connect(self, *args: Any, **kwargs: Any) -> AsyncLibsqlConnection:
        # _ThreadConnection has the part of AsyncIODBAPIConnection the adapter uses.
        opening = _ThreadConnection.open(self.driver, args, kwargs)
        return await_(AsyncLibsqlConnection.create(self, opening))  # type: ignore[arg-type]


class AsyncLibsqlDialect(SQLiteDialect_libsql):  # type: ignore[misc]
    """libSQL (embedded file, memory or remote) for ``create_async_engine``."""

    # The same driver underneath: the column types' libSQL quirks still apply.
    driver = "libsql"
    is_async = True
    has_terminate = True
    supports_statement_cache = True
    supports_server_side_cursors = True
    execution_ctx_cls = _ExecutionContext

    @classmethod
    def import_dbapi(cls) -> _AsyncLibsqlModule:
        return _AsyncLibsqlModule(libsql_experimental)

    @classmethod
    def get_pool_class(cls, url: URL) -> type[pool.Pool]:
        if url.host or cls._is_url_file_db(url):
            return pool.AsyncAdaptedQueuePool
        return pool.StaticPool

    def on_connect(self) -> None:
        # pysqlite's hook registers Python functions, which libSQL cannot take.
        return None

    def do_terminate(self, dbapi_connection: Any) -> None:
        dbapi_connection.terminate()


dialect = AsyncLibsqlDialect
