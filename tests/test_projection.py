"""SqlEvalProjection meets SPEC section 7 on every backend."""

from __future__ import annotations

import functools
import gc
import itertools
import os
import signal
import subprocess
import sys
import threading
import weakref
from collections.abc import Iterable, Iterator, Sequence
from datetime import timedelta
from pathlib import Path
from typing import cast
from uuid import UUID

import attrs
import pytest
import sqlalchemy as sa
from aio_support import ProjectionFactory
from conftest import Database
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from projection_worker import T0_MS, checkpoint_id, long_stream, ms_time, study_id
from sqlalchemy.orm import sessionmaker

from evals_orm import (
    Checkpoint,
    CheckpointRecorded,
    EvalEvent,
    EvalProjection,
    EvalsError,
    LongitudinalMetrics,
    PeriodType,
    ProjectionError,
    SqlEvalProjection,
    SqlEvalStorage,
    StoredEvalEvent,
    Study,
    StudyConfig,
    StudyCreated,
    StudyPaused,
    StudyResumed,
    StudyStarted,
    StudyStatus,
    StudyStopped,
    uuid7_at,
)
from evals_orm import projection as projection_module
from evals_orm.domain import StudyId

from support import raw_rows

WORKER = Path(__file__).with_name("projection_worker.py")
Snapshot = tuple[list[Study], list[Checkpoint]]
LifecycleEvent = type[StudyStarted] | type[StudyPaused] | type[StudyResumed] | type[StudyStopped]

PENDING, RUNNING, PAUSED, STOPPED = (
    StudyStatus.PENDING,
    StudyStatus.RUNNING,
    StudyStatus.PAUSED,
    StudyStatus.STOPPED,
)
S1 = study_id(1)
S2 = study_id(2)


# --- factories ---------------------------------------------------------------------------


def at(ms: int, event: EvalEvent, seq: int = 0) -> StoredEvalEvent:
    """Stamp ``event`` with a UUIDv7 of ``T0_MS + ms`` milliseconds."""
    return StoredEvalEvent(uuid7_at(ms_time(T0_MS + ms), seq), event)


def created(sid: StudyId = S1, name: str = "weekly-eval") -> StudyCreated:
    """A StudyCreated with a non-default config."""
    return StudyCreated(
        sid, name, PeriodType.WEEKLY, 2, StudyConfig("Test study", ("eval",), {"k": "v"})
    )


def checkpoint(n: int, sid: StudyId = S1, tokens: int = 7) -> CheckpointRecorded:
    """A CheckpointRecorded with id ``n`` of study ``sid``."""
    return CheckpointRecorded(
        checkpoint_id(n),
        sid,
        ms_time(T0_MS) + timedelta(hours=n, microseconds=123456),
        LongitudinalMetrics(sessions_completed=n, total_tokens=tokens, total_cost=0.25),
        events_analyzed=2**64 - 1,
        sessions_included=("a", "b"),
    )


def study(
    sid: StudyId = S1,
    status: StudyStatus = PENDING,
    created_ms: int = 0,
    started_ms: int | None = None,
    stopped_ms: int | None = None,
) -> Study:
    """The Study that ``created(sid)`` at ``created_ms`` and later events make."""
    event = created(sid)
    return Study(
        sid,
        event.name,
        status,
        event.period_type,
        event.period_value,
        event.config,
        ms_time(T0_MS + created_ms),
        None if started_ms is None else ms_time(T0_MS + started_ms),
        None if stopped_ms is None else ms_time(T0_MS + stopped_ms),
    )


# --- the reference model -----------------------------------------------------------------


@attrs.define
class Model:
    """The projection as a pure Python fold over the stream (valid streams only)."""

    studies: dict[UUID, Study] = attrs.field(factory=dict)
    last: dict[UUID, UUID] = attrs.field(factory=dict)
    checkpoints: dict[UUID, Checkpoint] = attrs.field(factory=dict)

    def apply(self, stored: StoredEvalEvent) -> bool:
        """Apply one event; return False for a duplicate."""
        sid, event, when = stored.study_id, stored.event, stored.occurred_at
        if sid in self.last and stored.event_id <= self.last[sid]:
            return False
        self.last[sid] = stored.event_id
        if isinstance(event, StudyCreated):
            assert sid not in self.studies
            self.studies[sid] = Study(
                sid, event.name, PENDING, event.period_type, event.period_value, event.config, when
            )
            return True
        current = self.studies[sid]
        if isinstance(event, CheckpointRecorded):
            assert self.checkpoints.setdefault(event.id, event.to_checkpoint()) == (
                event.to_checkpoint()
            )
        elif isinstance(event, StudyStarted) and current.status is PENDING:
            self.studies[sid] = attrs.evolve(current, status=RUNNING, started_at=when)
        elif isinstance(event, StudyPaused) and current.status is RUNNING:
            self.studies[sid] = attrs.evolve(current, status=PAUSED)
        elif isinstance(event, StudyResumed) and current.status is PAUSED:
            self.studies[sid] = attrs.evolve(current, status=RUNNING)
        elif isinstance(event, StudyStopped) and current.status is not STOPPED:
            self.studies[sid] = attrs.evolve(current, status=STOPPED, stopped_at=when)
        return True

    def apply_all(self, events: Iterable[StoredEvalEvent]) -> int:
        """Apply every event; return how many were new."""
        return sum(self.apply(stored) for stored in events)

    def snapshot(self) -> Snapshot:
        """Return what ``snapshot`` reads from a database holding this projection."""
        studies = sorted(self.studies.values(), key=lambda s: (s.created_at, s.id), reverse=True)
        checkpoints = [
            checkpoint
            for s in studies
            for checkpoint in sorted(
                (c for c in self.checkpoints.values() if c.study_id == s.id),
                key=lambda c: (c.timestamp, c.id),
            )
        ]
        return studies, checkpoints


