"""The async services on every backend: binds, one loop of many tasks, cancellation, hosts."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import pytest
import sqlalchemy as sa
from conftest import Database
from projection_worker import T0_MS, long_stream, ms_time, study_id
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from test_projection import Snapshot, lifecycle, reference, snapshot

from evals_orm import (
    AsyncSqlEvalProjection,
    AsyncSqlEvalStorage,
    AsyncSqlEventLog,
    EventConflictError,
    SqlEvalProjection,
    SqlEventLog,
    StoredEvalEvent,
    create_async_engine,
    migrations,
    uuid7_at,
)
from evals_orm.projection import Lag

_T = TypeVar("_T")

# Every test's whole async work ends within this bound, or fails.
BOUND_S = 120


def run(database: Database, work: Callable[[AsyncEngine], Awaitable[_T]]) -> _T:
    """Run ``work`` on a fresh AsyncEngine of ``database`` in a new event loop, within the bound."""

    async def main() -> _T:
        engine = create_async_engine(database.url, auth_token=database.auth_token)
        try:
            return await asyncio.wait_for(work(engine), BOUND_S)
        finally:
            await engine.dispose()

    return asyncio.run(main())


def history(n: int) -> list[StoredEvalEvent]:
    """Study ``n``'s lifecycle, with event ids no other study's history shares."""
    return [
        StoredEvalEvent(uuid7_at(ms_time(T0_MS + 10 * ms), n), stored.event)
        for ms, stored in enumerate(lifecycle(study_id(n)), start=1)
    ]


async def async_snapshot(storage: AsyncSqlEvalStorage) -> Snapshot:
    """Read every study and checkpoint through the async storage, in its orders."""
    studies = await storage.list_studies()
    return studies, [c for s in studies for c in await storage.get_checkpoints(s.id)]


async def paused_after(
    events: Iterable[StoredEvalEvent], count: int, reached: asyncio.Event
) -> AsyncIterator[StoredEvalEvent]:
    """Yield ``events``; after ``count`` of them set ``reached`` and wait forever."""
    for index, stored in enumerate(events):
        if index == count:
            reached.set()
            await asyncio.Event().wait()
        yield stored


# --- binds ----------------------------------------------------------------------------------


def test_every_async_bind_works_and_anything_else_is_a_type_error(
    database: Database, migrated: sa.Engine
) -> None:
    """An AsyncEngine, async_sessionmaker, AsyncConnection or AsyncSession binds; others do not."""
    events = history(1)

    async def work(engine: AsyncEngine) -> list[int]:
        counts = [await AsyncSqlEventLog(engine).append(events[:2])]
        counts.append(await AsyncSqlEventLog(async_sessionmaker(engine)).append(events[:3]))
        async with engine.begin() as connection:
            counts.append(await AsyncSqlEventLog(connection).append(events[:4]))
        async with AsyncSession(engine) as session, session.begin():
            counts.append(await AsyncSqlEventLog(session).append(events[:5]))
        counts.append(await AsyncSqlEventLog(engine).count())
        return counts

    assert [2, 1, 1, 1, 5] == run(database, work)
    for service in (AsyncSqlEventLog, AsyncSqlEvalProjection, AsyncSqlEvalStorage):
        for wrong in (migrated, "sqlite://", None):
            with pytest.raises(TypeError, match="AsyncEngine, an async_sessionmaker"):
                service(wrong)  # type: ignore[arg-type]


def test_migrations_run_from_async_code(database: Database) -> None:
    """migrations.upgrade runs through run_sync on an AsyncConnection, in its transaction."""

    async def work(engine: AsyncEngine) -> int:
        async with engine.begin() as connection:
            await connection.run_sync(migrations.upgrade)
        return await AsyncSqlEventLog(engine).count()

    assert 0 == run(database, work)
    assert migrations.current(database.engine()) is not None


def test_migrations_given_an_async_engine_say_how_to_run_them(database: Database) -> None:
    """An AsyncEngine or AsyncConnection given to the migrations is a TypeError naming run_sync."""

    async def work(engine: AsyncEngine) -> list[str]:
        messages = []
        async with engine.connect() as connection:
            for bind in (engine, connection):
                for call in (migrations.upgrade, migrations.current):
                    with pytest.raises(TypeError) as error:
                        call(bind)  # type: ignore[arg-type]
                    messages.append(str(error.value))
        return messages

    hint = "await connection.run_sync(evals_orm.migrations.upgrade)"
    assert 4 == len([message for message in run(database, work) if hint in message])
    with pytest.raises(TypeError, match="expected an Engine, a Connection or a URL, got 42"):
        migrations.upgrade(42)  # type: ignore[arg-type]


# --- the same projection as the sync services -------------------------------------------------


def test_async_services_give_the_sync_projection_of_the_same_stream(
    database: Database, migrated: sa.Engine
) -> None:
    """Appending, reading, catching up and rebuilding through asyncio equal the sync projection."""
    stream = list(long_stream(1500, studies=5))

    async def events() -> AsyncIterator[StoredEvalEvent]:
        for stored in stream:
            yield stored

    async def work(engine: AsyncEngine) -> tuple[list[int], list[StoredEvalEvent], Snapshot]:
        log = AsyncSqlEventLog(engine)
        projection = AsyncSqlEvalProjection(engine, batch_size=200)
        counts = [
            await log.append(events()),
            await projection.catch_up(log),
            await projection.catch_up(log),
            await projection.rebuild(log.read()),
            await projection.apply_many(events()),
        ]
        read = [stored async for stored in log.read()]
        return counts, read, await async_snapshot(AsyncSqlEvalStorage(engine))

    counts, read, projected = run(database, work)
    assert [len(stream), len(stream), 0, len(stream), 0] == counts
    assert stream == read
    assert reference(stream) == projected == snapshot(migrated)
    assert 0 == SqlEvalProjection(migrated).catch_up(SqlEventLog(migrated))


# --- concurrency in one loop ------------------------------------------------------------------


def test_many_tasks_append_catch_up_and_read_in_one_loop(
    database: Database, migrated: sa.Engine
) -> None:
    """24 appending tasks (inline projection), a catch_up loop and a reader all finish, exactly."""
    studies = 24
    histories = {n: history(n) for n in range(1, studies + 1)}

    async def work(engine: AsyncEngine) -> tuple[int, int, Snapshot, Snapshot]:
        log = AsyncSqlEventLog(engine)
        projection = AsyncSqlEvalProjection(engine)
        storage = AsyncSqlEvalStorage(engine)
        done = asyncio.Event()
        reads = 0

        async def appender(events: list[StoredEvalEvent]) -> int:
            appended = 0
            for start in range(0, len(events), 3):
                appended += await log.append(events[start : start + 3], projection=projection)
            return appended

        async def catcher() -> None:
            while not done.is_set():
                await projection.catch_up(log)
                await asyncio.sleep(0)

        async def reader() -> None:
            nonlocal reads
            while not done.is_set():
                logged = [stored async for stored in log.read()]
                assert len(await storage.list_studies()) <= studies
                assert len(logged) <= sum(map(len, histories.values()))
                reads += 1
                await asyncio.sleep(0)

        helpers = [asyncio.create_task(catcher()), asyncio.create_task(reader())]
        appended = await asyncio.gather(*(appender(events) for events in histories.values()))
        done.set()
        await asyncio.gather(*helpers)
        projected = await async_snapshot(storage)
        await projection.rebuild(log)
        assert reads > 0
        return sum(appended), await log.count(), projected, await async_snapshot(storage)

    total = sum(map(len, histories.values()))
    appended, count, projected, rebuilt = run(database, work)
    assert (total, total) == (appended, count)
    assert reference(e for events in histories.values() for e in events) == projected == rebuilt


def test_a_waiting_writer_does_not_block_the_loop(database: Database, migrated: sa.Engine) -> None:
    """While a host session's write transaction is open, an append awaits it; the loop runs on."""
    events = history(1)

    async def work(engine: AsyncEngine) -> tuple[int, int, int]:
        log = AsyncSqlEventLog(engine)
        ticks = 0
        async with AsyncSession(engine) as session:
            await AsyncSqlEventLog(session).append(events[0])
            append = asyncio.create_task(log.append(events[1:]))
            for _ in range(20):
                await asyncio.sleep(0.01)
                ticks += 1
            assert not append.done()
            await session.commit()
        return ticks, await append, await log.count()

    assert (20, len(events) - 1, len(events)) == run(database, work)


