"""How long a writer waits while the projection is rebuilt (issue 18, item 5).

Run by ``nox -s bench`` (``python benchmarks/rebuild_wait.py``). On each
backend, for each log size, it logs the stream, then runs ``rebuild(log)``
while a writer process appends one inline-projected event at a time, and
reports the rebuild's duration and the writer's worst and median append
wait. The goal is a worst wait of about a second whatever the log's size.
It prints a table; it asserts nothing and exits 0 whatever the numbers are.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from _stream import events
from bench import Server, print_table, rebuild_shape, verdict

from evals_orm import (
    CheckpointRecorded,
    EvalsError,
    LongitudinalMetrics,
    PeriodType,
    SqlEvalProjection,
    SqlEventLog,
    StoredEvalEvent,
    StudyCreated,
    StudyId,
    create_engine,
    uuid7,
)
from evals_orm._backend_names import BACKENDS
from evals_orm.domain import CheckpointId
from evals_orm.events import uuid7_time

GOAL_SECONDS = 1.0


def writer(url: str, token: str | None, stop: Path) -> None:
    """Append one event per transaction until ``stop`` exists; print the waits.

    A failed append counts as a wait of its full duration, negated.
    """
    engine = create_engine(url, auth_token=token)
    import sqlalchemy as _sa
    if os.environ.get("NO_CKPT"):
        @_sa.event.listens_for(engine, "connect")
        def _c(dbapi, rec):
            dbapi.execute("PRAGMA wal_autocheckpoint=0")
    log, projection = SqlEventLog(engine), SqlEvalProjection(engine)
    study = StudyId(uuid7())
    log.append(StoredEvalEvent(uuid7(), StudyCreated(study, "writer", PeriodType.HOURLY)))
    print("ready", flush=True)
    waits: list[float] = []
    while not stop.exists():
        event_id = uuid7()
        event = CheckpointRecorded(
            CheckpointId(uuid7()), study, uuid7_time(event_id), LongitudinalMetrics(), 0, ()
        )
        began = time.monotonic()
        try:
            log.append(StoredEvalEvent(event_id, event), projection=projection)
        except EvalsError:
            waits.append(-(time.monotonic() - began))
        else:
            waits.append(time.monotonic() - began)
    print(" ".join(f"{wait:.4f}" for wait in waits), flush=True)
    engine.dispose()


def measure(server: Server, size: int, workdir: Path) -> list[object]:
    """Rebuild a log of about ``size`` events under a writer; return the table row."""
    with server.fresh() as target:
        engine = target.migrated_engine()
        log = SqlEventLog(engine)
        logged = log.append(events(rebuild_shape(size)))
        SqlEvalProjection(engine).catch_up(log)
        stop = workdir / f"stop-{time.monotonic_ns()}"
        process = subprocess.Popen(
            [sys.executable, __file__, "--writer", target.url, str(stop)],
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "EVALS_ORM_AUTH_TOKEN": target.auth_token or ""},
        )
        assert process.stdout is not None
        assert "ready\n" == process.stdout.readline()
        time.sleep(0.5)
        began = time.monotonic()
        try:
            SqlEvalProjection(engine).rebuild(log)
        except EvalsError as error:
            outcome = f"failed after {time.monotonic() - began:.1f} s: {error}"
        else:
            outcome = f"{time.monotonic() - began:.2f}"
        time.sleep(0.5)
        stop.touch()
        output, _ = process.communicate(timeout=600)
        engine.dispose()
    waits = [float(wait) for wait in output.split()]
    failed = sum(wait < 0 for wait in waits)
    waits = [abs(wait) for wait in waits]
    worst = max(waits, default=0.0)
    return [
        server.backend,
        logged,
        outcome,
        len(waits),
        round(statistics.median(waits), 4) if waits else "-",
        round(worst, 2),
        failed,
        verdict(worst <= GOAL_SECONDS and not failed),
    ]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the measurement on the chosen backends and sizes; print one table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backends", default=",".join(BACKENDS), help="comma list")
    parser.add_argument(
        "--sizes", default="100000,1000000", help="comma list of log sizes (events)"
    )
    parser.add_argument("--writer", nargs=2, metavar=("URL", "STOP"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.writer:
        writer(args.writer[0], os.environ.get("EVALS_ORM_AUTH_TOKEN") or None, Path(args.writer[1]))
        return 0
    rows: list[list[object]] = []
    with tempfile.TemporaryDirectory(prefix="evals_rebuild_wait_") as directory:
        workdir = Path(directory)
        for backend in args.backends.split(","):
            with Server(backend, workdir) as server:
                for size in (int(size) for size in args.sizes.split(",")):
                    rows.append(measure(server, size, workdir))
    print_table(
        f"writers' wait during a rebuild (goal: worst <= {GOAL_SECONDS:g} s)",
        [
            "backend",
            "events",
            "rebuild s",
            "appends",
            "median wait s",
            "worst wait s",
            "failed",
            "",
        ],
        rows,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