def reference(events: Iterable[StoredEvalEvent]) -> Snapshot:
    """Return the snapshot of the model fed ``events``."""
    model = Model()
    model.apply_all(events)
    return model.snapshot()


def snapshot(bind: sa.Engine) -> Snapshot:
    """Read every study and checkpoint through ``SqlEvalStorage``, in its orders."""
    storage = SqlEvalStorage(bind)
    studies = storage.list_studies()
    return studies, [c for s in studies for c in storage.get_checkpoints(s.id)]


def lifecycle(sid: StudyId = S1) -> list[StoredEvalEvent]:
    """A full history of one study: created, started, paused, resumed, checkpoints, stopped."""
    base = 100 * (sid.int & 0xFF)
    return [
        at(1, created(sid)),
        at(2, StudyStarted(sid)),
        at(3, checkpoint(base + 1, sid)),
        at(4, StudyPaused(sid)),
        at(5, StudyResumed(sid)),
        at(6, checkpoint(base + 2, sid)),
        at(7, StudyStopped(sid)),
        at(8, StudyStarted(sid)),
    ]


def interleaved() -> list[StoredEvalEvent]:
    """Two studies' histories merged in time order."""
    return sorted(lifecycle(S1) + lifecycle(S2)[:5], key=lambda s: s.event_id)


# --- basics -------------------------------------------------------------------------------


def test_sql_projection_is_an_eval_projection(migrated: sa.Engine) -> None:
    """SqlEvalProjection implements the EvalProjection protocol."""
    assert isinstance(SqlEvalProjection(migrated), EvalProjection)


def test_apply_returns_true_then_false_on_redelivery(migrated: sa.Engine) -> None:
    """apply returns True for a new event and False when the same event comes again."""
    projection = SqlEvalProjection(migrated)
    first = at(1, created())
    assert [True, False] == [projection.apply(first), projection.apply(first)]
    assert ([study(created_ms=1)], []) == snapshot(migrated)


def test_apply_many_counts_newly_applied(migrated: sa.Engine) -> None:
    """apply_many returns how many events of the iterable were new, batch after batch."""
    events = interleaved()
    projection = SqlEvalProjection(migrated, batch_size=3)
    assert 6 == projection.apply_many(events[:6])
    assert len(events) - 6 == projection.apply_many(events)
    assert 0 == projection.apply_many(events)
    assert reference(events) == snapshot(migrated)


def test_full_lifecycle_sets_timestamps_from_event_ids(migrated: sa.Engine) -> None:
    """created_at, started_at, stopped_at are the occurred_at of the events that set them."""
    events = [
        at(11, created()),
        at(222, StudyStarted(S1)),
        at(3333, StudyPaused(S1)),
        at(44444, StudyResumed(S1)),
        at(55555, StudyStarted(S1)),
        at(666666, StudyStopped(S1)),
        at(7777777, StudyStopped(S1)),
    ]
    assert len(events) == SqlEvalProjection(migrated).apply_many(events)
    expected = study(status=STOPPED, created_ms=11, started_ms=222, stopped_ms=666666)
    assert expected == SqlEvalStorage(migrated).get_study(S1)
    assert events[1].occurred_at == expected.started_at


def test_same_millisecond_events_keep_their_order(migrated: sa.Engine) -> None:
    """Events in one millisecond are ordered by the rest of their UUIDv7."""
    events = [at(5, created(), 1), at(5, StudyStarted(S1), 2), at(5, StudyStopped(S1), 3)]
    projection = SqlEvalProjection(migrated)
    assert 3 == projection.apply_many(events)
    assert not projection.apply(at(5, StudyResumed(S1), 2))
    assert [study(status=STOPPED, created_ms=5, started_ms=5, stopped_ms=5)] == (
        SqlEvalStorage(migrated).list_studies()
    )


def test_checkpoints_are_projected(migrated: sa.Engine) -> None:
    """CheckpointRecorded inserts the checkpoint it carries, u64 values included."""
    events = [at(1, created()), at(2, checkpoint(2)), at(3, checkpoint(1))]
    SqlEvalProjection(migrated).apply_many(events)
    expected = [checkpoint(1).to_checkpoint(), checkpoint(2).to_checkpoint()]
    assert expected == SqlEvalStorage(migrated).get_checkpoints(S1)