@pytest.mark.parametrize("url", ["sqlite://", "sqlite+libsql://"])
def test_tasks_of_one_loop_share_an_in_memory_database(url: str) -> None:
    """Appending tasks, a catch_up and a reader on one in-memory database lose no event."""
    histories = [history(n) for n in range(1, 13)]
    total = sum(map(len, histories))

    async def main() -> tuple[int, Snapshot]:
        engine = create_async_engine(url)
        try:
            async with engine.begin() as connection:
                await connection.run_sync(migrations.upgrade)
            log = AsyncSqlEventLog(engine)
            projection = AsyncSqlEvalProjection(engine)
            storage = AsyncSqlEvalStorage(engine)

            async def appender(events: list[StoredEvalEvent]) -> None:
                for start in range(0, len(events), 2):
                    await log.append(events[start : start + 2], projection=projection)

            async def reader() -> None:
                for _ in range(10):
                    await storage.list_studies()
                    assert len([stored async for stored in log.read()]) <= total

            work = asyncio.gather(
                *(appender(events) for events in histories), reader(), projection.catch_up(log)
            )
            await asyncio.wait_for(work, BOUND_S)
            return await log.count(), await async_snapshot(storage)
        finally:
            await engine.dispose()

    count, projected = asyncio.run(main())
    assert total == count
    assert reference(e for events in histories for e in events) == projected


