"""Benchmark of issue 19: how soon a follower makes an append visible, and what it costs idle.

Run by ``nox -s bench`` (``python benchmarks/follow_latency.py``). On each
backend it starts ``evals-orm follow`` as a process of its own (default poll
interval), then appends events one at a time from this process, at random
moments, and for each measures the time from the append's commit (``append``
returned) to the event being readable through ``SqlEvalStorage`` (looked up
every 4 ms). Then it leaves the follower idle and reads its CPU time
from ``/proc``. It prints p50/p99/max against the issue's targets and exits
0 whatever the numbers are.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from bench import Server, Target, note, print_table, verdict

from evals_orm import (
    PeriodType,
    SqlEvalStorage,
    SqlEventLog,
    StoredEvalEvent,
    StudyCreated,
    StudyId,
    uuid7,
)
from evals_orm._backend import backend_of
from evals_orm._backend_names import BACKENDS

IDLE_S = 10.0
SETTLE_S = 2.0
MAX_IDLE_CPU = 0.01  # of one core
PG_P99_S = 0.1
FILE_MARGIN_S = 0.05
REMOTE_P99_S = 1.0
TICKS = os.sysconf("SC_CLK_TCK")
OBSERVE_S = 0.004


def _command() -> list[str]:
    script = Path(sys.executable).with_name("evals-orm")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "evals_orm"]


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid``, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def _target_s(backend: str, poll_interval: float) -> float:
    if backend == "postgresql":
        return PG_P99_S
    if backend == "libsql-remote":
        return REMOTE_P99_S
    return poll_interval + FILE_MARGIN_S


def measure(target: Target, appends: int, rng: random.Random) -> list[object]:
    """Run one follower and ``appends`` appends on ``target``; return the table row."""
    engine = target.migrated_engine()
    poll_interval = backend_of(engine).poll_interval
    environment = {k: v for k, v in os.environ.items() if not k.startswith("EVALS_ORM_")}
    environment["EVALS_ORM_DATABASE_URL"] = target.url
    if target.auth_token:
        environment["EVALS_ORM_AUTH_TOKEN"] = target.auth_token
    follower = subprocess.Popen(
        [*_command(), "follow"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=environment,
    )
    try:
        log = SqlEventLog(engine)
        storage = SqlEvalStorage(engine)
        time.sleep(SETTLE_S)
        latencies = []
        for n in range(appends):
            study = StudyId(uuid7())
            log.append(StoredEvalEvent.new(StudyCreated(study, f"bench-{n}", PeriodType.DAILY)))
            committed = time.perf_counter()
            while storage.get_study(study) is None:
                # Coarse enough to leave the (2-core) machine to the follower.
                time.sleep(OBSERVE_S)
            latencies.append(time.perf_counter() - committed)
            # Appends at random moments, so they fall anywhere in the poll cycle.
            time.sleep(rng.uniform(0, poll_interval))
        time.sleep(SETTLE_S)
        before = _cpu_seconds(follower.pid)
        time.sleep(IDLE_S)
        idle_cpu = (_cpu_seconds(follower.pid) - before) / IDLE_S
    finally:
        follower.terminate()
        follower.wait(timeout=30)
        engine.dispose()
    latencies.sort()
    p50 = statistics.median(latencies)
    p99 = latencies[min(len(latencies) - 1, round(0.99 * len(latencies)))]
    target_s = _target_s(target.backend, poll_interval)
    return [
        target.backend,
        poll_interval * 1000,
        appends,
        p50 * 1000,
        p99 * 1000,
        latencies[-1] * 1000,
        target_s * 1000,
        verdict(p99 <= target_s),
        100 * idle_cpu,
        verdict(idle_cpu < MAX_IDLE_CPU),
    ]


def main(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated")
    parser.add_argument("--appends", type=int, default=1000, help="appends per backend")
    args = parser.parse_args(argv)
    rng = random.Random(19)
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for backend in args.backends.split(","):
            note(f"{backend}: {args.appends} appends with one follower, then {IDLE_S:g} s idle")
            try:
                with Server(backend, Path(workdir)) as server, server.fresh() as target:
                    rows.append(measure(target, args.appends, rng))
            except Exception as error:
                note(f"SKIPPED {backend}: {type(error).__name__}: {error}")
    print_table(
        "follow: from an append's commit to visible in SqlEvalStorage (ms), and idle CPU",
        [
            "backend",
            "poll ms",
            "appends",
            "p50 ms",
            "p99 ms",
            "max ms",
            "target p99 ms",
            "p99",
            "idle CPU %",
            "idle (<1%)",
        ],
        rows,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
