"""``create_engine``: one URL per backend, with each driver's quirks handled here."""

from __future__ import annotations

import sqlite3
import time
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.engine.interfaces import DBAPIConnection
from sqlalchemy.exc import ArgumentError
from sqlalchemy.pool import ConnectionPoolEntry, QueuePool, StaticPool

from evals_orm._writer import install as install_writer_slot
from evals_orm.errors import ConfigurationError

__all__ = ["create_engine"]

BUSY_TIMEOUT_MS = 30_000
CACHE_KIB = 64 * 1024
REMOTE_POOL_RECYCLE_S = 5
_SUPPORTED = (
    "sqlite:///PATH, sqlite://, sqlite+libsql:///PATH, sqlite+libsql://, "
    "libsql://HOST, https://HOST, http://HOST:PORT or postgresql://..."
)
_TOKEN_QUERY_KEYS = ("authToken", "auth_token")
_TRUE = ("1", "true", "yes", "on")


def create_engine(
    url: str | URL,
    *,
    auth_token: str | None = None,
    schema: str | None = None,
    **engine_kwargs: Any,
) -> Engine:
    """Create an Engine for SQLite, libSQL (embedded or remote) or PostgreSQL.

    File databases on SQLite/libSQL get foreign keys, WAL and a busy timeout;
    an in-memory URL gives one database shared by every connection; remote
    libSQL gets a real connection pool. ``auth_token`` (or an ``authToken``
    query parameter) is sent as a bearer token and never kept in the URL.
    ``schema`` (PostgreSQL only) puts every evals_orm object, the migrations'
    version table included, in that schema.
    """
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ConfigurationError(
            f"cannot parse the database URL {_redact(str(url))!r}; expected {_SUPPORTED}"
        ) from None
    query = dict(parsed.query)
    for key in _TOKEN_QUERY_KEYS:
        token = query.pop(key, None)
        if token is not None and auth_token is None:
            auth_token = token if isinstance(token, str) else token[0]
    parsed = parsed.set(query=query)

    scheme = parsed.drivername
    if scheme in ("sqlite", "sqlite+pysqlite"):
        engine = _sqlite_engine(parsed.set(drivername="sqlite+pysqlite"), engine_kwargs)
    elif scheme == "sqlite+libsql" and not parsed.host:
        engine = _sqlite_engine(parsed, engine_kwargs)
    elif scheme in ("sqlite+libsql", "libsql", "https", "http", "wss", "ws"):
        engine = _libsql_remote_engine(parsed, auth_token, engine_kwargs)
    elif scheme in ("postgresql", "postgres", "postgresql+psycopg"):
        if schema is not None:
            engine_kwargs = _in_schema(schema, engine_kwargs)
        engine = sa.create_engine(parsed.set(drivername="postgresql+psycopg"), **engine_kwargs)
    else:
        raise ConfigurationError(
            f"unsupported database URL scheme {scheme!r}; expected {_SUPPORTED}"
        )
    if schema is not None and engine.dialect.name != "postgresql":
        raise ConfigurationError(
            "a schema is only supported on PostgreSQL, not on SQLite or libSQL"
        )
    if auth_token is not None and not (engine.dialect.driver == "libsql" and engine.url.host):
        raise ConfigurationError("auth_token is only used with a remote libSQL URL")
    _redact_errors(engine, auth_token)
    # Before any connection: the host application's own writes queue for the
    # writer slot too (see evals_orm._writer).
    install_writer_slot(engine)
    return engine


def _in_schema(schema: str, engine_kwargs: dict[str, Any]) -> dict[str, Any]:
    """Add the execution option that sends every unqualified table to ``schema``."""
    if not schema:
        raise ConfigurationError("the schema name must not be empty")
    options = {**engine_kwargs.get("execution_options", {})}
    options["schema_translate_map"] = {None: schema}
    return {**engine_kwargs, "execution_options": options}


def _sqlite_engine(url: URL, engine_kwargs: dict[str, Any]) -> Engine:
    in_memory = url.database in (None, "", ":memory:")
    kwargs = dict(engine_kwargs)
    connect_args = kwargs.setdefault("connect_args", {})
    if in_memory:
        # One connection, so every Session and thread sees the same database.
        kwargs.setdefault("poolclass", StaticPool)
        connect_args.setdefault("check_same_thread", False)
    engine = sa.create_engine(url, **kwargs)
    event.listen(engine, "connect", _sqlite_pragmas_for(in_memory=in_memory))
    return engine


