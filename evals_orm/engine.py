"""``create_engine``, ``create_async_engine``, ``sync``: every driver of the supported backends.

A URL is read once into a ``_Target`` (backend family, driver URL, secrets,
replica and encryption options); every driver decision - pool, pragmas, error
translation, the async driver - reads that record, here and nowhere else.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import sqlite3
import time
import urllib.error
import urllib.request
import weakref
from collections.abc import Callable
from typing import Any, Literal, TypeVar

import attrs
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.dialects import registry
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.engine.interfaces import DBAPIConnection
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.ext.asyncio import create_async_engine as _sa_create_async_engine
from sqlalchemy.pool import AsyncAdaptedQueuePool, ConnectionPoolEntry, QueuePool, StaticPool
from sqlalchemy.util import await_

from evals_orm._aiolibsql import BUSY_TIMEOUT_MS, AsyncLibsqlDialect
from evals_orm._backend import mark_embedded_replica
from evals_orm._writer import install as install_writer_slot
from evals_orm.errors import ConfigurationError, DatabaseError

__all__ = ["BUSY_TIMEOUT_MS", "SYNC_TIMEOUT_S", "create_async_engine", "create_engine", "sync"]

# The pyproject entry point makes the URL resolve in any process (Alembic's
# included); registering here also covers a source tree that is not installed.
registry.register("sqlite.evals_aiolibsql", "evals_orm._aiolibsql", "AsyncLibsqlDialect")

CACHE_KIB = 64 * 1024
REMOTE_POOL_RECYCLE_S = 5
# How long ``sync`` (and a replica connection being opened) waits for the
# primary to answer before giving up on it.
SYNC_TIMEOUT_S = 10.0
# Set in a pool record's info: the replica connection could not reach its
# primary, so this one reads the local file only (the text is why).
_OFFLINE = "evals_orm.replica_offline"
_SUPPORTED = (
    "sqlite:///PATH or sqlite:// (any SQLite driver, e.g. sqlite+pysqlite), "
    "sqlite+libsql:///PATH, sqlite+libsql://, libsql://HOST, https://HOST, http://HOST:PORT "
    "postgresql://... (any PostgreSQL driver, e.g. postgresql+psycopg2), "
    "mysql://... or mariadb://... (any MySQL driver, e.g. mysql+mysqldb)"
)
_TOKEN_QUERY_KEYS = ("authToken", "auth_token")
_TRUE = ("1", "true", "yes", "on")
_REMOTE_SCHEMES = ("libsql", "https", "http", "wss", "ws")
_BACKENDS = {
    "sqlite": "sqlite",
    "postgresql": "postgresql",
    "postgres": "postgresql",
    # SQLAlchemy's "mariadb" dialect is MySQL's, refusing a MySQL server.
    "mysql": "mysql",
    "mariadb": "mariadb",
}
# PyMySQL for MariaDB/MySQL: pure Python, so it installs on any machine.
_DEFAULT_DRIVERS = {
    "sqlite": "pysqlite",
    "postgresql": "psycopg",
    "mysql": "pymysql",
    "mariadb": "pymysql",
}
_LIBSQL_DRIVERS = ("libsql", "aiolibsql", "evals_aiolibsql")
# The async driver each family gets when the URL names a sync one.
_ASYNC_DRIVERS = {
    "sqlite": "sqlite+aiosqlite",
    "libsql": "sqlite+evals_aiolibsql",
    "libsql-remote": "sqlite+evals_aiolibsql",
    "postgresql": "postgresql+psycopg_async",
    "mysql": "asyncmy",  # after the URL's own backend name: mysql+ or mariadb+
}
# Below these the server lacks what the schema needs (enforced CHECKs, say).
_MARIADB_MIN = (10, 4)
_MYSQL_MIN = (8, 0, 16)
# Under MySQL's default 8-hour wait_timeout, so the pool never hands out a
# connection the server has dropped.
MYSQL_POOL_RECYCLE_S = 3600

_E = TypeVar("_E", Engine, AsyncEngine)
# Engines made with sync_url (the ones ``sync`` may pull into): their primary's URL and secrets.
_REPLICAS: weakref.WeakKeyDictionary[Engine, tuple[str, tuple[str, ...]]] = (
    weakref.WeakKeyDictionary()
)
_Family = Literal["sqlite", "libsql", "libsql-remote", "postgresql", "mysql"]


@attrs.frozen
class _Target:
    """What a URL names: the backend family, the driver URL and the secrets."""

    family: _Family
    url: URL
    auth_token: str | None = attrs.field(repr=False)
    is_async: bool
    # An embedded replica of this libSQL file: the primary's URL and the
    # seconds between background syncs (None: only ``sync()`` pulls).
    sync_url: str | None = None
    sync_interval: float | None = None
    encryption_key: str | None = attrs.field(default=None, repr=False)

    @property
    def in_memory(self) -> bool:
        return self.family in ("sqlite", "libsql") and self.url.database in (None, "", ":memory:")

    @property
    def secrets(self) -> tuple[str, ...]:
        return tuple(secret for secret in (self.auth_token, self.encryption_key) if secret)

    def connect_args(self) -> dict[str, Any]:
        """Return the driver's connect arguments that carry the secrets and the replica."""
        options = {
            "auth_token": self.auth_token,
            "sync_url": self.sync_url,
            "sync_interval": self.sync_interval,
            "encryption_key": self.encryption_key,
        }
        return {name: value for name, value in options.items() if value is not None}