# --- cancellation -----------------------------------------------------------------------------


def test_cancellation_mid_apply_many_rolls_back_its_batch_then_converges(
    database: Database, migrated: sa.Engine
) -> None:
    """A task cancelled in apply_many's second batch keeps the first; the next call converges."""
    stream = list(long_stream(600, studies=4))

    async def work(engine: AsyncEngine) -> tuple[Snapshot, int, Snapshot]:
        projection = AsyncSqlEvalProjection(engine, batch_size=200)
        storage = AsyncSqlEvalStorage(engine)
        reached = asyncio.Event()
        task = asyncio.create_task(projection.apply_many(paused_after(stream, 300, reached)))
        await reached.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        after_cancel = await async_snapshot(storage)
        return after_cancel, await projection.apply_many(stream), await async_snapshot(storage)

    after_cancel, applied, converged = run(database, work)
    assert reference(stream[:200]) == after_cancel
    assert (len(stream) - 200, reference(stream)) == (applied, converged)


def test_cancellation_mid_rebuild_keeps_the_old_projection_then_converges(
    database: Database, migrated: sa.Engine
) -> None:
    """A rebuild cut off halfway by a timeout leaves the old projection; the next converges."""
    old = list(long_stream(300, studies=3, seed=1))
    new = list(long_stream(900, studies=5, seed=2))

    async def work(engine: AsyncEngine) -> tuple[Snapshot, int, Snapshot]:
        projection = AsyncSqlEvalProjection(engine, batch_size=100)
        storage = AsyncSqlEvalStorage(engine)
        await projection.apply_many(old)
        reached = asyncio.Event()
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(projection.rebuild(paused_after(new, 450, reached)), 2)
        assert reached.is_set()
        after_cancel = await async_snapshot(storage)
        return after_cancel, await projection.rebuild(new), await async_snapshot(storage)

    after_cancel, rebuilt, converged = run(database, work)
    assert reference(old) == after_cancel
    assert (len(new), reference(new)) == (rebuilt, converged)


def test_timeouts_landing_anywhere_in_apply_many_leave_the_engine_usable(
    database: Database, migrated: sa.Engine
) -> None:
    """apply_many cut off by timeouts at many points (mid-statement too) still converges."""
    stream = list(long_stream(3000, studies=6))

    async def work(engine: AsyncEngine) -> tuple[int, Snapshot]:
        projection = AsyncSqlEvalProjection(engine, batch_size=250)
        # From before the first statement to well into the stream, 1.5x apart.
        for timeout in (0.001 * 1.5**step for step in range(16)):
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(projection.apply_many(stream), timeout)
        await projection.apply_many(stream)
        log = AsyncSqlEventLog(engine)
        appended = await asyncio.wait_for(log.append(stream[:10]), 30)
        return appended, await async_snapshot(AsyncSqlEvalStorage(engine))

    appended, converged = run(database, work)
    assert (10, reference(stream)) == (appended, converged)


# --- the caller's transaction -----------------------------------------------------------------