def _sqlite_pragmas_for(*, in_memory: bool) -> Any:
    def set_pragmas(dbapi_connection: DBAPIConnection, _record: ConnectionPoolEntry) -> None:
        cursor = dbapi_connection.cursor()
        try:
            # libSQL enforces foreign keys by default; stdlib SQLite must
            # match it so both behave the same.
            cursor.execute("PRAGMA foreign_keys=ON")
            if not in_memory:
                cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
                _switch_to_wal(cursor)
                # The checkpoints' primary key is a random UUID: its inserts
                # land all over the index, so a long rebuild slows down once
                # the index outgrows SQLite's default 2 MiB page cache.
                cursor.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
        finally:
            cursor.close()

    return set_pragmas


def _switch_to_wal(cursor: Any) -> None:
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
                if isinstance(error, sqlite3.OperationalError):
                    raise
                raise sa.exc.OperationalError("PRAGMA journal_mode=WAL", None, error) from None
        time.sleep(pause)
        pause = min(2 * pause, 0.05)


def _libsql_remote_engine(
    url: URL, auth_token: str | None, engine_kwargs: dict[str, Any]
) -> Engine:
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
    remote = url.set(drivername="sqlite+libsql", query=query)
    kwargs = dict(engine_kwargs)
    connect_args = kwargs.setdefault("connect_args", {})
    if auth_token is not None:
        connect_args["auth_token"] = auth_token
    # The dialect's default SingletonThreadPool would let two connections of a
    # thread share one remote stream and see each other's uncommitted rows.
    kwargs.setdefault("poolclass", QueuePool)
    # sqld expires a stream after about 10 s without a request; a pooled
    # connection is replaced before it can be handed out expired.
    kwargs.setdefault("pool_recycle", REMOTE_POOL_RECYCLE_S)
    return sa.create_engine(remote, **kwargs)


def _redact(text: str, token: str | None = None) -> str:
    if token:
        text = text.replace(token, "***")
    for key in _TOKEN_QUERY_KEYS:
        start = text.find(f"{key}=")
        while start != -1:
            end = start + len(key) + 1
            while end < len(text) and text[end] not in "&# '\"":
                end += 1
            text = f"{text[: start + len(key) + 1]}***{text[end:]}"
            start = text.find(f"{key}=", start + len(key) + 4)
    return text


def _redact_errors(engine: Engine, token: str | None) -> None:
    """Translate libSQL's bare ``ValueError``s and keep the token out of messages."""
    libsql = engine.dialect.driver == "libsql"
    if libsql:
        _typed_connect_errors(engine, token)

    @event.listens_for(engine, "handle_error")
    def handle_error(context: sa.engine.ExceptionContext) -> BaseException | None:
        original = context.original_exception
        if token and token in str(original):
            original = type(original)(_redact(str(original), token))
        # Only errors the driver raised while executing: a ValueError from a
        # bind processor (a naive datetime, say) is the caller's mistake and
        # must stay a StatementError, not become an OperationalError.
        from_driver = libsql and context.execution_context is not None
        if from_driver and isinstance(original, ValueError):
            message = str(original)
            error_class: type[sa.exc.DBAPIError] = (
                sa.exc.IntegrityError
                if "constraint failed" in message.lower()
                else sa.exc.OperationalError
            )
            if "STREAM_EXPIRED" in message:
                # The server forgot the stream: the pool must drop this connection.
                context.is_disconnect = True
            return error_class(context.statement, None, original, connection_invalidated=False)
        if original is not context.original_exception:
            return original
        return None


def _typed_connect_errors(engine: Engine, token: str | None) -> None:
    """Make a failed libSQL connect raise SQLAlchemy's ``OperationalError``.

    libSQL raises a bare ``ValueError`` when it cannot connect, which
    SQLAlchemy lets through unwrapped (it only wraps the DBAPI's ``Error``,
    and the driver lacks the classes its error handling needs). A remote
    connection is lazy, so it is probed once when the pool opens it.
    """
    remote = bool(engine.url.host)

    @event.listens_for(engine, "do_connect")
    def connect(
        dialect: sa.Dialect, _record: ConnectionPoolEntry, cargs: Any, cparams: Any
    ) -> DBAPIConnection:
        try:
            connection: DBAPIConnection = dialect.loaded_dbapi.connect(*cargs, **cparams)
            if remote:
                connection.execute("SELECT 1")
        except ValueError as error:
            raise sa.exc.OperationalError(
                None, None, ValueError(_redact(str(error), token))
            ) from None
        return connection