def create_engine(
    url: str | URL,
    *,
    auth_token: str | None = None,
    schema: str | None = None,
    sync_url: str | None = None,
    sync_interval: float | None = None,
    encryption_key: str | None = None,
    **engine_kwargs: Any,
) -> Engine:
    """Create an Engine for SQLite, libSQL (embedded or remote), PostgreSQL or MariaDB/MySQL.

    Any sync driver of those dialects is accepted (``postgresql+psycopg2``,
    ``sqlite+pysqlite``, ...). File databases on SQLite/libSQL get foreign
    keys, WAL and a busy timeout; an in-memory URL gives one database shared
    by every connection; remote libSQL gets a real connection pool.
    ``auth_token`` (or an ``authToken`` query parameter) is sent as a bearer
    token and never kept in the URL.

    ``schema`` (PostgreSQL only) puts every evals_orm object, the migrations'
    version table included, in that schema.

    A libSQL file with ``sync_url`` is an embedded replica of that primary
    (``sync(engine)`` pulls; ``sync_interval`` seconds also pull in the
    background; a connection opened while the primary is unreachable reads the
    local file and refuses writes, until ``sync`` replaces it);
    ``encryption_key`` encrypts a libSQL file at rest. Neither
    the token nor the key is ever shown in a URL, repr, log or error.
    """
    target = _resolve(url, auth_token)
    target = _with_libsql_options(target, sync_url, sync_interval, encryption_key)
    if target.is_async:
        raise ConfigurationError(
            f"{target.url.drivername!r} is an asyncio driver; "
            "use evals_orm.create_async_engine for it, or a sync driver with create_engine"
        )
    if schema is not None:
        if target.family != "postgresql":
            raise ConfigurationError(
                "a schema is only supported on PostgreSQL, not on SQLite, libSQL or MariaDB/MySQL"
            )
        engine_kwargs = _in_schema(schema, engine_kwargs)
    engine = _build(sa.create_engine, target, engine_kwargs)
    if target.sync_url is not None:
        _REPLICAS[engine] = (target.sync_url, target.secrets)
        mark_embedded_replica(engine)
    # Before any connection: the host application's own writes queue for the
    # writer slot too (see evals_orm._writer).
    install_writer_slot(engine)
    return engine


