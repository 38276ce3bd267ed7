"""Append a stream to the event log, without projecting it, for the follower tests.

Usage: ``python append_worker.py URL STUDIES EVENTS_PER_STUDY CHUNK PAUSE_MS``,
the auth token, if any, in ``EVALS_ORM_AUTH_TOKEN``. It creates STUDIES
studies of its own, starts them and records checkpoints, appending CHUNK
events at a time, round robin over its studies, with PAUSE_MS between
appends; it prints ``appended N`` (the running total) after each append.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from datetime import timedelta

from evals_orm import (
    CheckpointId,
    CheckpointRecorded,
    EvalEvent,
    LongitudinalMetrics,
    PeriodType,
    SqlEventLog,
    StoredEvalEvent,
    StudyCreated,
    StudyId,
    StudyStarted,
    StudyStopped,
    create_engine,
    uuid7,
)
from evals_orm.domain import EPOCH


def study_events(study: StudyId, count: int) -> Iterator[EvalEvent]:
    """Yield ``count`` events of one study: created, started, checkpoints, stopped last."""
    yield StudyCreated(study, f"study-{study}", PeriodType.HOURLY, 1)
    yield StudyStarted(study)
    for n in range(count - 3):
        yield CheckpointRecorded(
            CheckpointId(uuid7()),
            study,
            EPOCH + timedelta(hours=n),
            LongitudinalMetrics(sessions_completed=n, total_cost=n / 3),
            n,
            (f"session-{n}",),
        )
    yield StudyStopped(study)


def main(url: str, studies: int, per_study: int, chunk: int, pause_ms: int) -> None:
    log = SqlEventLog(create_engine(url, auth_token=os.environ.get("EVALS_ORM_AUTH_TOKEN")))
    streams = [study_events(StudyId(uuid7()), per_study) for _ in range(studies)]
    # Round robin: the studies' events interleave in the log.
    interleaved = [event for round_ in zip(*streams, strict=True) for event in round_]
    appended = 0
    for start in range(0, len(interleaved), chunk):
        # Stamped as appended, so each study's events are in event_id order.
        appended += log.append(
            [StoredEvalEvent.new(event) for event in interleaved[start : start + chunk]]
        )
        print(f"appended {appended}", flush=True)
        time.sleep(pause_ms / 1000)


if __name__ == "__main__":
    main(sys.argv[1], *(int(arg) for arg in sys.argv[2:6]))
