"""create_async_engine: every URL, the async driver, quirks, pools, cancellation, secrecy."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
import sqlalchemy as sa
from conftest import Database
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession
from sqlalchemy.pool import AsyncAdaptedQueuePool
from test_engine import _closed_port, _corrupt_libsql_file, equivalent_urls

from evals_orm import ConfigurationError, create_async_engine
from evals_orm._sqld import running_sqld
from evals_orm.engine import BUSY_TIMEOUT_MS

_T = TypeVar("_T")

# The async driver each backend's URLs get, whatever sync driver they name.
_ASYNC_DRIVER = {
    "sqlite": "aiosqlite",
    "libsql": "evals_aiolibsql",
    "libsql-remote": "evals_aiolibsql",
    "postgresql": "psycopg_async",
    "mariadb": "asyncmy",
}


def _async_urls(database: Database) -> list[str]:
    """Return the async drivers' own spellings of ``database``'s URL."""
    rest = database.url.split("://", 1)[1]
    if database.backend == "sqlite":
        return [f"sqlite+aiosqlite://{rest}"]
    if database.backend in ("libsql", "libsql-remote"):
        return [f"sqlite+evals_aiolibsql://{rest}", f"sqlite+aiolibsql://{rest}"]
    if database.backend == "mariadb":
        return [f"mysql+asyncmy://{rest}", f"mariadb+asyncmy://{rest}"]
    return [f"postgresql+psycopg_async://{rest}", f"postgresql+asyncpg://{rest}"]


def _using(
    database: Database, work: Callable[[AsyncEngine], Awaitable[_T]], url: str | None = None
) -> _T:
    """Run ``work`` on a fresh async engine of ``database`` in a new event loop."""

    async def run() -> _T:
        engine = create_async_engine(url or database.url, auth_token=database.auth_token)
        try:
            return await work(engine)
        finally:
            await engine.dispose()

    return asyncio.run(run())


def test_every_url_form_reaches_the_same_database_with_the_async_driver(
    database: Database,
) -> None:
    """Each URL create_engine takes, and the async drivers' own, reach the database from asyncio."""
    with database.engine().begin() as connection:
        connection.exec_driver_sql("CREATE TABLE probe (value INTEGER)")
        connection.exec_driver_sql("INSERT INTO probe VALUES (42)")

    async def read(engine: AsyncEngine) -> tuple[str, object]:
        async with engine.connect() as connection:
            value = (await connection.exec_driver_sql("SELECT value FROM probe")).scalar()
        return engine.url.get_driver_name(), value

    expected_driver = _ASYNC_DRIVER[database.backend]
    urls = equivalent_urls(database) + _async_urls(database)
    actual = [_using(database, read, url) for url in urls]
    expected = [(expected_driver, 42) for _ in urls]
    if database.backend == "postgresql":
        expected[-1] = ("asyncpg", 42)  # named explicitly, so kept
    assert expected == actual