def sync(engine: Engine, *, timeout: float = SYNC_TIMEOUT_S) -> Any:
    """Pull the primary's changes into an embedded-replica engine; return what the driver reports.

    Raises ``DatabaseError`` naming the cause when the primary cannot be
    reached, or does not answer within ``timeout`` seconds; reads of the
    replica keep working from its local file meanwhile.

    The wait is bounded by asking the primary for an answer before the pull:
    the driver has no timeout of its own and keeps the GIL while it waits, so
    no thread could bound (or abandon) the pull itself. A primary that stops
    answering in the middle of a pull still holds ``sync`` until it answers
    again.
    """
    if engine not in _REPLICAS:
        raise ConfigurationError(
            "evals_orm.sync needs an embedded-replica engine "
            "(create_engine('sqlite+libsql:///PATH', sync_url=...))"
        )
    sync_url, secrets = _REPLICAS[engine]
    try:
        cause = _unanswered(sync_url, timeout)
        if cause is None:
            with engine.connect() as connection:
                if _OFFLINE in connection.connection.info:
                    # Opened while the primary was unreachable: replaced by
                    # a replica connection, or the reason it still cannot be.
                    connection.invalidate()
                cause = connection.connection.info.get(_OFFLINE)
                if cause is None:
                    return connection.connection.dbapi_connection.sync()  # type: ignore[union-attr]
    except (ValueError, sa.exc.DBAPIError) as error:
        cause = str(getattr(error, "orig", None) or error).strip().splitlines()[0]
    raise DatabaseError(
        f"cannot sync the embedded replica with its primary ({_redact(cause, *secrets)}); "
        "check the sync URL, the auth token and that the primary is running"
    )


def _unanswered(sync_url: str, timeout: float) -> str | None:
    """Ask the primary for any HTTP answer; return why there was none, or None.

    Any status counts as an answer: the request only proves that the server
    talks before the driver, which would wait for it forever, is called.
    """
    # The driver connects directly, whatever the proxy variables say; so does this.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"{sync_url}/health", timeout=timeout):
            return None
    except urllib.error.HTTPError:
        return None
    except OSError as error:  # URLError included
        reason = getattr(error, "reason", error)
        if isinstance(reason, TimeoutError):
            return f"the primary did not answer within {timeout:g} s"
        return f"the primary is unreachable: {reason}"


def create_async_engine(
    url: str | URL,
    *,
    auth_token: str | None = None,
    encryption_key: str | None = None,
    sync_url: str | None = None,
    sync_interval: float | None = None,
    **engine_kwargs: Any,
) -> AsyncEngine:
    """Create an AsyncEngine for any URL ``create_engine`` takes, with an asyncio driver.

    SQLite gets aiosqlite, PostgreSQL psycopg 3's async mode (or asyncpg when
    the URL names it), libSQL (embedded and remote) the package's
    ``sqlite+evals_aiolibsql`` adapter, which runs each connection on its own
    thread. The quirks, pools, token and encryption key handling are those of
    ``create_engine``; embedded replicas are sync engines only: ``sync_url``
    or ``sync_interval`` here is a ``ConfigurationError``.
    """
    if sync_url is not None or sync_interval is not None:
        # Not built: ``sync`` takes a sync Engine, and the threaded libSQL
        # adapter has not been checked with replica connections.
        raise ConfigurationError(
            "an embedded replica (sync_url) is a sync engine: use evals_orm.create_engine "
            "for it and call evals_orm.sync from a worker thread (asyncio.to_thread)"
        )
    target = _with_libsql_options(_resolve(url, auth_token), None, None, encryption_key)
    if not target.is_async or target.family in ("libsql", "libsql-remote"):
        # Every libSQL URL gets the package's adapter: sqlalchemy-libsql's
        # aiolibsql blocks the event loop on every call.
        drivername = _ASYNC_DRIVERS[target.family]
        if target.family == "mysql":
            drivername = f"{target.url.get_backend_name()}+{drivername}"
        target = attrs.evolve(target, url=target.url.set(drivername=drivername))
    return _build(_sa_create_async_engine, target, engine_kwargs)


