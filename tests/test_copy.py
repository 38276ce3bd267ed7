"""copy_rows: PostgreSQL COPY on sync psycopg and on async psycopg under run_sync."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import Database
from sqlalchemy.ext.asyncio import AsyncEngine

from evals_orm import create_async_engine, create_engine
from evals_orm._copy import copy_rows, copy_supported

_TABLE = sa.Table(
    "copied",
    sa.MetaData(),
    sa.Column("id", sa.Integer, primary_key=True),
    # JSON has a bind processor: COPY must send what an INSERT would.
    sa.Column("document", sa.JSON),
)
_ROWS = [{"id": 1, "document": {"a": [1, 2]}}, {"id": 2, "document": {"b": "tab\there"}}]


def _postgresql_only(database: Database) -> None:
    if database.backend != "postgresql":
        pytest.skip("COPY is PostgreSQL's")


def _in_async(database: Database, work: Callable[[sa.Connection], Any]) -> Any:
    """Run the sync ``work`` on a connection of an async engine, inside run_sync."""

    async def run() -> Any:
        engine: AsyncEngine = create_async_engine(database.url, auth_token=database.auth_token)
        try:
            async with engine.begin() as connection:
                return await connection.run_sync(work)
        finally:
            await engine.dispose()

    return asyncio.run(run())


def _read(connection: sa.Connection) -> list[tuple[Any, ...]]:
    return [tuple(row) for row in connection.execute(sa.select(_TABLE).order_by(_TABLE.c.id))]


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_copy_rows_stores_what_an_insert_stores(database: Database, mode: str) -> None:
    """Rows copied on a sync or an async psycopg connection read back as inserted."""
    _postgresql_only(database)
    engine = database.engine()
    _TABLE.metadata.create_all(engine)

    def copy(connection: sa.Connection) -> int:
        return copy_rows(connection, _TABLE, _ROWS)

    if mode == "sync":
        with engine.begin() as connection:
            copied = copy(connection)
    else:
        copied = _in_async(database, copy)
    with engine.connect() as connection:
        stored = _read(connection)
    engine.dispose()
    assert (2, [(1, {"a": [1, 2]}), (2, {"b": "tab\there"})]) == (copied, stored)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_copy_rows_raises_sqlalchemy_errors(database: Database, mode: str) -> None:
    """A duplicate key in a COPY raises IntegrityError, as an INSERT would, and stores nothing."""
    _postgresql_only(database)
    engine = database.engine()
    _TABLE.metadata.create_all(engine)

    def copy_twice(connection: sa.Connection) -> None:
        copy_rows(connection, _TABLE, _ROWS + _ROWS[:1])

    def copy_twice_in_a_transaction() -> None:
        if mode == "async":
            _in_async(database, copy_twice)
            return
        with engine.begin() as connection:
            copy_twice(connection)

    with pytest.raises(sa.exc.IntegrityError, match="copied_pkey"):
        copy_twice_in_a_transaction()
    with engine.connect() as connection:
        stored = _read(connection)
    engine.dispose()
    assert [] == stored


def test_copy_is_supported_on_psycopg_connections_only(database: Database) -> None:
    """copy_supported is true on sync and async psycopg connections, false on other drivers."""

    def supported(connection: sa.Connection) -> bool:
        return copy_supported(connection)

    urls = [database.url]
    if database.backend == "postgresql":
        urls.append(database.url.replace("postgresql://", "postgresql+psycopg2://", 1))
    actual = []
    for url in urls:
        engine = create_engine(url, auth_token=database.auth_token)
        with engine.connect() as connection:
            actual.append(supported(connection))
        engine.dispose()
    actual.append(_in_async(database, supported))
    expected = [True, False, True] if database.backend == "postgresql" else [False, False]
    assert expected == actual
