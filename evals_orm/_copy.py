"""PostgreSQL ``COPY`` through psycopg 3, sync or async (inside ``run_sync``)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import psycopg
import sqlalchemy as sa
from sqlalchemy.util import await_

__all__ = ["copy_rows", "copy_supported"]


def copy_supported(connection: sa.Connection) -> bool:
    """Tell whether ``copy_rows`` can load rows on this connection.

    It asks the DBAPI connection itself, not the dialect's driver name:
    SQLAlchemy's async psycopg dialect reports ``driver == "psycopg"`` too.
    """
    return isinstance(
        connection.connection.driver_connection, (psycopg.Connection, psycopg.AsyncConnection)
    )


def copy_rows(connection: sa.Connection, table: sa.Table, rows: Sequence[Mapping[str, Any]]) -> int:
    """Load ``rows`` (all with the same keys) into ``table`` by ``COPY``; return how many.

    Values go through the columns' own bind processors, so the rows are
    exactly what an ``INSERT`` of them stores. ``connection`` is a sync
    psycopg connection, or the sync face of an async one inside
    ``AsyncConnection.run_sync``. A driver error is raised as SQLAlchemy's
    ``DBAPIError`` subclass for it, as an ``INSERT`` would raise it.
    """
    if not rows:
        return 0
    dialect = connection.dialect
    names = list(rows[0])
    quote = dialect.identifier_preparer.quote
    statement = (
        f"COPY {dialect.identifier_preparer.format_table(table)} "
        f"({', '.join(quote(name) for name in names)}) FROM STDIN"
    )
    values = _bound_values(dialect, table, names, rows)
    driver_connection = connection.connection.driver_connection
    try:
        if isinstance(driver_connection, psycopg.AsyncConnection):
            await_(_copy_async(driver_connection, statement, values))
        elif isinstance(driver_connection, psycopg.Connection):
            with driver_connection.cursor() as cursor, cursor.copy(statement) as copy:
                for row in values:
                    copy.write_row(row)
        else:
            raise TypeError(f"COPY needs a psycopg 3 connection, not {driver_connection!r}")
    except psycopg.Error as error:
        raise sa.exc.DBAPIError.instance(statement, None, error, psycopg.Error) from error
    return len(rows)


async def _copy_async(
    driver_connection: psycopg.AsyncConnection[Any], statement: str, values: Iterator[list[Any]]
) -> None:
    async with driver_connection.cursor() as cursor, cursor.copy(statement) as copy:
        for row in values:
            await copy.write_row(row)


def _bound_values(
    dialect: sa.Dialect,
    table: sa.Table,
    names: Sequence[str],
    rows: Sequence[Mapping[str, Any]],
) -> Iterator[list[Any]]:
    processors = [
        (name, table.c[name].type.dialect_impl(dialect).bind_processor(dialect)) for name in names
    ]
    for row in rows:
        yield [row[name] if process is None else process(row[name]) for name, process in processors]