def _in_schema(schema: str, engine_kwargs: dict[str, Any]) -> dict[str, Any]:
    """Add the execution option that sends every unqualified table to ``schema``."""
    if not schema:
        raise ConfigurationError("the schema name must not be empty")
    options = {**engine_kwargs.get("execution_options", {})}
    options["schema_translate_map"] = {None: schema}
    return {**engine_kwargs, "execution_options": options}


def _resolve(url: str | URL, auth_token: str | None) -> _Target:
    parsed, auth_token = _without_token(_parse(url), auth_token)
    if parsed.drivername in _REMOTE_SCHEMES:
        return _Target("libsql-remote", _remote_url(parsed), auth_token, is_async=False)
    name, _, driver = parsed.drivername.partition("+")
    backend = _BACKENDS.get(name)
    if backend is None:
        raise ConfigurationError(
            f"unsupported database URL scheme {parsed.drivername!r}; expected {_SUPPORTED}"
        )
    parsed = parsed.set(drivername=f"{backend}+{driver or _DEFAULT_DRIVERS[backend]}")
    try:
        is_async = bool(parsed.get_dialect().is_async)
    except sa.exc.NoSuchModuleError:
        raise ConfigurationError(
            f"no SQLAlchemy dialect for {parsed.drivername!r} URLs is installed; "
            f"install the package that provides it or use one of {_SUPPORTED}"
        ) from None
    family: _Family
    if backend == "postgresql":
        family = "postgresql"
    elif backend in ("mysql", "mariadb"):
        family = "mysql"
    elif driver not in _LIBSQL_DRIVERS:
        family = "sqlite"
    elif parsed.host:
        family, parsed = "libsql-remote", _remote_url(parsed)
    else:
        family = "libsql"
    return _Target(family, parsed, auth_token, is_async)


def _without_token(url: URL, auth_token: str | None) -> tuple[URL, str | None]:
    """Move an ``authToken`` query parameter out of ``url`` (``auth_token`` wins)."""
    query = dict(url.query)
    for key in _TOKEN_QUERY_KEYS:
        token = query.pop(key, None)
        if token is not None and auth_token is None:
            auth_token = token if isinstance(token, str) else token[0]
    return url.set(query=query), auth_token


def _with_libsql_options(
    target: _Target,
    sync_url: str | None,
    sync_interval: float | None,
    encryption_key: str | None,
) -> _Target:
    """Add the embedded-replica and encryption options, refusing them where they mean nothing."""
    local_libsql = target.family == "libsql" and not target.in_memory
    if encryption_key is not None and not local_libsql:
        raise ConfigurationError(
            "encryption_key needs a libSQL file URL (sqlite+libsql:///PATH); "
            "SQLite files, memory and remote databases cannot take one"
        )
    if sync_url is None:
        if sync_interval is not None:
            raise ConfigurationError("sync_interval needs sync_url (the primary to sync from)")
        return attrs.evolve(target, encryption_key=encryption_key)
    if not local_libsql:
        raise ConfigurationError(
            "an embedded replica (sync_url) needs a libSQL file URL (sqlite+libsql:///PATH)"
        )
    primary, auth_token = _without_token(_parse(sync_url), target.auth_token)
    remote = _remote_url(primary)
    scheme = "https" if remote.query.get("secure") == "true" else "http"
    primary_url = remote.set(drivername=scheme, query={}).render_as_string(hide_password=False)
    return attrs.evolve(
        target,
        auth_token=auth_token,
        sync_url=primary_url,
        sync_interval=sync_interval,
        encryption_key=encryption_key,
    )


def _parse(url: str | URL) -> URL:
    try:
        parsed = make_url(url)
        _ = parsed.port  # a URL object built by hand may still carry a bad one
    except (sa.exc.ArgumentError, ValueError, TypeError):
        raise ConfigurationError(
            f"cannot parse the database URL {_redact(str(url))!r} (check the host and port); "
            f"expected {_SUPPORTED}"
        ) from None
    return parsed


