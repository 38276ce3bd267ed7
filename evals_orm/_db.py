"""Connections, transactions, dialect upserts and driver-error translation.

Everything that touches a Connection goes through here, so the services
never branch on the dialect and never leak a driver exception.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Union
from uuid import UUID

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import InstrumentedAttribute, Session, sessionmaker

from evals_orm.errors import DatabaseError, EvalsError
from evals_orm.models import TrackingRow

__all__ = [
    "Bind",
    "batch_size",
    "bulk_insert_skips_conflicts",
    "engine_of",
    "insert_for",
    "insert_rows",
    "lock",
    "read",
    "set_position",
    "transaction",
    "translate",
    "upsert",
]

Bind = Union[sa.Engine, "sessionmaker[Session]"]

_MISSING_SCHEMA = re.compile(
    r"no such table|relation \"?[\w.]+\"? does not exist|UndefinedTable", re.IGNORECASE
)
_UNAUTHORIZED = re.compile(
    r"\b401\b|unauthori[sz]ed|password authentication failed|invalid token|jwt", re.IGNORECASE
)
_UNREACHABLE = re.compile(
    r"connection refused|could not connect|connection failed|"
    r"failed to connect|name or service not known|unable to open database|"
    r"error sending request|timed out|dns error",
    re.IGNORECASE,
)


def engine_of(bind: Bind) -> sa.Engine:
    """Return the Engine behind an Engine or a sessionmaker."""
    if isinstance(bind, sa.Engine):
        return bind
    engine = bind.kw.get("bind")
    if not isinstance(engine, sa.Engine):
        raise TypeError("the sessionmaker must be bound to an Engine")
    return engine


def translate(error: Exception) -> EvalsError:
    """Return the ``DatabaseError`` that tells the user what to do about a driver error."""
    message = str(getattr(error, "orig", None) or error).strip().splitlines()[0]
    if _MISSING_SCHEMA.search(message):
        return DatabaseError(
            "the evals_orm tables are missing from this database; "
            "run `evals-orm db upgrade` (or evals_orm.migrations.upgrade) first"
        )
    if _UNAUTHORIZED.search(message):
        return DatabaseError(
            f"the database refused the credentials ({message}); check the auth token or password"
        )
    if _UNREACHABLE.search(message):
        return DatabaseError(
            f"cannot reach the database ({message}); check the URL, "
            "the credentials and that the server is running"
        )
    return DatabaseError(f"the database failed: {message}")


@contextmanager
def _translated() -> Iterator[None]:
    try:
        yield
    except EvalsError:
        raise
    except sa.exc.DBAPIError as error:
        raise translate(error) from error


# The connection of the transaction this context (thread, task) is inside, so
# reads nested in it - e.g. ``rebuild(log.read())`` - use that connection: on
# an in-memory database every checkout is the same DBAPI connection, and a
# second checkout's rollback would undo the open transaction.
_ACTIVE: ContextVar[tuple[sa.Engine, sa.Connection] | None] = ContextVar(
    "evals_orm_active_connection", default=None
)

# Writers of one database in one process queue on this lock before the
# database's own: the libSQL driver keeps the GIL while it waits on a locked
# database, so a waiting thread would stop the lock holder from committing.
_WRITERS: dict[str, threading.Lock] = {}
_WRITERS_GUARD = threading.Lock()


def _writer_lock(engine: sa.Engine) -> threading.Lock:
    key = engine.url.render_as_string(hide_password=True)
    with _WRITERS_GUARD:
        return _WRITERS.setdefault(key, threading.Lock())


@contextmanager
def read(bind: Bind) -> Iterator[sa.Connection]:
    """Yield a Connection for reads; driver errors become ``DatabaseError``."""
    engine = engine_of(bind)
    active = _ACTIVE.get()
    if active is not None and active[0] is engine:
        yield active[1]
        return
    with _translated():
        if isinstance(bind, sa.Engine):
            with bind.connect() as connection:
                yield connection
        else:
            with bind() as session:
                yield session.connection()


@contextmanager
def transaction(bind: Bind) -> Iterator[sa.Connection]:
    """Yield a Connection in a write transaction, committed at the end, rolled back on error.

    On PostgreSQL the transaction is READ COMMITTED whatever the engine's
    default, so a writer that waited for a lock row reads what its
    predecessor committed instead of failing to serialise.
    """
    engine = engine_of(bind)
    with _writer_lock(engine), _translated():
        if isinstance(bind, sa.Engine):
            with bind.connect() as connection:
                if engine.dialect.name == "postgresql":
                    connection.execution_options(isolation_level="READ COMMITTED")
                with connection.begin():
                    yield from _activated(engine, connection)
        else:
            with bind.begin() as session:
                yield from _activated(engine, session.connection())


def _activated(engine: sa.Engine, connection: sa.Connection) -> Iterator[sa.Connection]:
    token = _ACTIVE.set((engine, connection))
    try:
        yield connection
    finally:
        _ACTIVE.reset(token)


def insert_for(dialect: sa.Dialect) -> Any:
    """Return the dialect's own ``insert`` construct (one with ON CONFLICT support)."""
    if dialect.name == "postgresql":
        return postgresql.insert
    if dialect.name == "sqlite":
        version = dialect.server_version_info
        if version is not None and version < (3, 24):
            raise DatabaseError("SQLite 3.24 or newer is needed (for ON CONFLICT upserts)")
        return sqlite.insert
    raise DatabaseError(f"the {dialect.name} dialect is not supported by evals_orm")


