"""Benchmark of issue #7: the projection against the physical limit and a naive ORM loop.

Run by ``nox -s bench`` (``python benchmarks/bench.py``). On each backend, in
one process, it measures

1. ``apply_many`` into an empty, migrated database: ours, the raw driver's
   ``executemany`` of the same final rows (the physical limit) and a naive
   ORM loop (flush per event); all three must leave identical rows;
2. ``rebuild`` scaling: two stream lengths, each in a fresh subprocess, for
   time and peak memory (the stream is generated lazily, never a list);
3. queries: ``get_checkpoints_in_range`` and ``get_latest_checkpoint`` as the
   table grows tenfold, and ``list_studies`` of many studies (statements
   counted).

It prints tables with OK/MISS against the issue's targets; it asserts
nothing and exits 0 whatever the numbers are.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import io
import itertools
import json
import os
import platform
import pstats
import resource
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import timedelta
from importlib import metadata
from pathlib import Path
from typing import Any

import attrs
import libsql_experimental
import psycopg
import pymysql
import sqlalchemy as sa
from _baselines import ExecuteMany, naive_orm, raw_load, table_digest
from _stream import CLOCK_START, TICK, Shape, events

from evals_orm import (
    AsyncSqlEvalProjection,
    SqlEvalProjection,
    SqlEvalStorage,
    StoredEvalEvent,
    StudyId,
    create_async_engine,
    create_engine,
)
from evals_orm._backend_names import BACKENDS
from evals_orm._sqld import running_sqld
from evals_orm.models import StudyRow

DEFAULT_BACKENDS = BACKENDS
POSTGRES_ADMIN_URL = os.environ.get(
    "EVALS_ORM_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
MYSQL_ADMIN_URL = os.environ.get("EVALS_ORM_BENCH_MYSQL_URL", "mysql://root@127.0.0.1:3306/")

# Targets of issue #7.
MAX_OURS_OVER_RAW = 1.5
MIN_NAIVE_OVER_OURS = 3.0
MAX_TIME_GROWTH = 1.1  # x the growth of the stream (10x events: at most 11x time)
MAX_MEMORY_GROWTH = 1.25  # peak RSS of the long rebuild over the short one
MAX_QUERY_GROWTH = 1.5
# Issue 12: the async projection's throughput over the sync one's, same backend.
MIN_ASYNC_OVER_SYNC = 0.67
QUERY_CALLS = 50
CHECKPOINTS_PER_QUERY_STUDY = 240  # hourly, so a week (168) fits inside every study
REBUILD_STUDIES = 200


@attrs.frozen
class Sizes:
    """How much work each part does on one backend."""

    apply: Shape
    rebuild: tuple[int, int]  # events (approximately) of the short and the long rebuild
    queries: tuple[int, int]  # checkpoints in the table before and after it grows
    list_studies: int


SIZES = {
    "default": Sizes(Shape(50, 200), (100_000, 1_000_000), (100_000, 1_000_000), 10_000),
    "quick": Sizes(Shape(20, 100), (10_000, 100_000), (10_000, 100_000), 2_000),
    # Every remote statement is an HTTP round trip: smaller sizes, same shapes.
    "default-remote": Sizes(Shape(20, 100), (10_000, 100_000), (10_000, 100_000), 10_000),
    "quick-remote": Sizes(Shape(10, 50), (2_000, 20_000), (2_000, 20_000), 1_000),
}


# --- databases ----------------------------------------------------------------


@attrs.frozen
class Target:
    """One fresh, empty database of a backend."""

    backend: str
    url: str
    auth_token: str | None = None
    path: Path | None = None  # the file, on SQLite/libSQL embedded

    def engine(self, **kwargs: Any) -> sa.Engine:
        """Create an Engine through ``evals_orm.create_engine``."""
        return create_engine(self.url, auth_token=self.auth_token, **kwargs)

    @contextlib.contextmanager
    def raw(self) -> Iterator[tuple[ExecuteMany, Callable[[], None]]]:
        """Open the raw DBAPI driver; yield its ``executemany`` and ``commit``."""
        if self.backend == "postgresql":
            with psycopg.connect(self.url) as pg, pg.cursor() as cursor:
                yield cursor.executemany, pg.commit
            return
        if self.backend == "mariadb":
            url = sa.make_url(self.url)
            my = pymysql.connect(
                host=url.host,
                port=url.port or 3306,
                user=url.username,
                password=url.password or "",
                database=url.database,
                charset="utf8mb4",
            )
            try:
                with my.cursor() as cursor:
                    yield cursor.executemany, my.commit
            finally:
                my.close()
            return
        if self.backend == "sqlite":
            connection: Any = sqlite3.connect(str(self.path))
        else:
            database = str(self.path) if self.path else self.url
            connection = libsql_experimental.connect(database, auth_token=self.auth_token or "")
        try:
            if self.path is not None:
                # The same settings create_engine gives our engine.
                connection.execute("PRAGMA foreign_keys=ON")
                connection.execute("PRAGMA journal_mode=WAL").fetchall()
            yield connection.executemany, connection.commit
        finally:
            connection.close()

    def migrated_engine(self) -> sa.Engine:
        """Create an Engine and run the migrations on the empty database."""
        # Imported here: the rebuild worker (this module too) need not load Alembic.
        from evals_orm import migrations  # noqa: PLC0415

        engine = self.engine()
        migrations.upgrade(engine)
        return engine


class Server:
    """Makes fresh databases of one backend."""

    def __init__(self, backend: str, workdir: Path) -> None:
        self.backend = backend
        self.workdir = workdir
        self.running_sqld: Any = None
        self.admin: sa.Engine | None = None

    def __enter__(self) -> Server:
        if self.backend == "postgresql":
            self.admin = sa.create_engine(
                POSTGRES_ADMIN_URL.replace("postgresql://", "postgresql+psycopg://", 1),
                isolation_level="AUTOCOMMIT",
                poolclass=sa.pool.NullPool,
            )
            with self.admin.connect() as connection:
                connection.exec_driver_sql("SELECT 1")
        elif self.backend == "mariadb":
            self.admin = create_engine(
                MYSQL_ADMIN_URL, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool
            )
            with self.admin.connect() as connection:
                connection.exec_driver_sql("SELECT 1")
        elif self.backend == "libsql-remote":
            self.running_sqld = running_sqld
        return self

    def __exit__(self, *exc: object) -> None:
        if self.admin is not None:
            self.admin.dispose()

    def describe(self) -> str:
        """Return the server's version, or the file driver's."""
        if self.backend == "postgresql":
            assert self.admin is not None
            with self.admin.connect() as connection:
                version = connection.exec_driver_sql("SHOW server_version").scalar()
            return f"PostgreSQL {version}"
        if self.backend == "mariadb":
            assert self.admin is not None
            with self.admin.connect() as connection:
                version = connection.exec_driver_sql("SELECT VERSION()").scalar()
            return f"MariaDB {version} through PyMySQL {pymysql.__version__}"
        if self.backend == "libsql-remote":
            return "sqld 0.24.32 on loopback, over HTTP (evals_orm/_sqld.py)"
        return ""

    @contextlib.contextmanager
    def fresh(self) -> Iterator[Target]:
        """Yield a fresh empty database, removed afterwards."""
        name = f"evals_bench_{uuid.uuid4().hex[:12]}"
        if self.backend in ("sqlite", "libsql"):
            path = self.workdir / f"{name}.db"
            scheme = "sqlite" if self.backend == "sqlite" else "sqlite+libsql"
            try:
                yield Target(self.backend, f"{scheme}:///{path}", path=path)
            finally:
                for leftover in self.workdir.glob(f"{name}.db*"):
                    leftover.unlink()
        elif self.backend == "postgresql":
            assert self.admin is not None
            with self.admin.connect() as connection:
                connection.exec_driver_sql(f'CREATE DATABASE "{name}"')
            url = sa.make_url(POSTGRES_ADMIN_URL).set(database=name)
            try:
                yield Target(self.backend, url.render_as_string(hide_password=False))
            finally:
                with self.admin.connect() as connection:
                    connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        elif self.backend == "mariadb":
            assert self.admin is not None
            with self.admin.connect() as connection:
                connection.exec_driver_sql(
                    f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_bin"
                )
            url = sa.make_url(MYSQL_ADMIN_URL).set(database=name)
            try:
                yield Target(self.backend, url.render_as_string(hide_password=False))
            finally:
                with self.admin.connect() as connection:
                    connection.exec_driver_sql(f"DROP DATABASE IF EXISTS `{name}`")
        else:
            with self.running_sqld(self.workdir / name) as sqld:
                yield Target(self.backend, sqld.url, sqld.auth_token)


# --- output -------------------------------------------------------------------


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """Print an aligned table; numbers right-aligned."""
    cells = [[str(c) for c in headers]] + [[_cell(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    numeric = [
        all(_is_number(row[i]) for row in rows) if rows else False for i in range(len(headers))
    ]
    print(f"\n{title}")
    for index, row in enumerate(cells):
        print(
            "  ".join(
                cell.rjust(width) if numeric[i] else cell.ljust(width)
                for i, (cell, width) in enumerate(zip(row, widths, strict=True))
            ).rstrip()
        )
        if index == 0:
            print("  ".join("-" * width for width in widths))
    sys.stdout.flush()


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) or (isinstance(value, str) and value[:1].isdigit())


def _cell(value: object) -> str:
    if isinstance(value, float):
        if value >= 100:
            return f"{value:,.0f}"
        return f"{value:.3g}" if value < 1 else f"{value:.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def verdict(ok: bool) -> str:
    """Return "OK" or "MISS"."""
    return "OK" if ok else "MISS"


def note(text: str) -> None:
    """Print a line of progress or explanation."""
    print(f"  {text}", flush=True)


# --- 1. apply_many: ours, raw, naive -------------------------------------------


def timed(run: Callable[[], object]) -> float:
    """Return the seconds ``run`` takes."""
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def best_runs(
    server: Server, repeat: int, runs: dict[str, Callable[[Target, sa.Engine], float]]
) -> tuple[dict[str, float], dict[str, tuple[int, int, str]]]:
    """Run each of ``runs`` ``repeat`` times, each in a fresh database.

    Return each one's fastest time and the digest of the tables it left.
    """
    best: dict[str, float] = {}
    digests: dict[str, tuple[int, int, str]] = {}
    for _ in range(repeat):
        for name, run in runs.items():
            with server.fresh() as target:
                engine = target.migrated_engine()
                try:
                    best[name] = min(best.get(name, float("inf")), run(target, engine))
                    digests[name] = table_digest(engine)
                finally:
                    engine.dispose()
    return best, digests


def bench_apply(server: Server, shape: Shape, *, repeat: int, profile: bool) -> list[object]:
    """Time ours, raw and naive on the same events; return the table row.

    The events are generated before the clock starts, and each path starts
    with a migrated database and an open connection, so only projecting and
    storing is timed. ``repeat`` > 1 keeps each path's best time.
    """
    stream = list(events(shape))

    def ours(target: Target, engine: sa.Engine) -> float:
        return timed(lambda: SqlEvalProjection(engine).apply_many(stream))

    def raw(target: Target, engine: sa.Engine) -> float:
        with target.raw() as (executemany, commit):
            dialect = engine.dialect.name
            return timed(lambda: (raw_load(executemany, stream, dialect=dialect), commit()))

    def naive(target: Target, engine: sa.Engine) -> float:
        return timed(lambda: naive_orm(engine, stream))

    best, digests = best_runs(server, repeat, {"raw": raw, "ours": ours, "naive": naive})
    if profile:
        with server.fresh() as target:
            engine = target.migrated_engine()
            profiler = cProfile.Profile()
            profiler.runcall(SqlEvalProjection(engine).apply_many, stream)
            engine.dispose()
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(20)
        print(f"\ncProfile of ours (apply_many) on {server.backend}, by own time:")
        print("\n".join(line for line in text.getvalue().splitlines()[4:] if line.strip()))
    same = len(set(digests.values())) == 1
    if not same:
        for name, digest in digests.items():
            studies, checkpoints, value = digest
            note(f"{server.backend} {name}: {studies=} {checkpoints=} digest {value}")
    count = len(stream)
    note(
        f"{server.backend}: ours {best['ours']:.2f} s, raw {best['raw']:.2f} s, "
        f"naive {best['naive']:.2f} s"
    )
    ours_over_raw = best["ours"] / best["raw"]
    naive_over_ours = best["naive"] / best["ours"]
    return [
        server.backend,
        count,
        best["ours"],
        count / best["ours"],
        best["raw"],
        count / best["raw"],
        best["naive"],
        count / best["naive"],
        f"{ours_over_raw:.2f} {verdict(ours_over_raw <= MAX_OURS_OVER_RAW)}",
        f"{naive_over_ours:.2f} {verdict(naive_over_ours >= MIN_NAIVE_OVER_OURS)}",
        f"{'identical' if same else 'DIFFERENT'} ({digests['ours'][0]}/{digests['ours'][1]})",
    ]


# --- 1b. apply_many: sync and async side by side ---------------------------------


def bench_async_apply(server: Server, shape: Shape, *, repeat: int) -> list[object]:
    """Time SqlEvalProjection and AsyncSqlEvalProjection on the same events; return the row."""
    stream = list(events(shape))

    def sync(target: Target, engine: sa.Engine) -> float:
        return timed(lambda: SqlEvalProjection(engine).apply_many(stream))

    def asynchronous(target: Target, engine: sa.Engine) -> float:
        async def run() -> float:
            async_engine = create_async_engine(target.url, auth_token=target.auth_token)
            projection = AsyncSqlEvalProjection(async_engine)
            try:
                # The pool's first connection (and its pragmas) is not timed,
                # as the sync side's engine has connected in the migrations.
                async with async_engine.connect() as connection:
                    await connection.exec_driver_sql("SELECT 1")
                start = time.perf_counter()
                await projection.apply_many(stream)
                return time.perf_counter() - start
            finally:
                await async_engine.dispose()

        return asyncio.run(run())

    best, digests = best_runs(server, repeat, {"sync": sync, "async": asynchronous})
    count = len(stream)
    ratio = best["sync"] / best["async"]
    note(f"{server.backend}: sync {best['sync']:.2f} s, async {best['async']:.2f} s")
    same = digests["sync"] == digests["async"]
    return [
        server.backend,
        count,
        best["sync"],
        count / best["sync"],
        best["async"],
        count / best["async"],
        f"{ratio:.2f} {verdict(ratio >= MIN_ASYNC_OVER_SYNC)}",
        "identical" if same else "DIFFERENT",
    ]


# --- 2. rebuild scaling (subprocess per run) -----------------------------------


def rebuild_shape(approximate_events: int) -> Shape:
    """Return a stream of about ``approximate_events``: fixed studies, scaled checkpoints."""
    return Shape(REBUILD_STUDIES, max(1, approximate_events // REBUILD_STUDIES))


class _TimedIterator:
    """Wraps an iterator and adds up the time spent producing its items."""

    def __init__(self, iterator: Iterator[StoredEvalEvent]) -> None:
        self.iterator = iterator
        self.seconds = 0.0

    def __iter__(self) -> Iterator[StoredEvalEvent]:
        clock = time.perf_counter
        for_next = self.iterator.__next__
        while True:
            start = clock()
            try:
                item = for_next()
            except StopIteration:
                self.seconds += clock() - start
                return
            self.seconds += clock() - start
            yield item


def rss_kib() -> int:
    """Return the peak resident set size of this process so far, in KiB (Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def current_rss_kib() -> int:
    """Return the resident set size of this process now, in KiB (Linux; else the peak)."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return rss_kib()
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return rss_kib()


def reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS mark, so the peak measures the run alone (Linux)."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def rebuild_worker(spec: str) -> None:
    """Run one rebuild (in a subprocess) and print its measurements as JSON."""
    args = json.loads(spec)
    shape = Shape(args["studies"], args["checkpoints_per_study"])
    engine = create_engine(args["url"], auth_token=os.environ.get("EVALS_ORM_AUTH_TOKEN"))
    projection = SqlEvalProjection(engine)
    with engine.connect() as connection:  # connect and load the dialect first
        connection.exec_driver_sql("SELECT 1")
    stream = _TimedIterator(events(shape))
    reset_peak_rss()
    rss_before = current_rss_kib()
    start = time.perf_counter()
    applied = projection.rebuild(stream)
    seconds = time.perf_counter() - start
    print(
        json.dumps(
            {
                "events": applied,
                "seconds": seconds,
                "generating": stream.seconds,
                "rss_before_kib": rss_before,
                "rss_peak_kib": rss_kib(),
            }
        )
    )


def bench_rebuild(server: Server, sizes: tuple[int, int], repeat: int) -> list[list[object]]:
    """Rebuild two stream lengths, each in a fresh subprocess; return the table rows.

    With ``repeat`` > 1 the two sizes alternate and each keeps its fastest
    run (and the highest peak memory of its runs).
    """
    runs: dict[int, list[dict[str, Any]]] = {size: [] for size in sizes}
    for _ in range(repeat):
        for approximate in sizes:
            result = _rebuild_once(server, rebuild_shape(approximate))
            if result is None:
                return []
            runs[approximate].append(result)
    results = [
        {
            **min(runs[size], key=lambda run: float(run["seconds"])),
            "rss_peak_kib": max(run["rss_peak_kib"] for run in runs[size]),
        }
        for size in sizes
    ]
    rows: list[list[object]] = []
    small = results[0]
    for result in results:
        rows.append(
            [
                server.backend,
                result["events"],
                result["seconds"],
                result["generating"],
                result["events"] / result["seconds"],
                result["rss_before_kib"] / 1024,
                result["rss_peak_kib"] / 1024,
                "",
                "",
                "",
            ]
        )
    large = results[-1]
    growth = large["events"] / small["events"]
    time_ratio = large["seconds"] / small["seconds"]
    # The synthetic stream's generation runs in the same process and is timed
    # apart: the ratio without it is the projection's own scaling.
    own_ratio = _projection_seconds(large) / _projection_seconds(small)
    memory_ratio = large["rss_peak_kib"] / small["rss_peak_kib"]
    within = MAX_TIME_GROWTH * growth
    rows[-1][-3] = f"{time_ratio:.2f} for {growth:.1f}x {verdict(time_ratio <= within)}"
    rows[-1][-2] = f"{own_ratio:.2f} for {growth:.1f}x {verdict(own_ratio <= within)}"
    rows[-1][-1] = f"{memory_ratio:.2f} {verdict(memory_ratio <= MAX_MEMORY_GROWTH)}"
    return rows


def _rebuild_once(server: Server, shape: Shape) -> dict[str, Any] | None:
    with server.fresh() as target:
        target.migrated_engine().dispose()
        env = dict(os.environ)
        if target.auth_token:
            env["EVALS_ORM_AUTH_TOKEN"] = target.auth_token
        spec = {
            "url": target.url,
            "studies": shape.studies,
            "checkpoints_per_study": shape.checkpoints_per_study,
        }
        done = subprocess.run(
            [sys.executable, __file__, "--rebuild-worker", json.dumps(spec)],
            capture_output=True,
            text=True,
            env=env,
            check=False,
        )
    if done.returncode != 0:
        note(f"rebuild of {shape.events:,} events failed on {server.backend}:")
        print(done.stderr[-3000:], flush=True)
        return None
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    note(
        f"{server.backend}: rebuilt {result['events']:,} events in "
        f"{result['seconds']:.1f} s, peak RSS {result['rss_peak_kib'] / 1024:.0f} MiB"
    )
    return result


def _projection_seconds(result: dict[str, Any]) -> float:
    return float(result["seconds"] - result["generating"])


# --- 3. queries -----------------------------------------------------------------


def load_raw(target: Target, stream: Iterable[StoredEvalEvent]) -> tuple[int, int]:
    """Load a stream's final rows quickly through the raw driver."""
    with target.raw() as (executemany, commit):
        counts = raw_load(executemany, stream, dialect=_dialect_of(target.backend))
        commit()
    return counts


def _dialect_of(backend: str) -> str:
    return {"postgresql": "postgresql", "mariadb": "mysql"}.get(backend, "sqlite")


def median_seconds(call: Callable[[], object], calls: int) -> float:
    """Return the median time of ``calls`` calls (after one warm-up call)."""
    call()
    samples = []
    for _ in range(calls):
        start = time.perf_counter()
        call()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def interleaved_medians(calls: Sequence[Callable[[], object]], rounds: int) -> list[float]:
    """Return each call's median time over ``rounds`` rounds that run every call in turn.

    Interleaving puts the machine's drift (this is a shared 2-core machine)
    on every call alike, so the ratios between them hold.
    """
    for call in calls:
        call()  # warm-up
    samples: list[list[float]] = [[] for _ in calls]
    for _ in range(rounds):
        for call, seconds in zip(calls, samples, strict=True):
            start = time.perf_counter()
            call()
            seconds.append(time.perf_counter() - start)
    return [statistics.median(seconds) for seconds in samples]


def query_calls(
    storage: SqlEvalStorage, studies: Sequence[StudyId]
) -> tuple[Callable[[], object], Callable[[], object]]:
    """Return calls of ``get_checkpoints_in_range`` (a week) and ``get_latest_checkpoint``."""
    week_start = CLOCK_START + 60 * TICK
    week_end = week_start + timedelta(days=7)
    turn = itertools.cycle(studies)

    def in_range() -> object:
        found = storage.get_checkpoints_in_range(next(turn), week_start, week_end)
        if len(found) != 168:
            raise RuntimeError(f"a week holds 168 hourly checkpoints, got {len(found)}")
        return found

    def latest() -> object:
        return storage.get_latest_checkpoint(next(turn))

    return in_range, latest


def bench_queries(server: Server, sizes: tuple[int, int]) -> list[list[object]]:
    """Time the two per-study queries on two tables of ``sizes`` checkpoints (10x apart).

    Both tables hold the same queried studies (studies of the same shape,
    the larger table has more of them), so only the table size differs; the
    calls on the two alternate in this one process.
    """
    per_study = CHECKPOINTS_PER_QUERY_STUDY
    rows: list[list[object]] = []
    with contextlib.ExitStack() as stack:
        engines: list[sa.Engine] = []
        loaded: list[int] = []
        for size in sizes:
            target = stack.enter_context(server.fresh())
            engine = target.migrated_engine()
            stack.callback(engine.dispose)
            shape = Shape(max(1, size // per_study), per_study)
            started = time.perf_counter()
            load_raw(target, events(shape))
            if target.backend == "postgresql":
                # What autovacuum does after a bulk load; keeps plans stable run to run.
                with engine.connect() as connection:
                    connection.execution_options(isolation_level="AUTOCOMMIT").exec_driver_sql(
                        "VACUUM ANALYZE"
                    )
            seconds = time.perf_counter() - started
            note(
                f"{server.backend}: loaded {shape.checkpoints:,} checkpoints (raw, {seconds:.1f} s)"
            )
            # The load went through the raw driver while the engine's pooled
            # connection sat idle; a remote one has expired by now (STREAM_EXPIRED,
            # see the report of issue #7), so the timing starts on fresh connections.
            engine.dispose()
            engines.append(engine)
            loaded.append(shape.checkpoints)
        with engines[0].connect() as connection:
            query = sa.select(StudyRow.id).order_by(StudyRow.name).limit(5)
            studies = [StudyId(value) for value in connection.scalars(query)]
        calls = [query_calls(SqlEvalStorage(engine), studies) for engine in engines]
        in_range = interleaved_medians([in_range for in_range, _ in calls], QUERY_CALLS)
        latest = interleaved_medians([latest for _, latest in calls], QUERY_CALLS)
    for size, range_seconds, latest_seconds in zip(loaded, in_range, latest, strict=True):
        note(f"{server.backend}: in_range {range_seconds:.4f} s, latest {latest_seconds:.4f} s")
        rows.append([server.backend, size, range_seconds * 1000, latest_seconds * 1000, "", ""])
    range_ratio = in_range[-1] / in_range[0]
    latest_ratio = latest[-1] / latest[0]
    rows[-1][-2] = f"{range_ratio:.2f} {verdict(range_ratio <= MAX_QUERY_GROWTH)}"
    rows[-1][-1] = f"{latest_ratio:.2f} {verdict(latest_ratio <= MAX_QUERY_GROWTH)}"
    return rows


def bench_list_studies(server: Server, studies: int) -> list[object]:
    """Count the statements of ``list_studies`` and time it."""
    with server.fresh() as target:
        engine = target.migrated_engine()
        load_raw(target, events(Shape(studies, 0)))
        engine.dispose()  # as in bench_queries: no idle remote stream left to expire
        statements: list[str] = []

        @sa.event.listens_for(engine, "before_cursor_execute")
        def count(*args: Any) -> None:
            statements.append(args[2])

        storage = SqlEvalStorage(engine)
        found = len(storage.list_studies())
        statements.clear()
        calls = 5
        seconds = median_seconds(storage.list_studies, calls)
        engine.dispose()
    per_call = len(statements) / (calls + 1)
    return [
        server.backend,
        found,
        seconds,
        found / seconds,
        f"{per_call:g} {verdict(per_call == 1)}",
    ]


# --- main -----------------------------------------------------------------------


def machine() -> list[str]:
    """Describe the machine and the library versions."""
    libsql = libsql_experimental.connect(":memory:")
    libsql_sqlite = libsql.execute("SELECT sqlite_version()").fetchone()[0]
    versions = {
        name: metadata.version(name)
        for name in ("sqlalchemy", "libsql-experimental", "sqlalchemy-libsql", "psycopg", "cattrs")
    }
    load = os.getloadavg()
    return [
        f"machine: {os.cpu_count()} cores, {platform.machine()}, {platform.platform(terse=True)}",
        f"python {platform.python_version()} ({platform.python_implementation()})",
        f"sqlite3 (stdlib) {sqlite3.sqlite_version}; libsql-experimental "
        f"{versions['libsql-experimental']} (SQLite {libsql_sqlite}); "
        f"psycopg {versions['psycopg']}; SQLAlchemy {versions['sqlalchemy']}; "
        f"sqlalchemy-libsql {versions['sqlalchemy-libsql']}; cattrs {versions['cattrs']}",
        f"load average at start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} "
        "(other work on the machine skews every number)",
    ]


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--backends",
        default=",".join(DEFAULT_BACKENDS),
        help=f"comma-separated, from {', '.join(BACKENDS)} (default: all)",
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument(
        "--parts",
        default="apply,async,rebuild,queries",
        help="comma-separated, from apply, async, rebuild, queries (default: all)",
    )
    parser.add_argument(
        "--repeat", type=int, default=1, help="run apply_many and rebuild N times, keep the best"
    )
    parser.add_argument(
        "--profile", action="store_true", help="print a cProfile of ours (apply_many)"
    )
    parser.add_argument("--rebuild-worker", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


@attrs.define
class Results:
    """The rows of every table, filled backend by backend."""

    apply: list[list[object]] = attrs.field(factory=list)
    async_apply: list[list[object]] = attrs.field(factory=list)
    rebuild: list[list[object]] = attrs.field(factory=list)
    queries: list[list[object]] = attrs.field(factory=list)
    list_studies: list[list[object]] = attrs.field(factory=list)
    skipped: list[str] = attrs.field(factory=list)


def run_backend(backend: str, args: argparse.Namespace, workdir: Path, results: Results) -> None:
    """Run the selected parts on one backend, or record why it was skipped."""
    remote = backend == "libsql-remote"
    sizes = SIZES[("quick" if args.quick else "default") + ("-remote" if remote else "")]
    parts = {name.strip() for name in args.parts.split(",")}
    try:
        server = Server(backend, workdir).__enter__()
    except Exception as error:
        results.skipped.append(f"SKIPPED {backend}: unavailable ({type(error).__name__}: {error})")
        note(results.skipped[-1])
        return

    def attempt(part: str, run: Callable[[], None]) -> None:
        # One failing part is reported and the others still run.
        try:
            run()
        except Exception as error:
            message = str(error).strip().splitlines()[0][:300] if str(error).strip() else ""
            results.skipped.append(f"{backend} {part}: FAILED ({type(error).__name__}: {message})")
            note(results.skipped[-1])

    try:
        note(f"--- {backend} {server.describe()}".rstrip())
        if "apply" in parts:
            note(f"{backend}: apply_many of {sizes.apply.events:,} events: raw, ours, naive")
            attempt(
                "apply_many",
                lambda: results.apply.append(
                    bench_apply(server, sizes.apply, repeat=args.repeat, profile=args.profile)
                ),
            )
        if "async" in parts:
            note(f"{backend}: apply_many of {sizes.apply.events:,} events: sync, async")
            attempt(
                "async apply_many",
                lambda: results.async_apply.append(
                    bench_async_apply(server, sizes.apply, repeat=args.repeat)
                ),
            )
        if "rebuild" in parts:
            small, large = sizes.rebuild
            note(f"{backend}: rebuild of ~{small:,} and ~{large:,} events")
            attempt(
                "rebuild",
                lambda: results.rebuild.extend(bench_rebuild(server, sizes.rebuild, args.repeat)),
            )
        if "queries" in parts:
            attempt("queries", lambda: results.queries.extend(bench_queries(server, sizes.queries)))
            attempt(
                "list_studies",
                lambda: results.list_studies.append(bench_list_studies(server, sizes.list_studies)),
            )
    finally:
        server.__exit__(None, None, None)


def print_results(results: Results, repeat: int) -> None:
    """Print the tables of every part that ran."""
    if results.apply:
        print_table(
            "apply_many into an empty migrated database (seconds, events/s; best of "
            f"{repeat}; same events, fresh database each)",
            [
                "backend",
                "events",
                "ours s",
                "ours ev/s",
                "raw s",
                "raw ev/s",
                "naive s",
                "naive ev/s",
                f"ours/raw (<={MAX_OURS_OVER_RAW})",
                f"naive/ours (>={MIN_NAIVE_OVER_OURS:g})",
                "rows (studies/checkpoints)",
            ],
            results.apply,
        )
        print(
            "  raw = final rows by a dict state machine + json.dumps + the driver's executemany,\n"
            "  one transaction; naive = one ORM object per event, session.get, flush per event."
        )
    if results.async_apply:
        print_table(
            "apply_many: SqlEvalProjection and AsyncSqlEvalProjection side by side (seconds, "
            f"events/s; best of {repeat}; same events, fresh database each)",
            [
                "backend",
                "events",
                "sync s",
                "sync ev/s",
                "async s",
                "async ev/s",
                f"async/sync throughput (>={MIN_ASYNC_OVER_SYNC})",
                "rows",
            ],
            results.async_apply,
        )
        print("  async = create_async_engine on the same URL, awaited in asyncio.run.")
    if results.rebuild:
        print_table(
            f"rebuild scaling (best of {repeat}, each run in a fresh subprocess; "
            f"{REBUILD_STUDIES} studies, checkpoints per study scale; events generated lazily)",
            [
                "backend",
                "events",
                "seconds",
                "of which generating",
                "events/s",
                "RSS at start MiB",
                "peak RSS MiB",
                f"time ratio (<={MAX_TIME_GROWTH:g}x growth)",
                "same, without generating",
                f"peak memory ratio (<={MAX_MEMORY_GROWTH})",
            ],
            results.rebuild,
        )
    if results.queries:
        print_table(
            f"per-study queries on two tables 10x apart (median of {QUERY_CALLS} interleaved "
            "calls over 5 studies "
            f"of {CHECKPOINTS_PER_QUERY_STUDY} hourly checkpoints; a week = 168 rows)",
            [
                "backend",
                "checkpoints in table",
                "in_range ms",
                "latest ms",
                f"in_range growth (<={MAX_QUERY_GROWTH})",
                f"latest growth (<={MAX_QUERY_GROWTH})",
            ],
            results.queries,
        )
    if results.list_studies:
        print_table(
            "list_studies (median of 5 calls)",
            ["backend", "studies", "seconds", "studies/s", "statements per call (=1)"],
            results.list_studies,
        )
    for line in results.skipped:
        print(f"\n{line}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print the tables."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.rebuild_worker:
        rebuild_worker(args.rebuild_worker)
        return 0
    backends = [name.strip() for name in args.backends.split(",") if name.strip()]
    unknown = sorted(set(backends) - set(BACKENDS))
    if unknown:
        print(f"unknown backend(s) {unknown}; choose from {', '.join(BACKENDS)}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    print("evals_orm benchmark (issue #7)")
    for line in machine():
        print(f"  {line}")
    results = Results()
    with tempfile.TemporaryDirectory(prefix="evals-bench-") as tmp:
        for backend in backends:
            run_backend(backend, args, Path(tmp), results)
    print_results(results, args.repeat)
    load = os.getloadavg()
    print(f"\nload average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(f"total time: {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
