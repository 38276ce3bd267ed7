"""Apply a long deterministic event stream to a database, for the projection's process tests.

Run as ``python tests/projection_worker.py URL EVENTS BATCH_SIZE [--wait]`` with the
auth token, if any, in ``EVALS_ORM_AUTH_TOKEN``. It prints ``consumed N`` every
100 events it hands to ``apply_many`` and ``applied N`` at the end; with
``--wait`` it prints ``ready`` and waits for a line on stdin first, so several
workers start applying at the same moment. The test module imports the stream
builders from here, so both sides agree on the stream.
"""

from __future__ import annotations

import os
import random
import sys
from collections.abc import Iterable, Iterator
from datetime import datetime, timedelta
from uuid import UUID

from evals_orm import (
    CheckpointRecorded,
    EvalEvent,
    LongitudinalMetrics,
    PeriodType,
    SqlEvalProjection,
    StoredEvalEvent,
    StudyConfig,
    StudyCreated,
    StudyId,
    StudyPaused,
    StudyResumed,
    StudyStarted,
    StudyStopped,
    create_engine,
    uuid7_at,
)
from evals_orm.domain import EPOCH, CheckpointId

T0_MS = 1_700_000_000_000
PROGRESS_EVERY = 100


def ms_time(ms: int) -> datetime:
    """Return the UTC instant ``ms`` milliseconds after the epoch."""
    return EPOCH + timedelta(milliseconds=ms)


def study_id(n: int) -> StudyId:
    """Return the id of test study ``n``."""
    return StudyId(UUID(int=(0x5 << 124) | n))


def checkpoint_id(n: int) -> CheckpointId:
    """Return the id of test checkpoint ``n``."""
    return CheckpointId(UUID(int=(0xC << 124) | n))


def long_stream(events: int, studies: int = 6, seed: int = 20241126) -> Iterator[StoredEvalEvent]:
    """Yield a deterministic valid stream of ``events`` events over ``studies`` studies.

    Lifecycle events of random kinds and checkpoints (30%); the i-th event
    occurred at ``T0_MS + i`` milliseconds.
    """
    rng = random.Random(seed)
    lifecycle = (StudyStarted, StudyPaused, StudyResumed, StudyStopped)
    for i in range(events):
        event: EvalEvent
        if i < studies:
            event = StudyCreated(
                study_id(i),
                f"study-{i}",
                PeriodType.DAILY,
                i,
                StudyConfig(description=f"long stream {i}", tags=("crash",)),
            )
        else:
            sid = study_id(rng.randrange(studies))
            if rng.random() < 0.7:
                event = rng.choice(lifecycle)(sid)
            else:
                event = CheckpointRecorded(
                    checkpoint_id(i),
                    sid,
                    ms_time(T0_MS + i) - timedelta(microseconds=rng.randrange(10**6)),
                    LongitudinalMetrics(sessions_completed=i, total_cost=i / 8),
                    events_analyzed=rng.randrange(2**64),
                    sessions_included=(f"s{i}",),
                )
        yield StoredEvalEvent(uuid7_at(ms_time(T0_MS + i), i), event)


def _reporting(events: Iterable[StoredEvalEvent]) -> Iterator[StoredEvalEvent]:
    for consumed, stored in enumerate(events, start=1):
        yield stored
        if consumed % PROGRESS_EVERY == 0:
            print(f"consumed {consumed}", flush=True)


def main(argv: list[str]) -> int:
    """Apply ``long_stream(EVENTS)`` to the database at URL; print progress and the count."""
    url, events, batch_size = argv[1], int(argv[2]), int(argv[3])
    engine = create_engine(url, auth_token=os.environ.get("EVALS_ORM_AUTH_TOKEN"))
    projection = SqlEvalProjection(engine, batch_size=batch_size)
    if "--wait" in argv[4:]:
        print("ready", flush=True)
        sys.stdin.readline()
    applied = projection.apply_many(_reporting(long_stream(events)))
    print(f"applied {applied}", flush=True)
    engine.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