def _remote_url(url: URL) -> URL:
    """Return the ``sqlite+libsql://host`` URL the driver takes for a remote libSQL URL."""
    if not url.host:
        raise ConfigurationError(f"a remote libSQL URL needs a host; expected {_SUPPORTED}")
    query = dict(url.query)
    tls = query.pop("tls", None)
    secure = query.pop("secure", None)
    if url.drivername in ("https", "wss"):
        use_tls = True
    elif url.drivername in ("http", "ws"):
        use_tls = False
    elif secure is not None:
        use_tls = str(secure).lower() in _TRUE
    elif tls is not None:
        use_tls = str(tls).lower() in _TRUE
    else:
        # Turso's libsql:// means TLS; SQLAlchemy's sqlite+libsql://host keeps
        # the dialect's meaning (plain http unless ?secure=true).
        use_tls = url.drivername == "libsql"
    if use_tls:
        query["secure"] = "true"
    return url.set(drivername="sqlite+libsql", query=query)


def _build(factory: Callable[..., _E], target: _Target, engine_kwargs: dict[str, Any]) -> _E:
    """Create the engine of ``target`` with ``factory`` and install its driver's quirks."""
    kwargs = dict(engine_kwargs)
    if target.auth_token is not None and target.family != "libsql-remote" and not target.sync_url:
        raise ConfigurationError(
            "auth_token is only used with a remote libSQL URL or an embedded replica's sync_url"
        )
    connect_args = {**kwargs.pop("connect_args", {}), **target.connect_args()}
    asynchronous = factory is _sa_create_async_engine
    if target.in_memory:
        # One connection, so every Session and thread sees the same database.
        connect_args.setdefault("check_same_thread", False)
        if asynchronous:
            # Tasks take turns with it, awaiting the pool: shared by two
            # tasks at once, one task's reads would end (roll back) the
            # other's write transaction on it.
            kwargs.setdefault("poolclass", AsyncAdaptedQueuePool)
            kwargs.setdefault("pool_size", 1)
            kwargs.setdefault("max_overflow", 0)
        else:
            kwargs.setdefault("poolclass", StaticPool)
    elif target.family == "libsql-remote":
        # The dialect's default SingletonThreadPool would let two connections
        # of a thread share one remote stream and see each other's rows.
        kwargs.setdefault("poolclass", AsyncAdaptedQueuePool if asynchronous else QueuePool)
        # sqld expires a stream after about 10 s without a request; a pooled
        # connection is replaced before it can be handed out expired.
        kwargs.setdefault("pool_recycle", REMOTE_POOL_RECYCLE_S)
    elif target.family == "mysql":
        kwargs = _mysql_options(kwargs)
    try:
        engine = factory(_with_charset(target), connect_args=connect_args, **kwargs)
    except ImportError as error:
        raise ConfigurationError(
            f"the driver of {target.url.drivername!r} URLs is not installed; "
            f"install the {error.name or 'driver'!r} package"
        ) from None
    sync_engine = engine.sync_engine if isinstance(engine, AsyncEngine) else engine
    if target.family in ("sqlite", "libsql"):
        # An in-memory database has no file to tune; a replica refuses the
        # file pragmas ("unsupported statement"): its file is the driver's.
        file_pragmas = not (target.in_memory or target.sync_url)
        hook = _pragma_hook(sync_engine.dialect, file_pragmas)
        if target.family == "libsql":
            hook = _typed_pragma_errors(hook, target)
        event.listen(sync_engine, "connect", hook)
    if target.family in ("libsql", "libsql-remote"):
        _typed_connect_errors(sync_engine, target)
    if target.family == "mysql":
        event.listen(sync_engine, "first_connect", _check_mysql_server)
        event.listen(sync_engine, "connect", _strict_mysql_session)
    _translate_errors(sync_engine, target)
    if asynchronous and target.family == "sqlite":
        _rollback_before_terminate(sync_engine.dialect)
    return engine