@pytest.mark.parametrize(
    ("url", "expected_url", "expected_pool"),
    [
        ("sqlite:///some.db", "sqlite+aiosqlite:///some.db", AsyncAdaptedQueuePool),
        ("sqlite://", "sqlite+aiosqlite://", AsyncAdaptedQueuePool),
        ("sqlite+libsql:///some.db", "sqlite+evals_aiolibsql:///some.db", AsyncAdaptedQueuePool),
        ("sqlite+aiolibsql:///some.db", "sqlite+evals_aiolibsql:///some.db", AsyncAdaptedQueuePool),
        ("sqlite+libsql://", "sqlite+evals_aiolibsql://", AsyncAdaptedQueuePool),
        ("libsql://db.example.org", "sqlite+evals_aiolibsql://db.example.org?secure=true", None),
        ("http://127.0.0.1:8080", "sqlite+evals_aiolibsql://127.0.0.1:8080", None),
        ("postgresql://u@h/db", "postgresql+psycopg_async://u@h/db", None),
        ("postgresql+psycopg2://u@h/db", "postgresql+psycopg_async://u@h/db", None),
        ("postgresql+asyncpg://u@h/db", "postgresql+asyncpg://u@h/db", None),
        ("mysql://u@h/db", "mysql+asyncmy://u@h/db?charset=utf8mb4", None),
        ("mariadb+pymysql://u@h/db", "mariadb+asyncmy://u@h/db?charset=utf8mb4", None),
    ],
)
def test_url_forms_map_to_async_driver_urls(
    url: str, expected_url: str, expected_pool: type[sa.pool.Pool] | None
) -> None:
    """Each URL becomes its async driver's URL and a queue pool (of one connection in memory)."""
    engine = create_async_engine(url)
    pool = expected_pool or AsyncAdaptedQueuePool
    actual = (engine.url.render_as_string(hide_password=False), type(engine.sync_engine.pool))
    assert (expected_url, pool) == actual


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("oracle://u@h/db", "unsupported database URL scheme 'oracle'"),
        ("http://127.0.0.1:abc", "cannot parse the database URL"),
        ("postgresql://postgres@[::1/x", "cannot parse the database URL"),
        ("libsql://", "needs a host"),
    ],
)
def test_bad_urls_raise_configuration_error(url: str, message: str) -> None:
    """create_async_engine refuses the URLs create_engine refuses, in one sentence."""
    with pytest.raises(ConfigurationError, match=message) as raised:
        create_async_engine(url)
    assert "\n" not in str(raised.value)


def test_the_async_libsql_dialect_resolves_in_a_fresh_process() -> None:
    """``sqlite+evals_aiolibsql`` URLs load through the package's entry point, as Alembic does."""
    code = (
        "import sqlalchemy as sa; "
        "print(sa.make_url('sqlite+evals_aiolibsql://').get_dialect().__name__)"
    )
    output = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert "AsyncLibsqlDialect" == output.strip()


def test_file_databases_get_foreign_keys_wal_and_a_lock_wait(database: Database) -> None:
    """Async SQLite and libSQL connections run with foreign keys on and WAL.

    aiosqlite waits for locks with SQLite's busy timeout; the libSQL adapter
    waits itself (busy timeout 0) so the driver never holds the GIL while waiting.
    """
    if database.backend in ("postgresql", "mariadb"):
        pytest.skip("SQLite pragmas do not exist on database servers")

    async def pragmas(engine: AsyncEngine) -> list[object]:
        names = ["foreign_keys", "journal_mode"]
        if database.backend != "libsql-remote":  # sqld refuses busy_timeout
            names.append("busy_timeout")
        async with engine.connect() as connection:
            return [(await connection.exec_driver_sql(f"PRAGMA {name}")).scalar() for name in names]

    expected: list[object] = [1, "wal"]
    if database.backend == "sqlite":
        expected.append(BUSY_TIMEOUT_MS)
    elif database.backend == "libsql":
        expected.append(0)
    assert expected == _using(database, pragmas)


