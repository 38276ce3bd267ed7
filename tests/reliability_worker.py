"""One process of the load test: a writer, a rebuild loop or a reader, for a bounded time.

Run as ``python tests/reliability_worker.py ROLE URL SECONDS [WRITER]`` with the
auth token, if any, in ``EVALS_ORM_AUTH_TOKEN``. It prints one line at the end:

- ``writer``: ``appended N worst S`` - events appended (each in its own
  inline-projected transaction) and the longest append in seconds;
- ``rebuild``: ``rebuilt N longest S`` - how many rebuilds from the log it
  ran, and the longest in seconds;
- ``reader``: ``read N shrank K`` - reads, and how many saw fewer studies than
  a read before (a half-built projection).
"""

from __future__ import annotations

import os
import sys
import time

from evals_orm import (
    CheckpointRecorded,
    LongitudinalMetrics,
    PeriodType,
    SqlEvalProjection,
    SqlEvalStorage,
    SqlEventLog,
    StoredEvalEvent,
    StudyCreated,
    StudyId,
    create_engine,
    uuid7,
)
from evals_orm.domain import CheckpointId
from evals_orm.events import uuid7_time


def _writer(log: SqlEventLog, projection: SqlEvalProjection, until: float) -> str:
    study = StudyId(uuid7())
    appended = 1
    worst = 0.0
    log.append(
        StoredEvalEvent(uuid7(), StudyCreated(study, "load", PeriodType.HOURLY)),
        projection=projection,
    )
    while time.monotonic() < until:
        event_id = uuid7()
        event = CheckpointRecorded(
            CheckpointId(uuid7()),
            study,
            uuid7_time(event_id),
            LongitudinalMetrics(sessions_completed=appended),
            appended,
            (),
        )
        began = time.monotonic()
        appended += log.append(StoredEvalEvent(event_id, event), projection=projection)
        worst = max(worst, time.monotonic() - began)
    return f"appended {appended} worst {worst:.3f}"


def _rebuilder(log: SqlEventLog, projection: SqlEvalProjection, until: float) -> str:
    rebuilt = 0
    longest = 0.0
    while time.monotonic() < until:
        began = time.monotonic()
        projection.rebuild(log)
        longest = max(longest, time.monotonic() - began)
        rebuilt += 1
    return f"rebuilt {rebuilt} longest {longest:.3f}"


def _reader(storage: SqlEvalStorage, until: float) -> str:
    reads = shrank = most = 0
    while time.monotonic() < until:
        seen = len(storage.list_studies())
        shrank += seen < most
        most = max(most, seen)
        reads += 1
    return f"read {reads} shrank {shrank}"


def main() -> None:
    role, url, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
    engine = create_engine(url, auth_token=os.environ.get("EVALS_ORM_AUTH_TOKEN"))
    log, projection = SqlEventLog(engine), SqlEvalProjection(engine)
    until = time.monotonic() + seconds
    if role == "writer":
        line = _writer(log, projection, until)
    elif role == "rebuild":
        line = _rebuilder(log, projection, until)
    else:
        line = _reader(SqlEvalStorage(engine), until)
    print(line, flush=True)
    engine.dispose()


if __name__ == "__main__":
    main()