def _mysql_options(engine_kwargs: dict[str, Any]) -> dict[str, Any]:
    """Return MariaDB/MySQL's engine options: READ COMMITTED and a recycled pool.

    READ COMMITTED is PostgreSQL's default (and Django's on MySQL): a
    transaction that waited for a lock row - a host Session's too - then reads
    what its predecessor committed, not a snapshot taken before the wait
    (REPEATABLE READ would make it miss rows and insert them twice).
    """
    return {
        "pool_recycle": MYSQL_POOL_RECYCLE_S,
        "isolation_level": "READ COMMITTED",
        **engine_kwargs,
    }


def _with_charset(target: _Target) -> URL:
    """Return the target's URL, asking a MySQL driver for utf8mb4 unless it names a charset."""
    url = target.url
    if target.family != "mysql" or "charset" in url.query:
        return url
    if url.get_driver_name() in ("pymysql", "mysqldb", "aiomysql", "asyncmy"):
        # Every Unicode string, 4-byte emoji included.
        return url.update_query_dict({"charset": "utf8mb4"})
    return url


def _check_mysql_server(dbapi_connection: DBAPIConnection, record: ConnectionPoolEntry) -> None:
    """Refuse a server too old for the schema, in one sentence."""
    del record
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("SELECT VERSION()")
        row: Any = cursor.fetchone()
        version = str(row[0])
    finally:
        cursor.close()
    mariadb = "mariadb" in version.lower()
    needed = _MARIADB_MIN if mariadb else _MYSQL_MIN
    release = version.split("-", maxsplit=1)[0]
    numbers = tuple(int(part) for part in release.split(".")[:3] if part.isdigit())
    if numbers < needed:
        raise DatabaseError(
            f"evals_orm needs {'MariaDB' if mariadb else 'MySQL'} "
            f"{'.'.join(map(str, needed))} or newer; this server is {version}"
        )


def _strict_mysql_session(dbapi_connection: DBAPIConnection, record: ConnectionPoolEntry) -> None:
    # Strict mode makes a value the column cannot hold an error instead of a
    # silently truncated row, whatever the server's default.
    del record
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(
            "SET SESSION sql_mode = TRIM(BOTH ',' FROM CONCAT(@@sql_mode, ',STRICT_ALL_TABLES'))"
        )
    finally:
        cursor.close()


def _rollback_before_terminate(dialect: sa.Dialect) -> None:
    """Make aiosqlite roll back a connection before it is terminated.

    A task cancelled mid-statement gets its connection terminated, and
    sqlite3 closes a connection whose statement is still unfinalized as a
    zombie that keeps its write lock until the statement is garbage
    collected: every other writer stalled for the whole busy timeout.
    """
    terminate = dialect.do_terminate

    def do_terminate(dbapi_connection: Any) -> None:
        # Outside a greenlet (garbage collection) the rollback cannot be
        # awaited; the connection is dropped as it would be anyway.
        with contextlib.suppress(Exception):
            dbapi_connection.rollback()
        terminate(dbapi_connection)

    dialect.do_terminate = do_terminate  # type: ignore[method-assign]


def _typed_pragma_errors(
    hook: Callable[[DBAPIConnection, ConnectionPoolEntry], None], target: _Target
) -> Callable[[DBAPIConnection, ConnectionPoolEntry], None]:
    """Raise libSQL's failures in the connect-time pragmas as ``OperationalError``.

    They happen while the pool connects, where SQLAlchemy wraps only the
    DBAPI's own ``Error``; the first pragma is also where a wrong encryption
    key shows ("file is not a database").
    """

    def typed(dbapi_connection: DBAPIConnection, record: ConnectionPoolEntry) -> None:
        try:
            hook(dbapi_connection, record)
        except BaseException as error:
            if not _is_libsql_failure(error):
                raise
            raise sa.exc.OperationalError(None, None, _driver_failure(error, target)) from None

    return typed