def test_rebuild_replaces_the_projection(migrated: sa.Engine) -> None:
    """rebuild drops what the old stream made and returns how many events it applied."""
    projection = SqlEvalProjection(migrated, batch_size=2)
    projection.apply_many(lifecycle(S2))
    events = lifecycle(S1)
    assert len(events) == projection.rebuild(events + events)
    assert reference(events) == snapshot(migrated)


@pytest.mark.parametrize("listed", ["listed", "too many to list"])
def test_rebuild_writes_exactly_the_rows_that_differ(
    migrated: sa.Engine, monkeypatch: pytest.MonkeyPatch, listed: str
) -> None:
    """A checkpoint with another payload, a gone one, a new one, a changed study: all replaced.

    The same when more checkpoints differ than a rebuild lists by id: the
    final transaction then compares all of them, a range of ids at a time
    (here of one id).
    """
    if listed != "listed":
        monkeypatch.setattr(projection_module, "_MAX_IDS", 0)
        monkeypatch.setattr(projection_module, "_ID_CHUNK", 1)
    projection = SqlEvalProjection(migrated, batch_size=2)
    kept = [at(0, created(S2)), at(1, checkpoint(20, S2))]
    old = [*kept, at(2, created()), at(3, checkpoint(1)), at(4, checkpoint(2))]
    new = [*kept, at(2, created()), at(3, checkpoint(1, tokens=8)), at(5, StudyStarted(S1))]
    new.append(at(6, checkpoint(3)))
    projection.apply_many(old)
    written: list[str] = []
    deleted: list[int] = []

    def record(
        _conn: object, cursor: sa.engine.interfaces.DBAPICursor, statement: str, *_args: object
    ) -> None:
        text = " ".join(statement.split()).lower()
        if text.startswith(("insert into studies", "insert into checkpoints", "delete from")):
            written.append(text)
        if text.startswith("delete from checkpoints"):
            deleted.append(cursor.rowcount)

    sa.event.listen(migrated, "after_cursor_execute", record)
    try:
        assert len(new) == projection.rebuild(new)
    finally:
        sa.event.remove(migrated, "after_cursor_execute", record)
    assert reference(new) == snapshot(migrated)
    assert any(text.startswith("insert into checkpoints") for text in written)
    # The changed checkpoint and the gone one; the one kept as it was stays.
    assert 2 == sum(deleted)
    assert [checkpoint(20, S2).to_checkpoint()] == SqlEvalStorage(migrated).get_checkpoints(S2)


def test_clear_ends_a_rebuild_under_way(migrated: sa.Engine) -> None:
    """A rebuild whose live rows were cleared meanwhile stops instead of replacing them."""
    projection = SqlEvalProjection(migrated, batch_size=1)
    events = lifecycle()
    projection.apply_many(events)
    cleared = False

    def clear_once(_done: int) -> None:
        nonlocal cleared
        if not cleared:
            cleared = True
            projection.clear()

    with pytest.raises(EvalsError, match="started meanwhile"):
        projection.rebuild(events, on_progress=clear_once)
    assert ([], []) == snapshot(migrated)
    assert len(events) == projection.rebuild(events)
    assert reference(events) == snapshot(migrated)


def test_rebuild_equals_incremental_application(migrated: sa.Engine) -> None:
    """Applying a stream in batches and rebuilding from it give identical rows."""
    events = interleaved()
    projection = SqlEvalProjection(migrated, batch_size=2)
    for event in events:
        projection.apply(event)
    incremental = snapshot(migrated)
    assert len(events) == projection.rebuild(iter(events))
    assert incremental == snapshot(migrated)
    assert reference(events) == incremental


def test_clear_empties_the_projection(migrated: sa.Engine) -> None:
    """clear removes every study and checkpoint; the stream then applies anew."""
    projection = SqlEvalProjection(migrated)
    events = lifecycle()
    projection.apply_many(events)
    projection.clear()
    assert ([], []) == snapshot(migrated)
    assert len(events) == projection.apply_many(events)
    assert reference(events) == snapshot(migrated)


def test_works_through_a_sessionmaker(migrated: sa.Engine) -> None:
    """A sessionmaker bound to the Engine is as good a bind as the Engine."""
    projection = SqlEvalProjection(sessionmaker(migrated))
    events = lifecycle()
    assert len(events) == projection.apply_many(events)
    assert [True, False] == [projection.apply(at(9, checkpoint(9))), projection.apply(events[0])]
    assert reference([*events, at(9, checkpoint(9))]) == snapshot(migrated)


def test_batch_size_must_be_positive() -> None:
    """A batch size below 1 is refused."""
    with pytest.raises(ValueError, match="batch_size"):
        SqlEvalProjection(sa.create_engine("sqlite://"), batch_size=0)


# --- the state machine --------------------------------------------------------------------

