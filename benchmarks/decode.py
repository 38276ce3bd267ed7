"""Decoding against the limit: rebuild from the log and storage reads vs a raw-driver script.

The raw script is what a hand-written reader does: select the same rows
with the DBAPI driver and ``json.loads`` the JSON in them into dicts. Each
figure is raw time / our time (higher is better; the goal is >= 0.67, and
above 1.0 decoding into typed, validated domain objects beats bare dicts):

* ``read``: ``SqlEventLog.read()`` of the whole log vs selecting the payloads
  in log order and ``json.loads`` of each;
* ``rebuild``: ``SqlEvalProjection.rebuild(SqlEventLog.read())`` vs the same
  raw read (the rebuild also writes the projection, so this is the figure a
  user waits on);
* ``checkpoints``: ``SqlEvalStorage.get_checkpoints`` of one study vs
  selecting its rows and ``json.loads`` of their metrics and sessions
  (PostgreSQL's driver parses jsonb itself, so there raw is the fetch).

``--nanoseconds`` stamps the checkpoints as the Rust service does (9-digit
timestamps and durations), which the domain types carry as ``NanoDatetime``
and ``NanoTimedelta``.

Usage: ``python benchmarks/decode.py [--backend sqlite ...] [--studies N] [--clock cpu]
[--nanoseconds]``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import libsql_experimental
import psycopg
import sqlalchemy as sa
from _stream import Shape, events
from bench import Server, Target, print_table

from evals_orm import SqlEvalProjection, SqlEvalStorage, SqlEventLog, StudyId
from evals_orm.models import CheckpointRow

BACKENDS = ("sqlite", "libsql", "postgresql")
GOAL = 0.67
CHECKPOINTS_PER_STUDY = 500
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
_LOG_SQL = "SELECT payload FROM eval_events ORDER BY position"
_CHECKPOINTS_SQL = (
    "SELECT id, study_id, timestamp, metrics, events_analyzed, sessions_included"
    " FROM checkpoints WHERE study_id = {} ORDER BY timestamp"
)


@contextlib.contextmanager
def raw_connection(target: Target) -> Iterator[Any]:
    """Open the backend's DBAPI driver on the target database."""
    if target.backend == "postgresql":
        with psycopg.connect(target.url.replace("+psycopg", "")) as pg:
            yield pg
        return
    if target.backend == "sqlite":
        connection: Any = sqlite3.connect(str(target.path))
    else:
        connection = libsql_experimental.connect(str(target.path))
    try:
        yield connection
    finally:
        connection.close()


def best_of(
    runs: dict[str, Callable[[], object]], rounds: int, clock: Callable[[], float]
) -> dict[str, float]:
    """Return the fastest of ``rounds`` timed calls of each run, in seconds.

    The runs take turns within each round, so a busy spell of the machine
    slows all of them rather than whichever ran during it. Each starts
    after a full collection: the cyclic collector's work left over from one
    run (its counts toward the next collection) is not paid by the next.
    """
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            gc.collect()
            started = clock()
            run()
            times[name].append(clock() - started)
    return {name: min(taken) for name, taken in times.items()}


def raw_log(connection: Any) -> int:
    """Select every payload in log order and ``json.loads`` it."""
    loads = json.loads
    return len([loads(payload) for (payload,) in connection.execute(_LOG_SQL).fetchall()])


def raw_checkpoints(connection: Any, backend: str, study_id: StudyId) -> int:
    """Select one study's checkpoints and decode their JSON columns as dicts."""
    if backend == "postgresql":
        sql = _CHECKPOINTS_SQL.format("%s")
        with connection.cursor() as cursor:
            # psycopg returns jsonb already parsed: the fetch is the whole work.
            return len(cursor.execute(sql, (study_id,)).fetchall())
    loads = json.loads
    rows = connection.execute(_CHECKPOINTS_SQL.format("?"), (str(study_id),)).fetchall()
    return len([(row, loads(row[3]), loads(row[5])) for row in rows])


def bench_backend(
    server: Server, shape: Shape, rounds: int, clock: Callable[[], float]
) -> list[list[object]]:
    """Log a stream, then time reading, rebuilding and querying it against the raw script."""
    with server.fresh() as target:
        engine = target.migrated_engine()
        try:
            log = SqlEventLog(engine)
            log.append(events(shape))
            projection = SqlEvalProjection(engine)
            storage = SqlEvalStorage(engine)
            with raw_connection(target) as connection:
                log_times = best_of(
                    {
                        "raw": lambda: raw_log(connection),
                        "read": lambda: sum(1 for _ in log.read()),
                        "rebuild": lambda: projection.rebuild(log.read()),
                    },
                    rounds,
                    clock,
                )
                with engine.connect() as sa_connection:
                    study = StudyId(
                        sa_connection.scalars(sa.select(CheckpointRow.study_id).limit(1)).one()
                    )
                query_times = best_of(
                    {
                        "raw": lambda: raw_checkpoints(connection, target.backend, study),
                        "checkpoints": lambda: storage.get_checkpoints(study),
                    },
                    rounds * 10,
                    clock,
                )
        finally:
            engine.dispose()
    count = shape.events
    rows: list[list[object]] = []
    for name, raw, ours, items in (
        ("read", log_times["raw"], log_times["read"], count),
        ("rebuild", log_times["raw"], log_times["rebuild"], count),
        ("checkpoints", query_times["raw"], query_times["checkpoints"], CHECKPOINTS_PER_STUDY),
    ):
        ratio = raw / ours
        rows.append(
            [
                server.backend,
                name,
                items,
                raw / items * 1e6,
                ours / items * 1e6,
                f"{ratio:.2f} {'ok' if ratio >= GOAL else 'below goal'}",
            ]
        )
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    """Run the decoding benchmark on the chosen backends and print one table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", action="append", choices=BACKENDS)
    parser.add_argument("--studies", type=int, default=20, help="500 checkpoints each")
    parser.add_argument("--rounds", type=int, default=5, help="best of this many runs")
    parser.add_argument(
        "--clock",
        choices=CLOCKS,
        default="wall",
        help="cpu: this process's CPU time, steadier on a busy machine (PostgreSQL's own"
        " work is then left out of both sides)",
    )
    parser.add_argument(
        "--nanoseconds",
        action="store_true",
        help="stamp checkpoints to the nanosecond, as the Rust service does",
    )
    args = parser.parse_args(argv)
    shape = Shape(args.studies, CHECKPOINTS_PER_STUDY, nanoseconds=args.nanoseconds)
    rows: list[list[object]] = []
    with tempfile.TemporaryDirectory() as workdir:
        for backend in args.backend or BACKENDS:
            with Server(backend, Path(workdir)) as server:
                rows.extend(bench_backend(server, shape, args.rounds, CLOCKS[args.clock]))
    print_table(
        f"Decoding vs a raw-driver script ({args.clock} time"
        f"{', nanosecond stamps' if args.nanoseconds else ''}; raw/ours, goal >= {GOAL})",
        ["backend", "what", "rows", "raw us/row", "ours us/row", "raw/ours"],
        rows,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