def test_a_writer_waiting_for_the_lock_leaves_the_loop_running(database: Database) -> None:
    """A second writer waits for the first without freezing the loop; both commit.

    The first writer's commit happens in another task of the same loop, so
    a waiter that blocked the loop (or held the GIL) would wait out the busy
    timeout and fail.
    """
    if database.backend == "libsql-remote":
        pytest.skip(
            "sqld aborts the lock holder's transaction (TRANSACTION_TIMEOUT) while another "
            "writer waits, sync or async; the services queue a process's writers instead"
        )

    async def contend(engine: AsyncEngine) -> tuple[int, int, float]:
        async with engine.begin() as connection:
            await connection.exec_driver_sql("CREATE TABLE contended (value INTEGER)")
        ticks = 0
        async with engine.connect() as holder, engine.connect() as waiter:
            await holder.exec_driver_sql("INSERT INTO contended VALUES (1)")

            async def wait_and_write() -> None:
                # RETURNING: libSQL only steps such a statement when it is fetched.
                inserted = await waiter.exec_driver_sql(
                    "INSERT INTO contended VALUES (2) RETURNING value"
                )
                assert 2 == inserted.scalar_one()
                await waiter.commit()

            started = time.monotonic()
            task = asyncio.create_task(wait_and_write())
            while time.monotonic() - started < 0.3:
                await asyncio.sleep(0.01)
                ticks += 1
            await holder.commit()
            await task
            elapsed = time.monotonic() - started
        async with engine.connect() as reader:
            count = (await reader.exec_driver_sql("SELECT count(*) FROM contended")).scalar()
        return int(count or 0), ticks, elapsed

    count, ticks, elapsed = _using(database, contend)
    assert 2 == count
    assert ticks >= 10, "the loop stood still while the writer waited"
    assert elapsed < 5


@pytest.mark.parametrize("url", ["sqlite://", "sqlite+libsql://"])
def test_in_memory_database_is_shared_by_all_async_connections(url: str) -> None:
    """Every connection of an async in-memory engine sees one database."""

    async def share() -> list[object]:
        engine = create_async_engine(url)
        async with engine.begin() as connection:
            await connection.exec_driver_sql("CREATE TABLE shared (value INTEGER)")
            await connection.exec_driver_sql("INSERT INTO shared VALUES (7)")
        seen = []
        for _ in range(2):
            async with engine.connect() as other:
                seen.append((await other.exec_driver_sql("SELECT value FROM shared")).scalar())
        await engine.dispose()
        return seen

    assert [7, 7] == asyncio.run(share())


_ROWS = sa.Table("host_rows", sa.MetaData(), sa.Column("name", sa.String(20), primary_key=True))


def test_async_session_commits_and_rolls_back(database: Database) -> None:
    """A host AsyncSession's rollback leaves nothing, its commit keeps its rows."""

    async def session_work(engine: AsyncEngine) -> list[str]:
        async with engine.begin() as connection:
            await connection.run_sync(_ROWS.metadata.create_all)
        async with AsyncSession(engine) as session:
            await session.execute(_ROWS.insert().values(name="rolled back"))
            await session.rollback()
            await session.execute(_ROWS.insert().values(name="committed"))
            await session.commit()
        async with AsyncSession(engine) as session:
            return list((await session.scalars(sa.select(_ROWS.c.name))).all())

    assert ["committed"] == _using(database, session_work)


def test_cancelling_a_transaction_rolls_it_back_and_keeps_the_engine(database: Database) -> None:
    """A task cancelled in the middle of its transaction leaves no row, and the engine works on."""

    async def cancel(engine: AsyncEngine) -> int:
        async with engine.begin() as connection:
            await connection.exec_driver_sql("CREATE TABLE batch (value INTEGER)")
        inserted = asyncio.Event()

        async def endless_batch() -> None:
            async with engine.begin() as connection:
                value = 0
                while True:
                    await connection.exec_driver_sql(f"INSERT INTO batch VALUES ({value})")
                    value += 1
                    inserted.set()

        task = asyncio.create_task(endless_batch())
        await asyncio.wait_for(inserted.wait(), 30)
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        async with engine.begin() as connection:
            await connection.exec_driver_sql("INSERT INTO batch VALUES (-1)")
        async with engine.connect() as connection:
            count = (await connection.exec_driver_sql("SELECT count(*) FROM batch")).scalar()
        return int(count or 0)

    assert 1 == asyncio.run(asyncio.wait_for(_async_using(database, cancel), 60))


async def _async_using(database: Database, work: Callable[[AsyncEngine], Awaitable[_T]]) -> _T:
    engine = create_async_engine(database.url, auth_token=database.auth_token)
    try:
        return await work(engine)
    finally:
        await engine.dispose()