# The history that brings S1 into each status; the event under test comes at 50 ms.
SETUP: dict[StudyStatus, list[StoredEvalEvent]] = {
    PENDING: [at(10, created())],
    RUNNING: [at(10, created()), at(20, StudyStarted(S1))],
    PAUSED: [at(10, created()), at(20, StudyStarted(S1)), at(30, StudyPaused(S1))],
    STOPPED: [at(10, created()), at(20, StudyStarted(S1)), at(30, StudyStopped(S1))],
}
BEFORE = {
    PENDING: study(status=PENDING, created_ms=10),
    RUNNING: study(status=RUNNING, created_ms=10, started_ms=20),
    PAUSED: study(status=PAUSED, created_ms=10, started_ms=20),
    STOPPED: study(status=STOPPED, created_ms=10, started_ms=20, stopped_ms=30),
}
# (status before, event, status after, started_at ms, stopped_at ms); None after: invalid.
TABLE: list[tuple[StudyStatus, type[EvalEvent], StudyStatus | None, int | None, int | None]] = [
    (PENDING, StudyCreated, None, None, None),
    (PENDING, StudyStarted, RUNNING, 50, None),
    (PENDING, StudyPaused, PENDING, None, None),
    (PENDING, StudyResumed, PENDING, None, None),
    (PENDING, StudyStopped, STOPPED, None, 50),
    (RUNNING, StudyCreated, None, None, None),
    (RUNNING, StudyStarted, RUNNING, 20, None),
    (RUNNING, StudyPaused, PAUSED, 20, None),
    (RUNNING, StudyResumed, RUNNING, 20, None),
    (RUNNING, StudyStopped, STOPPED, 20, 50),
    (PAUSED, StudyCreated, None, None, None),
    (PAUSED, StudyStarted, PAUSED, 20, None),
    (PAUSED, StudyPaused, PAUSED, 20, None),
    (PAUSED, StudyResumed, RUNNING, 20, None),
    (PAUSED, StudyStopped, STOPPED, 20, 50),
    (STOPPED, StudyCreated, None, None, None),
    (STOPPED, StudyStarted, STOPPED, 20, 30),
    (STOPPED, StudyPaused, STOPPED, 20, 30),
    (STOPPED, StudyResumed, STOPPED, 20, 30),
    (STOPPED, StudyStopped, STOPPED, 20, 30),
]


@pytest.mark.parametrize(
    ("status", "event_type", "after", "started_ms", "stopped_ms"),
    TABLE,
    ids=[f"{row[0].value}-{row[1].__name__}" for row in TABLE],
)
def test_state_machine(
    migrated: sa.Engine,
    projection_factory: ProjectionFactory,
    *,
    status: StudyStatus,
    event_type: type[EvalEvent],
    after: StudyStatus | None,
    started_ms: int | None,
    stopped_ms: int | None,
) -> None:
    """Each (status, lifecycle event) pair gives the row of the SPEC's state machine."""
    projection = projection_factory(migrated)
    storage = SqlEvalStorage(migrated)
    projection.apply_many(SETUP[status])
    assert BEFORE[status] == storage.get_study(S1)
    event = at(
        50, created() if event_type is StudyCreated else cast(LifecycleEvent, event_type)(S1)
    )
    if after is None:
        with pytest.raises(ProjectionError, match="already exists") as raised:
            projection.apply(event)
        assert event.event_id == raised.value.event_id
        assert BEFORE[status] == storage.get_study(S1)
        return
    assert projection.apply(event)
    expected = study(status=after, created_ms=10, started_ms=started_ms, stopped_ms=stopped_ms)
    assert expected == storage.get_study(S1)
    # Applied, even when nothing changed: the event and anything older are duplicates now.
    assert not projection.apply(event)
    assert not projection.apply(at(40, StudyStopped(S1)))
    assert expected == storage.get_study(S1)


# --- exactly once -------------------------------------------------------------------------


def test_overlapping_batches_apply_each_event_once(
    migrated: sa.Engine, projection_factory: ProjectionFactory
) -> None:
    """Redelivered and overlapping batches count only their new events."""
    events = interleaved()
    projection = projection_factory(migrated, batch_size=4)
    counts = [
        projection.apply_many(events[0:5]),
        projection.apply_many(events[3:9]),
        projection.apply_many(events[0:2] + events[7:]),
        projection.apply_many(events),
        projection.apply_many(reversed(events)),
    ]
    assert [5, 4, len(events) - 9, 0, 0] == counts
    assert reference(events) == snapshot(migrated)


def test_replaying_the_whole_stream_changes_nothing(
    migrated: sa.Engine, projection_factory: ProjectionFactory
) -> None:
    """A whole-stream replay, one event at a time, applies nothing."""
    events = interleaved()
    projection = projection_factory(migrated)
    projection.apply_many(events)
    before = snapshot(migrated)
    assert [False] * len(events) == [projection.apply(event) for event in events]
    assert before == snapshot(migrated)