def test_host_async_session_commits_and_rolls_back_its_row_with_the_events(
    database: Database, migrated: sa.Engine
) -> None:
    """A host AsyncSession's own row and the events it appends commit or roll back together."""
    with migrated.begin() as connection:
        connection.exec_driver_sql("CREATE TABLE host_notes (note VARCHAR(20))")
    insert = sa.text("INSERT INTO host_notes (note) VALUES (:note)")
    events = history(1)

    async def write(engine: AsyncEngine, note: str, commit: bool) -> tuple[int, int]:
        async with AsyncSession(engine) as session:
            await session.execute(insert, {"note": note})
            log = AsyncSqlEventLog(session)
            appended = await log.append(events[:4], projection=AsyncSqlEvalProjection(session))
            with pytest.raises(EventConflictError):
                await log.append(StoredEvalEvent(events[0].event_id, events[1].event))
            seen = len(await AsyncSqlEvalStorage(session).list_studies())
            await (session.commit() if commit else session.rollback())
        return appended, seen

    async def work(engine: AsyncEngine) -> list[object]:
        rolled_back = await write(engine, "rolled back", commit=False)
        state = [await AsyncSqlEventLog(engine).count()]
        committed = await write(engine, "committed", commit=True)
        async with engine.connect() as connection:
            notes = (await connection.execute(sa.text("SELECT note FROM host_notes"))).all()
        return [rolled_back, *state, committed, await AsyncSqlEventLog(engine).count(), notes]

    assert [(4, 1), 0, (4, 1), 4, [("committed",)]] == run(database, work)
    assert reference(events[:4]) == snapshot(migrated)


def test_a_host_async_connection_rollback_undoes_the_appended_events(
    database: Database, migrated: sa.Engine
) -> None:
    """Events appended on a host AsyncConnection go when its transaction rolls back."""
    events = history(1)

    async def work(engine: AsyncEngine) -> list[int]:
        async with engine.connect() as connection:
            log = AsyncSqlEventLog(connection)
            appended = await log.append(events, projection=AsyncSqlEvalProjection(connection))
            inside = await log.count()
            await connection.rollback()
        return [appended, inside, await AsyncSqlEventLog(engine).count()]

    assert [len(events), len(events), 0] == run(database, work)
    assert ([], []) == snapshot(migrated)


# --- follow -----------------------------------------------------------------------------------


def _follow_until_caught_up(
    database: Database, studies: int, *, poll_interval: float | None = None
) -> tuple[int, int, Snapshot, float]:
    """Follow in a task while another appends ``studies`` histories; stop once all are applied.

    Return what ``follow`` returned, how often a third task ticked in half a
    second of the follower's waiting, the projection, and how long the last
    append took to be applied.
    """
    total = sum(len(history(n)) for n in range(studies))

    async def work(engine: AsyncEngine) -> tuple[int, int, Snapshot, float]:
        log, projection = AsyncSqlEventLog(engine), AsyncSqlEvalProjection(engine)
        stop, caught_up = asyncio.Event(), asyncio.Event()
        ticks = 0

        def progress(lag: Lag) -> None:
            if lag.applied == total and not lag.behind:
                caught_up.set()

        async def ticker() -> None:
            nonlocal ticks
            while not stop.is_set():
                ticks += 1
                await asyncio.sleep(0.01)

        follower = asyncio.create_task(
            projection.follow(log, poll_interval=poll_interval, stop=stop, on_progress=progress)
        )
        ticking = asyncio.create_task(ticker())
        for n in range(studies):
            await log.append(history(n))
        appended = asyncio.get_running_loop().time()
        waiting = asyncio.create_task(caught_up.wait())
        await asyncio.wait({follower, waiting}, timeout=60, return_when=asyncio.FIRST_COMPLETED)
        if follower.done():
            follower.result()  # the follower's error, if it failed
        assert waiting.done(), "the follower did not catch up within 60 s"
        latency = asyncio.get_running_loop().time() - appended
        # The follower now waits for appends, and its waits await: a task
        # ticking every 10 ms meanwhile keeps ticking (about 50 times).
        before = ticks
        await asyncio.sleep(0.5)
        idle_ticks = ticks - before
        stop.set()
        applied = await asyncio.wait_for(follower, 10)
        await ticking
        return applied, idle_ticks, await async_snapshot(AsyncSqlEvalStorage(engine)), latency

    return run(database, work)