def test_driver_errors_are_typed(database: Database) -> None:
    """A constraint violation is IntegrityError, a missing table OperationalError/ProgrammingError.

    libSQL raises bare ValueErrors; the async engine types them as the sync one does.
    """

    async def fail(engine: AsyncEngine) -> list[type[BaseException]]:
        async with engine.begin() as connection:
            await connection.exec_driver_sql("CREATE TABLE unique_values (value INTEGER UNIQUE)")
            await connection.exec_driver_sql("INSERT INTO unique_values VALUES (1)")
        raised: list[type[BaseException]] = []
        for statement in ("INSERT INTO unique_values VALUES (1)", "SELECT * FROM no_such_table"):
            async with engine.connect() as connection:
                try:
                    await connection.exec_driver_sql(statement)
                except sa.exc.DBAPIError as error:
                    raised.append(type(error))
        return raised

    missing_table = (
        sa.exc.ProgrammingError
        if database.backend in ("postgresql", "mariadb")
        else sa.exc.OperationalError
    )
    assert [sa.exc.IntegrityError, missing_table] == _using(database, fail)


def _remote_only(database: Database) -> str:
    if database.auth_token is None:
        pytest.skip("only remote libSQL takes an auth token")
    return database.auth_token


def test_token_is_absent_from_repr_url_and_errors(database: Database) -> None:
    """The auth token authenticates the async engine and appears in none of its renderings."""
    token = _remote_only(database)

    async def render(engine: AsyncEngine) -> list[str]:
        async with engine.connect() as connection:
            assert 1 == (await connection.exec_driver_sql("SELECT 1")).scalar()
            with pytest.raises(sa.exc.OperationalError) as raised:
                await connection.exec_driver_sql("SELECT * FROM no_such_table")
        return [repr(engine), str(engine.url), repr(engine.url), str(raised.value)]

    url = f"libsql://{database.url.split('://')[1]}?tls=0&authToken={token}"
    renderings = _using(database, render) + _using(database, render, url)
    assert [] == [text for text in renderings if token in text]


def test_failed_connection_is_typed_and_hides_the_token() -> None:
    """An async connect to a closed port raises OperationalError without the token."""
    token = "s3cr3t-token-value"

    async def connect() -> str:
        engine = create_async_engine(f"http://127.0.0.1:{_closed_port()}", auth_token=token)
        with pytest.raises(sa.exc.OperationalError, match="Connection refused") as raised:
            await engine.connect()
        await engine.dispose()
        return str(raised.value) + repr(engine)

    assert token not in asyncio.run(connect())


def test_commit_on_a_killed_server_raises_a_typed_error(tmp_path: Path) -> None:
    """An async commit whose libSQL server died raises OperationalError, not ValueError."""

    async def commit_after_kill(url: str, token: str, pid: int) -> sa.exc.OperationalError:
        engine = create_async_engine(url, auth_token=token)
        async with engine.begin() as connection:
            await connection.exec_driver_sql("CREATE TABLE doomed (value INTEGER)")
        connection = await engine.connect()
        await connection.exec_driver_sql("INSERT INTO doomed VALUES (1)")
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(sa.exc.OperationalError, match="Hrana") as raised:
            await connection.commit()
        await connection.close()
        await engine.dispose()
        return raised.value

    with running_sqld(tmp_path / "sqld") as server:
        error = asyncio.run(commit_after_kill(server.url, server.auth_token, server.pid))
    assert server.auth_token not in str(error)


def test_corrupt_libsql_file_raises_a_typed_error(tmp_path: Path) -> None:
    """Reading a corrupt libSQL file through the async engine raises OperationalError."""
    path = tmp_path / "corrupt.db"
    _corrupt_libsql_file(path)

    async def read() -> str:
        engine = create_async_engine(f"sqlite+libsql:///{path}")
        async with engine.connect() as connection:
            with pytest.raises(sa.exc.OperationalError) as raised:
                await _read_all(connection)
        await engine.dispose()
        return str(raised.value)

    assert "database disk image is malformed" in asyncio.run(read())