def _pragma_hook(
    dialect: sa.Dialect, file_pragmas: bool
) -> Callable[[DBAPIConnection, ConnectionPoolEntry], None]:
    if isinstance(dialect, AsyncLibsqlDialect):
        # The pragmas (and the WAL retry's sleeps) run on the connection's own
        # thread, never on the event loop. The adapter waits for locks itself
        # (busy timeout 0), without the GIL.
        set_on_thread = functools.partial(
            _set_pragmas, file_pragmas=file_pragmas, sleep=time.sleep, busy_timeout_ms=0
        )

        def on_thread(dbapi_connection: Any, _record: ConnectionPoolEntry) -> None:
            dbapi_connection.run_on_thread(set_on_thread)

        return on_thread
    sleep = _sleep_on_loop if dialect.is_async else time.sleep

    def hook(dbapi_connection: DBAPIConnection, _record: ConnectionPoolEntry) -> None:
        _set_pragmas(
            dbapi_connection,
            file_pragmas=file_pragmas,
            sleep=sleep,
            busy_timeout_ms=BUSY_TIMEOUT_MS,
        )

    return hook


def _sleep_on_loop(seconds: float) -> None:
    await_(asyncio.sleep(seconds))


def _set_pragmas(
    dbapi_connection: Any,
    *,
    file_pragmas: bool,
    sleep: Callable[[float], None],
    busy_timeout_ms: int,
) -> None:
    cursor = dbapi_connection.cursor()
    try:
        # libSQL enforces foreign keys by default; stdlib SQLite must
        # match it so both behave the same.
        cursor.execute("PRAGMA foreign_keys=ON")
        if file_pragmas:
            cursor.execute(f"PRAGMA busy_timeout={busy_timeout_ms}")
            _switch_to_wal(cursor, sleep)
            # The checkpoints' primary key is a random UUID: its inserts
            # land all over the index, so a long rebuild slows down once
            # the index outgrows SQLite's default 2 MiB page cache.
            cursor.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
    finally:
        cursor.close()


def _switch_to_wal(cursor: Any, sleep: Callable[[float], None]) -> None:
    """Put the database file in WAL mode, waiting for other writers.

    The switch takes an exclusive lock without SQLite's busy handler: while
    another connection holds the write lock (another process migrating a
    fresh file, say) it fails at once with "database is locked", whatever the
    busy timeout. So it is retried here for as long as that timeout allows.
    """
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    pause = 0.001
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.fetchall()
            return
        # libSQL raises a bare ValueError where sqlite3 raises OperationalError.
        except (sqlite3.OperationalError, ValueError) as error:
            if "database is locked" not in str(error) or time.monotonic() + pause > deadline:
                raise
        sleep(pause)
        pause = min(2 * pause, 0.05)


def _redact(text: str, *secrets: str) -> str:
    for secret in secrets:
        text = text.replace(secret, "***")
    for key in _TOKEN_QUERY_KEYS:
        start = text.find(f"{key}=")
        while start != -1:
            end = start + len(key) + 1
            while end < len(text) and text[end] not in "&# '\"":
                end += 1
            text = f"{text[: start + len(key) + 1]}***{text[end:]}"
            start = text.find(f"{key}=", start + len(key) + 4)
    return text


def _is_panic(error: BaseException) -> bool:
    # pyo3's PanicException derives from BaseException and cannot be imported.
    return type(error).__name__ == "PanicException"


def _is_libsql_failure(error: BaseException) -> bool:
    """Tell whether ``error`` is how the libSQL driver fails: a bare ValueError or a panic."""
    return isinstance(error, ValueError) or _is_panic(error)


def _driver_failure(error: BaseException, target: _Target) -> ValueError:
    """Return the libSQL error as a ValueError with a readable message free of secrets."""
    message = _redact(str(error), *target.secrets)
    if _is_panic(error):
        # A panic inside the driver comes from a page it cannot decode.
        message = f"database disk image is malformed (the libSQL driver panicked: {message})"
    elif message == "file is not a database" and target.family == "libsql":
        message = (
            "the libSQL file cannot be decrypted with this encryption key (or it is not a database)"
            if target.encryption_key
            else "file is not a database (or it is encrypted: pass its encryption_key)"
        )
    return ValueError(message)


