"""A writer or projector process for the multi-process event log test.

Usage: ``python eventlog_worker.py writer URL SECONDS SEED STUDY_ID...`` or
``python eventlog_worker.py projector URL SECONDS SEED``; the auth token, if
any, comes from ``EVALS_ORM_AUTH_TOKEN``. The worker prints ``ready``, waits
for a line on stdin (so every worker starts at once), works for SECONDS and
prints one JSON line with what it did.

A writer appends batches of 1-3 events to the given studies (and to studies
it creates itself), re-stamping and retrying on ``EventOrderError``; it
reports the ids of the events it appended. A projector runs
``SqlEvalProjection.catch_up`` in a loop and reports how many events it
applied and any ``ProjectionError``.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any

from evals_orm import (
    CheckpointId,
    CheckpointRecorded,
    EvalEvent,
    EventOrderError,
    LongitudinalMetrics,
    PeriodType,
    ProjectionError,
    SqlEvalProjection,
    SqlEventLog,
    StoredEvalEvent,
    StudyCreated,
    StudyId,
    StudyPaused,
    StudyResumed,
    StudyStarted,
    create_engine,
)

_EPOCH = datetime(2025, 1, 1, tzinfo=timezone.utc)


def _checkpoint(rng: random.Random, study_id: StudyId) -> CheckpointRecorded:
    return CheckpointRecorded(
        CheckpointId(uuid.uuid4()),
        study_id,
        _EPOCH + timedelta(seconds=rng.randrange(10**6)),
        LongitudinalMetrics(sessions_completed=rng.randrange(100), total_cost=rng.random()),
        rng.randrange(2**64),
        tuple(f"session-{rng.randrange(1000)}" for _ in range(rng.randrange(3))),
    )


def _lifecycle(rng: random.Random, study_id: StudyId) -> EvalEvent:
    kind = rng.choice((StudyPaused, StudyResumed, StudyStarted))
    return kind(study_id)


def _append_retrying(log: SqlEventLog, events: list[EvalEvent]) -> tuple[list[str], int]:
    """Append ``events`` stamped afresh until no ``EventOrderError``; return ids and retries."""
    retries = 0
    while True:
        batch = [StoredEvalEvent.new(event) for event in events]
        try:
            appended = log.append(batch)
        except EventOrderError:
            retries += 1
            continue
        if appended != len(batch):
            raise AssertionError(f"appended {appended} of {len(batch)} fresh events")
        return [str(stored.event_id) for stored in batch], retries


def write(log: SqlEventLog, seconds: float, seed: int, shared: list[StudyId]) -> dict[str, Any]:
    """Append events to ``shared`` studies and to new ones for ``seconds``."""
    rng = random.Random(seed)
    studies = list(shared)
    appended: list[str] = []
    order_retries = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if rng.random() < 0.05:
            study_id = StudyId(uuid.uuid4())
            events: list[EvalEvent] = [
                StudyCreated(study_id, f"study-{seed}-{len(studies)}", PeriodType.DAILY),
                StudyStarted(study_id),
            ]
            studies.append(study_id)
        else:
            study_id = rng.choice(studies)
            events = [
                _checkpoint(rng, study_id) if rng.random() < 0.7 else _lifecycle(rng, study_id)
                for _ in range(rng.randint(1, 3))
            ]
        ids, retries = _append_retrying(log, events)
        appended.extend(ids)
        order_retries += retries
    return {"role": "writer", "appended": appended, "order_retries": order_retries}


def project(log: SqlEventLog, seconds: float, seed: int) -> dict[str, Any]:
    """Run ``catch_up`` in a loop for ``seconds``."""
    projection = SqlEvalProjection(log.bind, batch_size=random.Random(seed).randint(5, 50))
    applied = 0
    rounds = 0
    errors: list[str] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            applied += projection.catch_up(log)
        except ProjectionError as error:
            errors.append(str(error))
        rounds += 1
    return {"role": "projector", "applied": applied, "rounds": rounds, "errors": errors}


def main(argv: list[str]) -> int:
    """Run one worker as described in the module docstring."""
    role, url, seconds, seed, *studies = argv
    engine = create_engine(url, auth_token=os.environ.get("EVALS_ORM_AUTH_TOKEN"))
    log = SqlEventLog(engine)
    print("ready", flush=True)
    if sys.stdin.readline() != "go\n":
        return 1
    if role == "writer":
        result = write(log, float(seconds), int(seed), [StudyId(uuid.UUID(s)) for s in studies])
    else:
        result = project(log, float(seconds), int(seed))
    engine.dispose()
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