def test_event_older_than_the_newest_applied_is_a_duplicate(
    migrated: sa.Engine, projection_factory: ProjectionFactory
) -> None:
    """An unseen event older than the newest applied event of its study is skipped."""
    projection = projection_factory(migrated)
    projection.apply_many([at(1, created()), at(5, StudyStarted(S1)), at(2, created(S2))])
    late = [at(3, StudyStopped(S1)), at(4, checkpoint(4)), at(3, StudyStarted(S2))]
    assert [False, False, True] == [projection.apply(event) for event in late]
    assert [study(S2, RUNNING, 2, 3), study(S1, RUNNING, 1, 5)] == (
        SqlEvalStorage(migrated).list_studies()
    )
    assert [] == SqlEvalStorage(migrated).get_checkpoints(S1)


def test_same_checkpoint_under_a_new_event_id_is_an_applied_no_op(migrated: sa.Engine) -> None:
    """A checkpoint recorded again with the same payload applies (True) and changes nothing."""
    projection = SqlEvalProjection(migrated)
    projection.apply_many([at(1, created()), at(2, checkpoint(1))])
    again = at(3, checkpoint(1))
    assert [True, False] == [projection.apply(again), projection.apply(again)]
    assert [checkpoint(1).to_checkpoint()] == SqlEvalStorage(migrated).get_checkpoints(S1)
    assert [True, True] == [
        projection.apply(at(4, checkpoint(1))),
        projection.apply(at(5, StudyStarted(S1))),
    ]


def test_same_checkpoint_twice_in_one_batch(migrated: sa.Engine) -> None:
    """A checkpoint repeated with the same payload within a batch is stored once."""
    events = [at(1, created()), at(2, checkpoint(1)), at(3, checkpoint(1)), at(4, checkpoint(1))]
    assert 4 == SqlEvalProjection(migrated).apply_many(events)
    assert [checkpoint(1).to_checkpoint()] == SqlEvalStorage(migrated).get_checkpoints(S1)


# --- invalid events -----------------------------------------------------------------------

# A UUIDv7 can carry a time up to the year 10889; a datetime stops at 9999.
YEAR_10889 = UUID(int=((1 << 48) - 1) << 80 | 0x7 << 76 | 0b10 << 62)

INVALID: dict[str, tuple[list[StoredEvalEvent], StoredEvalEvent, str]] = {
    "started-unknown": ([], at(9, StudyStarted(S1)), "does not exist"),
    "paused-unknown": ([], at(9, StudyPaused(S1)), "does not exist"),
    "resumed-unknown": ([], at(9, StudyResumed(S1)), "does not exist"),
    "stopped-unknown": ([], at(9, StudyStopped(S1)), "does not exist"),
    "checkpoint-unknown": ([], at(9, checkpoint(1)), "does not exist"),
    "created-again": ([at(3, created())], at(9, created(S1, "other")), "already exists"),
    "checkpoint-conflict": (
        [at(3, created()), at(4, checkpoint(1))],
        at(9, checkpoint(1, tokens=8)),
        "another payload",
    ),
    "checkpoint-of-other-study": (
        [at(3, created()), at(4, created(study_id(4))), at(5, checkpoint(1, study_id(4)))],
        at(9, checkpoint(1, S1)),
        "another payload",
    ),
    "created-after-9999": (
        [],
        StoredEvalEvent(YEAR_10889, created(study_id(5))),
        "after the year 9999",
    ),
    "started-after-9999": (
        [at(3, created())],
        StoredEvalEvent(YEAR_10889, StudyStarted(S1)),
        "after the year 9999",
    ),
}


@pytest.mark.parametrize("case", sorted(INVALID))
def test_invalid_event_raises_and_rolls_back_its_batch(
    migrated: sa.Engine, projection_factory: ProjectionFactory, case: str
) -> None:
    """An invalid event raises ProjectionError; its batch is invisible, earlier batches stay."""
    setup, bad, reason = INVALID[case]
    projection = projection_factory(migrated, batch_size=100)
    earlier = [at(1, created(S2, "earlier")), at(2, StudyStarted(S2))]
    projection.apply_many(earlier + setup)
    before = snapshot(migrated)
    same_batch = [at(6, checkpoint(6, S2)), at(7, StudyPaused(S2)), at(8, created(study_id(3)))]
    with pytest.raises(ProjectionError) as raised:
        projection.apply_many([*same_batch, bad, at(10, StudyStopped(S2))])
    assert (bad.event_id, True) == (raised.value.event_id, reason in raised.value.reason)
    assert str(bad.event_id) in str(raised.value)
    assert before == snapshot(migrated)
    with pytest.raises(ProjectionError):
        projection.apply(bad)
    assert before == snapshot(migrated)
    assert len(same_batch) == projection.apply_many(same_batch)


def test_the_first_invalid_event_of_a_batch_is_reported(
    migrated: sa.Engine, projection_factory: ProjectionFactory
) -> None:
    """A stored checkpoint conflicting early in a batch is reported before a later invalid event."""
    projection = projection_factory(migrated)
    projection.apply_many([at(1, created()), at(2, checkpoint(1))])
    before = snapshot(migrated)
    conflict = at(3, checkpoint(1, tokens=8))
    with pytest.raises(ProjectionError) as raised:
        projection.apply_many([conflict, at(4, StudyStarted(S2))])
    assert conflict.event_id == raised.value.event_id
    assert before == snapshot(migrated)


