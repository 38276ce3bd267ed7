"""Connections, transactions, dialect upserts and driver-error translation.

Everything that touches a Connection goes through here, so the services
never branch on the dialect and never leak a driver exception.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Union

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, sessionmaker

from evals_orm.errors import DatabaseError, EvalsError
from evals_orm.models import TrackingRow

__all__ = ["Bind", "engine_of", "lock", "read", "set_position", "transaction", "upsert"]

Bind = Union[sa.Engine, "sessionmaker[Session]"]

_MISSING_SCHEMA = re.compile(
    r"no such table|relation \"?[\w.]+\"? does not exist|UndefinedTable", re.IGNORECASE
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


def _translate(error: Exception) -> EvalsError:
    message = str(getattr(error, "orig", None) or error).strip().splitlines()[0]
    if _MISSING_SCHEMA.search(message):
        return DatabaseError(
            "the evals_orm tables are missing from this database; "
            "run `evals-orm db upgrade` (or evals_orm.migrations.upgrade) first"
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
        raise _translate(error) from error


@contextmanager
def read(bind: Bind) -> Iterator[sa.Connection]:
    """Yield a Connection for reads; driver errors become ``DatabaseError``."""
    with _translated():
        if isinstance(bind, sa.Engine):
            with bind.connect() as connection:
                yield connection
        else:
            with bind() as session:
                yield session.connection()


@contextmanager
def transaction(bind: Bind) -> Iterator[sa.Connection]:
    """Yield a Connection in a transaction committed at the end, rolled back on error."""
    with _translated():
        if isinstance(bind, sa.Engine):
            with bind.begin() as connection:
                yield connection
        else:
            with bind.begin() as session:
                yield session.connection()


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
    connection.execute(statement, list(rows))


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