def test_a_follower_task_projects_other_tasks_appends_until_stopped(
    database: Database, migrated: sa.Engine
) -> None:
    """follow as a task: it applies every append of another task; the loop runs meanwhile."""
    applied, idle_ticks, projected, _ = _follow_until_caught_up(database, 4)
    events = [stored for n in range(4) for stored in history(n)]
    assert len(events) == applied
    assert reference(events) == projected == snapshot(migrated)
    # A wait that blocked the loop (a sleep of the poll interval, a LISTEN
    # of half a second) would have let it tick a few times at most.
    assert idle_ticks >= 10


def test_an_async_follower_on_postgresql_wakes_on_the_append_not_the_poll(
    database: Database, migrated: sa.Engine
) -> None:
    """On PostgreSQL the async follower LISTENs: an append is applied long before the poll."""
    if database.backend != "postgresql":
        pytest.skip("only PostgreSQL notifies followers of appends; elsewhere they poll")
    applied, _, _, latency = _follow_until_caught_up(database, 2, poll_interval=60)
    assert sum(len(history(n)) for n in range(2)) == applied
    assert latency < 10


def test_cancelling_a_follower_task_leaves_a_projection_catch_up_completes(
    database: Database, migrated: sa.Engine
) -> None:
    """A follower task cancelled mid-stream ends at once; catch_up then converges on the log."""
    events = [stored for n in range(6) for stored in history(n)]

    async def work(engine: AsyncEngine) -> tuple[bool, Snapshot, Lag]:
        log = AsyncSqlEventLog(engine)
        projection = AsyncSqlEvalProjection(engine, batch_size=3)
        started = asyncio.Event()
        follower = asyncio.create_task(
            projection.follow(log, on_progress=lambda lag: started.set())
        )
        await asyncio.wait_for(started.wait(), 30)
        for stored in events:
            await log.append(stored)
        follower.cancel()
        # Not ``await follower``: a cancellation the follower dropped would
        # be this task's then, and go unseen.
        await asyncio.wait((follower,), timeout=10)
        assert follower.done(), "the follower still ran 10 s after its cancellation"
        await projection.catch_up(log)
        lag = await projection.lag(log)
        return follower.cancelled(), await async_snapshot(AsyncSqlEvalStorage(engine)), lag

    cancelled, projected, lag = run(database, work)
    assert cancelled
    assert reference(events) == projected
    assert (0, 0) == (lag.applied, lag.behind)


# --- atomic rebuild -------------------------------------------------------------------------


def test_rebuild_is_atomic_for_a_concurrent_async_reader(
    database: Database, migrated: sa.Engine
) -> None:
    """While a rebuild runs, a task of the same loop reads the whole old projection."""
    old = history(1)
    new = history(2) + history(3)

    async def work(engine: AsyncEngine) -> tuple[Snapshot, int, Snapshot]:
        projection = AsyncSqlEvalProjection(engine, batch_size=2)
        storage = AsyncSqlEvalStorage(engine)
        await projection.apply_many(old)
        reached, resume = asyncio.Event(), asyncio.Event()

        async def slow() -> AsyncIterator[StoredEvalEvent]:
            for index, stored in enumerate(new):
                if index == 5:
                    reached.set()
                    await resume.wait()
                yield stored

        rebuild = asyncio.create_task(projection.rebuild(slow()))
        await reached.wait()
        during = await async_snapshot(storage)
        resume.set()
        return during, await rebuild, await async_snapshot(storage)

    during, rebuilt, after = run(database, work)
    assert reference(old) == during
    assert (len(new), reference(new)) == (rebuilt, after)


# --- the README -----------------------------------------------------------------------------


def test_the_readme_async_example_runs(database: Database) -> None:
    """The README's "From asyncio" example runs as written on a fresh database."""
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    match = re.search(r"```python\n(.*?)```", text.split("## From asyncio", 1)[1], re.DOTALL)
    assert match is not None
    namespace: dict[str, Any] = {"__name__": "readme_async_example"}
    exec(compile(match.group(1), "README.md", "exec"), namespace)
    engine = create_async_engine(database.url, auth_token=database.auth_token)
    asyncio.run(namespace["main"](engine))
    sync_engine = database.engine()
    try:
        assert 1 == SqlEventLog(sync_engine).count()
    finally:
        sync_engine.dispose()