async def _read_all(connection: AsyncConnection) -> None:
    (await connection.exec_driver_sql("SELECT name FROM names")).all()


def test_an_encrypted_libsql_file_through_the_async_engine(tmp_path: Path) -> None:
    """The async engine writes an encrypted libSQL file and reads it back with the key only."""
    key, canary = "async-encryption-key-value", "async-plaintext-canary"
    url = f"sqlite+libsql:///{tmp_path / 'secret.db'}"

    async def write_then_read() -> tuple[list[object], str]:
        engine = create_async_engine(url, encryption_key=key)
        async with engine.begin() as connection:
            await connection.exec_driver_sql("CREATE TABLE notes (value TEXT)")
            await connection.exec_driver_sql(f"INSERT INTO notes VALUES ('{canary}')")
        await engine.dispose()
        engine = create_async_engine(url, encryption_key=key)
        async with engine.connect() as connection:
            values = list((await connection.exec_driver_sql("SELECT value FROM notes")).scalars())
        await engine.dispose()
        keyless = create_async_engine(url)
        with pytest.raises(sa.exc.OperationalError) as raised:
            await keyless.connect()
        await keyless.dispose()
        return values, str(raised.value)

    values, error = asyncio.run(write_then_read())
    stored = b"".join(file.read_bytes() for file in tmp_path.iterdir())
    assert [canary] == values
    assert canary.encode() not in stored
    assert "pass its encryption_key" in error
    assert key not in error


def test_stream_reads_rows_in_batches(database: Database) -> None:
    """``AsyncConnection.stream`` works on every backend (libSQL: a server-side cursor)."""
    numbers = sa.text(
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 1000) "
        "SELECT i FROM n"
    )

    async def stream(engine: AsyncEngine) -> list[int]:
        async with engine.connect() as connection:
            result = await connection.stream(numbers)
            return [len(batch) async for batch in result.partitions(100)]

    assert [100] * 10 == _using(database, stream)


def test_a_stale_snapshot_fails_at_once_instead_of_waiting(tmp_path: Path) -> None:
    """A libSQL transaction whose snapshot another writer outdated fails at once, typed.

    Waiting cannot cure it (SQLite's busy handler does not wait either), so
    the adapter's own lock wait must not spend the busy timeout on it.
    """

    async def outdated(engine: AsyncEngine) -> tuple[float, str]:
        async with engine.begin() as connection:
            await connection.exec_driver_sql("CREATE TABLE counted (value INTEGER)")
        async with engine.connect() as reader, engine.connect() as writer:
            await reader.exec_driver_sql("BEGIN")
            await reader.exec_driver_sql("SELECT count(*) FROM counted")
            await writer.exec_driver_sql("INSERT INTO counted VALUES (1)")
            await writer.commit()
            started = time.monotonic()
            with pytest.raises(sa.exc.OperationalError) as raised:
                await reader.exec_driver_sql("INSERT INTO counted VALUES (2)")
            return time.monotonic() - started, str(raised.value)

    database = Database("libsql", f"sqlite+libsql:///{tmp_path / 'snapshot.db'}")
    elapsed, message = _using(database, outdated)
    assert "database is locked" in message
    assert elapsed < 2


@pytest.mark.parametrize("option", [{"sync_url": "http://127.0.0.1:8080"}, {"sync_interval": 5}])
def test_an_async_embedded_replica_is_refused_in_one_sentence(
    tmp_path: Path, option: dict[str, Any]
) -> None:
    """Embedded replicas are sync engines: the async factory says so instead of a TypeError."""
    with pytest.raises(ConfigurationError, match=r"embedded replica \(sync_url\) is a sync engine"):
        create_async_engine(f"sqlite+libsql:///{tmp_path / 'replica.db'}", **option)