def _translate_errors(engine: Engine, target: _Target) -> None:
    """Turn libSQL's bare ``ValueError``s and panics into typed errors; hide the secrets."""
    secrets = target.secrets
    libsql = target.family in ("libsql", "libsql-remote")

    @event.listens_for(engine, "handle_error")
    def handle_error(context: sa.engine.ExceptionContext) -> BaseException | None:
        original = context.original_exception
        # Errors the driver raised while executing, committing (no statement)
        # or rolling back: a ValueError from a bind processor (a statement
        # but no execution context) is the caller's mistake and must stay a
        # StatementError.
        from_driver = libsql and (
            context.execution_context is not None or context.statement is None
        )
        if from_driver and _is_libsql_failure(original):
            failure = _driver_failure(original, target)
            message = str(failure)
            error_class: type[sa.exc.DBAPIError] = (
                sa.exc.IntegrityError
                if "constraint failed" in message.lower()
                else sa.exc.OperationalError
            )
            if "STREAM_EXPIRED" in message or _is_panic(original):
                # The server forgot the stream, or the driver's state is gone:
                # the pool must drop this connection.
                context.is_disconnect = True
            return error_class(context.statement, None, failure, connection_invalidated=False)
        if any(secret in str(original) for secret in secrets):
            return type(original)(_redact(str(original), *secrets))
        return None


def _typed_connect_errors(engine: Engine, target: _Target) -> None:
    """Make a failed libSQL connect raise SQLAlchemy's ``OperationalError``.

    libSQL raises a bare ``ValueError`` when it cannot connect (a panic on
    some corrupt files), which SQLAlchemy lets through unwrapped: it only
    wraps the DBAPI's ``Error``. A remote connection is lazy, so it is probed
    once when the pool opens it.
    """
    remote = bool(engine.url.host)

    @event.listens_for(engine, "do_connect")
    def connect(
        dialect: sa.Dialect, record: ConnectionPoolEntry, cargs: Any, cparams: Any
    ) -> DBAPIConnection:
        try:
            if target.sync_url is not None:
                return _replica_connection(dialect, record, target.sync_url, cargs, cparams)
            connection: DBAPIConnection = dialect.loaded_dbapi.connect(*cargs, **cparams)
            if remote:
                connection.execute("SELECT 1")
        except BaseException as error:
            if not _is_libsql_failure(error):
                raise
            raise sa.exc.OperationalError(None, None, _driver_failure(error, target)) from None
        return connection


def _replica_connection(
    dialect: sa.Dialect, record: ConnectionPoolEntry, sync_url: str, cargs: Any, cparams: Any
) -> DBAPIConnection:
    """Open a replica connection, or the local file alone when the primary cannot be reached.

    The driver contacts the primary to open a replica connection: refused, it
    fails; unanswered, it would wait forever. The local file still serves
    reads then, on a connection that refuses writes (a write through a
    replica belongs on the primary, which is away); ``sync`` replaces it.
    """
    cause = _unanswered(sync_url, SYNC_TIMEOUT_S)
    if cause is None:
        try:
            replica: DBAPIConnection = dialect.loaded_dbapi.connect(*cargs, **cparams)
        except BaseException as error:
            if not _is_libsql_failure(error):
                raise
            cause = str(error).strip().splitlines()[0]
        else:
            return replica
    local_only = {k: v for k, v in cparams.items() if k not in ("sync_url", "sync_interval")}
    local_only.pop("auth_token", None)
    connection: DBAPIConnection = dialect.loaded_dbapi.connect(*cargs, **local_only)
    cursor = connection.cursor()
    try:
        cursor.execute("PRAGMA query_only=ON")
    finally:
        cursor.close()
    record.info[_OFFLINE] = cause
    return connection