def test_invalid_event_keeps_the_batches_committed_before_it(
    migrated: sa.Engine, projection_factory: ProjectionFactory
) -> None:
    """apply_many commits the batches before the invalid event's batch, and not that batch."""
    events = lifecycle()
    projection = projection_factory(migrated, batch_size=3)
    bad = at(100, StudyStarted(S2))
    with pytest.raises(ProjectionError) as raised:
        projection.apply_many([*events[:7], bad, *events[7:]])
    assert bad.event_id == raised.value.event_id
    assert reference(events[:6]) == snapshot(migrated)


# --- property: the projection is a pure function of the stream -----------------------------

KINDS: dict[str, LifecycleEvent] = {
    "start": StudyStarted,
    "pause": StudyPaused,
    "resume": StudyResumed,
    "stop": StudyStopped,
}
OPS = (*KINDS, "checkpoint", "checkpoint-again")


@st.composite
def streams(draw: st.DrawFn) -> list[StoredEvalEvent]:
    """A valid stream: a few studies' random histories interleaved in time order."""
    per_study: list[list[EvalEvent]] = []
    for n in range(draw(st.integers(1, 3))):
        sid = study_id(n)
        history: list[EvalEvent] = [created(sid, f"s{n}")]
        recorded: list[CheckpointRecorded] = []
        for op in draw(st.lists(st.sampled_from(OPS), max_size=8)):
            if op == "checkpoint" or (op == "checkpoint-again" and not recorded):
                recorded.append(checkpoint(100 * n + len(recorded), sid, draw(st.integers(0, 3))))
                history.append(recorded[-1])
            elif op == "checkpoint-again":
                history.append(draw(st.sampled_from(recorded)))
            else:
                kind: dict[str, LifecycleEvent] = {
                    "start": StudyStarted,
                    "pause": StudyPaused,
                    "resume": StudyResumed,
                }
                history.append(kind.get(op, StudyStopped)(sid))
        per_study.append(history)
    order = draw(st.permutations([n for n, h in enumerate(per_study) for _ in h]))
    cursors = [0] * len(per_study)
    stream = []
    ms = 0
    for seq, n in enumerate(order):
        ms += draw(st.integers(0, 2))
        stream.append(at(ms, per_study[n][cursors[n]], seq))
        cursors[n] += 1
    return stream