def _is_remote_libsql(dialect: sa.Dialect, connection: sa.Connection) -> bool:
    return dialect.driver == "libsql" and bool(connection.engine.url.host)


# SQLite's limit on the parameters of one statement (SQLITE_MAX_VARIABLE_NUMBER).
_SQLITE_MAX_PARAMETERS = 32_766


def _execute_rows(
    connection: sa.Connection, statement: Any, rows: Sequence[Mapping[str, Any]]
) -> int:
    """Execute ``statement`` for every row; return the rows it changed.

    This is executemany, except on remote libSQL, which sends one request
    per row of an executemany: rows go there as few multi-row statements
    (in order, so generated keys follow the rows' order as with executemany).
    """
    if not _is_remote_libsql(connection.dialect, connection):
        return connection.execute(statement, list(rows)).rowcount
    changed = 0
    per_statement = max(1, _SQLITE_MAX_PARAMETERS // max(1, len(rows[0])))
    for start in range(0, len(rows), per_statement):
        changed += connection.execute(
            statement.values(list(rows[start : start + per_statement]))
        ).rowcount
    return changed


def upsert(
    connection: sa.Connection,
    entity: Any,
    rows: Sequence[Mapping[str, Any]],
    *,
    key: Sequence[str],
    update: Sequence[str],
) -> None:
    """Insert ``rows``, or update the ``update`` columns of those whose ``key`` exists."""
    if not rows:
        return
    statement = insert_for(connection.dialect)(entity)
    statement = statement.on_conflict_do_update(
        index_elements=list(key),
        set_={name: statement.excluded[name] for name in update},
    )
    _execute_rows(connection, statement, rows)


def batch_size(engine: sa.Engine) -> int:
    """Return how many events a write transaction should take on ``engine``.

    Large batches amortise statements and commits. A remote libSQL server
    aborts a transaction that keeps a waiting writer out for about 5 s, so
    batches there stay small.
    """
    if engine.dialect.driver == "libsql" and engine.url.host:
        return 500
    return 10_000


_UUID_ARRAY = postgresql.ARRAY(postgresql.UUID(as_uuid=True))


def one_of(
    connection: sa.Connection, column: InstrumentedAttribute[Any], values: Collection[UUID]
) -> sa.ColumnElement[bool]:
    """Return ``column IN values`` for a UUID column, fit for thousands of values.

    An IN list binds one parameter per value, which PostgreSQL parses and
    plans slowly by the thousand; there the same test is ``= ANY`` of one
    array parameter (a batch's checkpoint lookup takes a third of the time).
    """
    if connection.dialect.name == "postgresql":
        return column == sa.any_(sa.bindparam(None, list(values), type_=_UUID_ARRAY))
    return column.in_(values)


def bulk_insert_skips_conflicts(connection: sa.Connection) -> bool:
    """Tell whether ``insert_rows(..., skip_conflicts=True)`` works on this connection."""
    dialect = connection.dialect
    return not (dialect.name == "postgresql" and dialect.driver == "psycopg")


def insert_rows(
    connection: sa.Connection,
    entity: Any,
    rows: Sequence[Mapping[str, Any]],
    *,
    skip_conflicts: bool = False,
) -> int:
    """Insert ``rows`` (all with the same keys) in bulk, in the order given; return how many.

    PostgreSQL (psycopg) takes them by ``COPY``, remote libSQL by multi-row
    ``INSERT`` statements, SQLite and embedded libSQL by one executemany of
    ready-made parameter tuples. Values go through the columns' own types
    every time, so the rows are exactly what an ``INSERT`` of them stores.
    With ``skip_conflicts`` (where ``bulk_insert_skips_conflicts``), rows
    whose key exists are left out.
    """
    if not rows:
        return 0
    dialect = connection.dialect
    table: sa.Table = entity.__table__
    if dialect.name == "postgresql" and dialect.driver == "psycopg":
        if skip_conflicts:
            raise DatabaseError("COPY cannot skip conflicting rows")
        _copy_rows(connection, table, rows)
        return len(rows)
    statement = insert_for(dialect)(table)
    if skip_conflicts:
        statement = statement.on_conflict_do_nothing()
    if _is_remote_libsql(dialect, connection):
        return _execute_rows(connection, statement, rows)
    names = list(rows[0])
    compiled = statement.compile(dialect=dialect, column_keys=names)
    order = compiled.positiontup
    if order is None:  # a named paramstyle: executemany through SQLAlchemy
        return _execute_rows(connection, statement, rows)
    columns = _processors(dialect, table, order)
    # Parameters are processed here once, as SQLAlchemy would, and the driver
    # gets plain tuples: SQLAlchemy's per-row bookkeeping is the largest cost
    # left of a bulk insert on SQLite.
    result = connection.exec_driver_sql(
        compiled.string,
        [
            tuple(
                [row[name] if process is None else process(row[name]) for name, process in columns]
            )
            for row in rows
        ],
    )
    return result.rowcount


def _processors(
    dialect: sa.Dialect, table: sa.Table, names: Sequence[str]
) -> list[tuple[str, Any]]:
    return [
        (name, table.c[name].type.dialect_impl(dialect).bind_processor(dialect)) for name in names
    ]


def _copy_rows(
    connection: sa.Connection, table: sa.Table, rows: Sequence[Mapping[str, Any]]
) -> None:
    dialect = connection.dialect
    names = list(rows[0])
    columns = _processors(dialect, table, names)
    quote = dialect.identifier_preparer.quote
    # COPY is raw SQL, which the engine's schema_translate_map does not reach.
    translate = connection.get_execution_options().get("schema_translate_map") or {}
    schema = translate.get(table.schema, table.schema)
    name = quote(table.name) if schema is None else f"{quote(schema)}.{quote(table.name)}"
    statement = f"COPY {name} ({', '.join(quote(name) for name in names)}) FROM STDIN"
    driver_connection = connection.connection.driver_connection
    assert driver_connection is not None
    try:
        with driver_connection.cursor() as cursor, cursor.copy(statement) as copy:
            for row in rows:
                copy.write_row(
                    [
                        row[name] if process is None else process(row[name])
                        for name, process in columns
                    ]
                )
    except dialect.loaded_dbapi.Error as error:
        raise sa.exc.DBAPIError.instance(
            statement, None, error, dialect.loaded_dbapi.Error
        ) from error


def lock(connection: sa.Connection, name: str) -> int:
    """Take the write lock named ``name`` until the transaction ends; return its position.

    The lock is a row of ``eval_tracking`` written by an upsert: it is the
    first write of the transaction, so SQLite takes its write lock up front
    (no deadlock on a later lock upgrade) and PostgreSQL locks the row.
    """
    statement = insert_for(connection.dialect)(TrackingRow).values(name=name, position=0)
    statement = statement.on_conflict_do_update(
        index_elements=[TrackingRow.name],
        set_={"position": TrackingRow.position},
    ).returning(TrackingRow.position)
    position: int = connection.execute(statement).scalar_one()
    return position


def set_position(connection: sa.Connection, name: str, position: int) -> None:
    """Set the position of the tracking row ``name`` (held by ``lock``)."""
    connection.execute(
        sa.update(TrackingRow).where(TrackingRow.name == name).values(position=position)
    )
