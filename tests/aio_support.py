"""Shared service tests through the async classes: fixtures that make either kind of service.

``projection_factory`` and ``log_factory`` are parametrized ``sync``/``async``:
the async kind is the ``Async*`` service on an async engine of the same
database, driven from the sync test by a facade that runs each call to
completion in an event loop of its own. The tests stay written once.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from typing import Any, cast

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import NullPool

from evals_orm import (
    AsyncSqlEvalProjection,
    AsyncSqlEventLog,
    SqlEvalProjection,
    SqlEventLog,
    create_async_engine,
)
from evals_orm.testing import Database

__all__ = [
    "LogFactory",
    "ProjectionFactory",
    "async_engine",
    "log_factory",
    "projection_factory",
    "service_kind",
]

ProjectionFactory = Callable[..., SqlEvalProjection]
LogFactory = Callable[[sa.Engine], SqlEventLog]

KINDS = ["sync", "async"]


class Blocking:
    """An async service called from sync code: each call runs in a new event loop.

    Services given as arguments (an inline projection, the log to catch up
    from) are passed on as the async services they wrap.
    """

    def __init__(self, service: object) -> None:
        self.service = service

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self.service, name)
        if not callable(attribute):
            return attribute

        def call(*args: Any, **kwargs: Any) -> Any:
            args = tuple(_unwrapped(value) for value in args)
            kwargs = {key: _unwrapped(value) for key, value in kwargs.items()}
            result = attribute(*args, **kwargs)
            if isinstance(result, AsyncIterator):
                return BlockingIterator(result)
            return asyncio.run(cast(Coroutine[Any, Any, Any], result))

        return call


class BlockingIterator(Iterator[Any]):
    """An async iterator (``read()``'s) iterated from sync code, each step in a new loop."""

    def __init__(self, service: AsyncIterator[Any]) -> None:
        self.service = service

    def __next__(self) -> Any:
        async def step() -> Any:
            return await anext(self.service)

        try:
            return asyncio.run(step())
        except StopAsyncIteration:
            raise StopIteration from None


def _unwrapped(value: object) -> object:
    return value.service if isinstance(value, (Blocking, BlockingIterator)) else value


@pytest.fixture
def async_engine(database: Database) -> Iterator[AsyncEngine]:
    """An AsyncEngine on the test's database whose connections serve any event loop."""
    engine = create_async_engine(database.url, auth_token=database.auth_token, poolclass=NullPool)
    yield engine
    asyncio.run(engine.dispose())


@pytest.fixture(params=KINDS)
def service_kind(request: pytest.FixtureRequest) -> str:
    """Which services the test gets: the sync ones, or the async ones behind a facade."""
    return cast(str, request.param)


@pytest.fixture
def projection_factory(service_kind: str, request: pytest.FixtureRequest) -> ProjectionFactory:
    """Make a projection of the engine, of ``service_kind``."""
    if service_kind == "sync":
        return SqlEvalProjection
    engine: AsyncEngine = request.getfixturevalue("async_engine")

    def make(_: sa.Engine, **options: Any) -> SqlEvalProjection:
        return cast(SqlEvalProjection, Blocking(AsyncSqlEvalProjection(engine, **options)))

    return make


@pytest.fixture
def log_factory(service_kind: str, request: pytest.FixtureRequest) -> LogFactory:
    """Make a log of the engine, of ``service_kind``."""
    if service_kind == "sync":
        return SqlEventLog
    engine: AsyncEngine = request.getfixturevalue("async_engine")
    return lambda _: cast(SqlEventLog, Blocking(AsyncSqlEventLog(engine)))