@given(stream=streams(), data=st.data())
@settings(
    max_examples=10,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
def test_projection_equals_the_reference_model(
    migrated: sa.Engine, stream: list[StoredEvalEvent], data: st.DataObject
) -> None:
    """Any at-least-once delivery of a stream, in any batches, gives the model's projection."""
    projection = SqlEvalProjection(migrated, batch_size=data.draw(st.integers(1, 5)))
    projection.clear()
    model = Model()
    delivered = 0
    while delivered < len(stream):
        start = data.draw(st.integers(0, delivered))
        end = data.draw(st.integers(delivered + 1, len(stream)))
        chunk = stream[start:end]
        if data.draw(st.booleans()):
            chunk = chunk + chunk[: data.draw(st.integers(0, len(chunk)))]
        expected = model.apply_all(chunk)
        if len(chunk) == 1:
            assert bool(expected) == projection.apply(chunk[0])
        else:
            assert expected == projection.apply_many(chunk)
        delivered = end
    applied = snapshot(migrated)
    assert model.snapshot() == applied
    assert reference(stream) == applied
    assert len(stream) == projection.rebuild(stream)
    assert applied == snapshot(migrated)


# --- atomic rebuild, laziness -------------------------------------------------------------


def test_rebuild_is_atomic_for_readers(
    database: Database, migrated: sa.Engine, projection_factory: ProjectionFactory
) -> None:
    """While a rebuild runs, another Engine reads the whole old projection, then the new one."""
    old = lifecycle(S1)
    new = sorted(lifecycle(S2) + lifecycle(study_id(3))[:4], key=lambda s: s.event_id)
    projection = projection_factory(migrated, batch_size=2)
    projection.apply_many(old)
    halfway, resume = threading.Event(), threading.Event()

    def slow(events: Sequence[StoredEvalEvent]) -> Iterator[StoredEvalEvent]:
        for i, stored in enumerate(events):
            if i == 5:
                # Two batches are written inside the rebuild's transaction by now.
                halfway.set()
                assert resume.wait(60)
            yield stored

    results: list[int | BaseException] = []

    def run() -> None:
        try:
            results.append(projection.rebuild(slow(new)))
        except BaseException as error:  # reported by the main thread
            results.append(error)
            halfway.set()

    reader = database.engine()
    try:
        thread = threading.Thread(target=run)
        thread.start()
        assert halfway.wait(60)
        during = snapshot(reader)
        resume.set()
        thread.join(60)
        assert [len(new)] == results
        assert reference(old) == during
        assert reference(new) == snapshot(reader)
    finally:
        resume.set()
        reader.dispose()


def test_failed_rebuild_keeps_the_old_projection(
    migrated: sa.Engine, projection_factory: ProjectionFactory
) -> None:
    """A rebuild whose stream fails midway rolls back to the old projection."""
    projection = projection_factory(migrated, batch_size=2)
    projection.apply_many(lifecycle(S1))
    before = snapshot(migrated)

    def failing() -> Iterator[StoredEvalEvent]:
        yield from lifecycle(S2)
        raise RuntimeError("the source broke")

    with pytest.raises(RuntimeError, match="source broke"):
        projection.rebuild(failing())
    with pytest.raises(ProjectionError):
        projection.rebuild([*lifecycle(S2), at(9, created(S2))])
    assert before == snapshot(migrated)


def test_the_rebuild_tables_are_emptied_a_page_per_transaction(
    migrated: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What an unfinished rebuild left, and what a rebuild copied, goes a page at a time.

    The last page of each table is a DELETE of the whole table; every page
    before it, a transaction of its own.
    """
    monkeypatch.setattr(projection_module, "_ID_CHUNK", 2)
    projection = SqlEvalProjection(migrated, batch_size=1)
    events = [*lifecycle(S1), *(at(10 + n, checkpoint(n)) for n in range(5))]

    def failing() -> Iterator[StoredEvalEvent]:
        yield from events
        raise RuntimeError("the source broke")

    with pytest.raises(RuntimeError, match="source broke"):
        projection.rebuild(failing())
    assert [(1,), (7,)] == copied(migrated)  # the lifecycle's two checkpoints and five
    steps: list[str] = []

    def record(_conn: object, _cursor: object, statement: str, *_args: object) -> None:
        text = " ".join(statement.split()).lower()
        if text.startswith("delete from eval_rebuild_checkpoints"):
            steps.append("paged" if " where " in text else "whole")

    def commit(_conn: object) -> None:
        steps.append("commit")

    sa.event.listen(migrated, "before_cursor_execute", record)
    sa.event.listen(migrated, "commit", commit)
    try:
        assert len(events) == projection.rebuild(events)
    finally:
        sa.event.remove(migrated, "before_cursor_execute", record)
        sa.event.remove(migrated, "commit", commit)
    assert reference(events) == snapshot(migrated)
    assert [(0,), (0,)] == copied(migrated)
    # Before the replay (7 left) and after it (7 copied): three pages of 2, then the rest.
    pages = ["paged", "paged", "paged", "whole"]
    assert pages * 2 == [step for step in steps if step != "commit"]
    assert all(later == "commit" for step, later in itertools.pairwise(steps) if step == "paged")


def copied(engine: sa.Engine) -> list[tuple[int]]:
    """Return how many rows the rebuild tables hold: studies, then checkpoints."""
    return [
        *raw_rows(engine, "SELECT count(*) FROM eval_rebuild_studies"),
        *raw_rows(engine, "SELECT count(*) FROM eval_rebuild_checkpoints"),
    ]


def test_apply_many_consumes_its_iterable_lazily(migrated: sa.Engine) -> None:
    """apply_many commits a batch before it reads the next one from the iterable."""
    projection = SqlEvalProjection(migrated, batch_size=3)
    storage = SqlEvalStorage(migrated)
    seen: list[tuple[int, int]] = []

    def endless() -> Iterator[StoredEvalEvent]:
        for i in range(10**9):
            if i % 3 == 0:
                seen.append((i, len(storage.list_studies())))
            if i == 9:
                raise RuntimeError("stop here")
            yield at(i, created(study_id(i)))

    with pytest.raises(RuntimeError, match="stop here"):
        projection.apply_many(endless())
    assert [(0, 0), (3, 3), (6, 6), (9, 9)] == seen
    assert 9 == len(storage.list_studies())


class Cycle:
    """An object that will refer to itself: only the cyclic GC frees it."""

    itself: Cycle | None = None


@pytest.mark.parametrize("collector", ["on", "off"])
def test_batches_pause_the_cyclic_gc_and_leave_it_as_found(
    migrated: sa.Engine, collector: str
) -> None:
    """While a batch is drawn, applied and reported the cyclic GC is off; after
    apply_many or rebuild, failed or not, it is as it was before."""
    was_enabled = gc.isenabled()
    if collector == "on":
        gc.enable()
    else:
        gc.disable()
    try:
        projection = SqlEvalProjection(migrated, batch_size=3)
        drawn: list[bool] = []
        # A reference cycle made at each batch's first event, and whether
        # the previous batch's was collected by then.
        cycles: list[weakref.ref[Cycle]] = []
        collected: list[bool] = []

        def watched(events: Iterable[StoredEvalEvent]) -> Iterator[StoredEvalEvent]:
            for index, stored in enumerate(events):
                drawn.append(gc.isenabled())
                if index % 3 == 0:
                    if cycles:
                        collected.append(cycles[-1]() is None)
                    cycle = Cycle()
                    cycle.itself = cycle
                    cycles.append(weakref.ref(cycle))
                    del cycle
                yield stored

        between: list[bool] = []

        def progress(_: int) -> None:
            between.append(gc.isenabled())

        events = interleaved()
        assert len(events) == projection.apply_many(watched(events))
        assert gc.isenabled() is (collector == "on")
        assert len(events) == projection.rebuild(watched(events), on_progress=progress)
        assert gc.isenabled() is (collector == "on")
        with pytest.raises(ProjectionError):
            projection.rebuild(watched([*lifecycle(S2), at(9, created(S2))]))
        assert gc.isenabled() is (collector == "on")
        assert drawn
        assert not any(drawn)
        # Cycles do not pile up over a long stream: each batch's are freed after it.
        assert collected
        assert all(collected) if collector == "on" else not any(collected)
        # on_progress runs after each batch is applied, still inside it.
        assert len(between) == 5
        assert not any(between)
        assert reference(events) == snapshot(migrated)
    finally:
        if was_enabled:
            gc.enable()
        else:
            gc.disable()


# --- processes: crash safety and concurrent projectors ------------------------------------

CRASH_EVENTS = 10_000


@functools.cache
def crash_stream() -> tuple[StoredEvalEvent, ...]:
    """The worker's stream, built once for every backend."""
    return tuple(long_stream(CRASH_EVENTS))


def _worker(database: Database, events: int, batch_size: int, *flags: str) -> subprocess.Popen[str]:
    env = {**os.environ, **database.env()}
    return subprocess.Popen(
        [sys.executable, str(WORKER), database.url, str(events), str(batch_size), *flags],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def _prefixes_matching(stream: Sequence[StoredEvalEvent], actual: Snapshot) -> list[int]:
    """Return every k such that the model of ``stream[:k]`` equals ``actual``."""
    model = Model()
    matching = []
    # Every checkpoint event of this stream adds a checkpoint: only prefixes
    # with the actual number of checkpoints can match, so snapshot only those.
    for k in range(len(stream) + 1):
        if len(model.checkpoints) == len(actual[1]) and model.snapshot() == actual:
            matching.append(k)
        if len(model.checkpoints) > len(actual[1]):
            break
        if k < len(stream):
            model.apply(stream[k])
    return matching


@pytest.mark.slow
def test_killed_projector_leaves_a_prefix(database: Database, migrated: sa.Engine) -> None:
    """A projector SIGKILLed mid-stream leaves a prefix; re-running the stream completes it."""
    stream = crash_stream()
    worker = _worker(database, CRASH_EVENTS, 7)
    try:
        assert worker.stdout is not None
        for line in worker.stdout:
            if line.startswith("consumed") and int(line.split()[1]) >= 700:
                break
        worker.send_signal(signal.SIGKILL)
    finally:
        worker.kill()
        worker.wait()
    assert -signal.SIGKILL == worker.returncode
    crashed = snapshot(migrated)
    prefixes = _prefixes_matching(stream, crashed)
    assert prefixes, "the killed projector left a projection that is no prefix of the stream"
    assert 700 - 7 <= prefixes[-1] < CRASH_EVENTS
    applied = SqlEvalProjection(migrated).apply_many(stream)
    assert CRASH_EVENTS - applied in prefixes
    assert reference(stream) == snapshot(migrated)


@pytest.mark.slow
def test_concurrent_projectors_apply_each_event_once(
    database: Database, migrated: sa.Engine
) -> None:
    """Two processes applying one stream at the same time apply every event exactly once."""
    events = 300
    workers = [_worker(database, events, size, "--wait") for size in (5, 8)]
    try:
        for worker in workers:
            assert worker.stdout is not None
            assert "ready\n" == worker.stdout.readline()
        for worker in workers:
            assert worker.stdin is not None
            worker.stdin.write("go\n")
            worker.stdin.flush()
        outputs = [worker.communicate(timeout=300)[0] for worker in workers]
    finally:
        for worker in workers:
            worker.kill()
            worker.wait()
    assert [0, 0] == [worker.returncode for worker in workers]
    counts = [int(out.splitlines()[-1].removeprefix("applied ")) for out in outputs]
    assert events == sum(counts)
    assert reference(long_stream(events)) == snapshot(migrated)


def test_concurrent_threads_apply_each_event_once(database: Database, migrated: sa.Engine) -> None:
    """Two threads on two Engines applying one stream at once apply every event exactly once."""
    stream = list(long_stream(300))
    engines = [database.engine(), database.engine()]
    start = threading.Barrier(2)
    counts: list[int | BaseException] = []

    def run(engine: sa.Engine, batch_size: int) -> None:
        try:
            start.wait(60)
            counts.append(SqlEvalProjection(engine, batch_size=batch_size).apply_many(stream))
        except BaseException as error:  # reported by the main thread
            counts.append(error)

    threads = [
        threading.Thread(target=run, args=(e, n)) for e, n in zip(engines, (3, 4), strict=True)
    ]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
    finally:
        for engine in engines:
            engine.dispose()
    assert all(isinstance(count, int) for count in counts), counts
    assert len(stream) == sum(c for c in counts if isinstance(c, int))
    assert reference(stream) == snapshot(migrated)
