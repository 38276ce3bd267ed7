"""A deterministic, realistic event stream for the benchmarks, generated lazily.

``Shape(studies, checkpoints_per_study, seed)`` describes the stream;
``events(shape)`` yields it one ``StoredEvalEvent`` at a time, so memory
stays proportional to the number of studies, never to the number of events.

The synthetic clock ticks once an hour from 2024-01-01. Studies start
staggered over the first two days; at each tick every live study emits its
next step (created + started, one checkpoint, sometimes a pause or a resume,
at the end a stop for most). Event ids are UUIDv7 built from that clock, with
the millisecond advancing by one per event, so ids are unique, increase along
the stream and are the same on every run. With ``nanoseconds``, checkpoints
are stamped as the Rust service stamps them (chrono's ``Utc::now()``): the
timestamps, the period and the average session duration carry a 9-digit
fraction.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from uuid import UUID

import attrs

from evals_orm import (
    CheckpointId,
    CheckpointRecorded,
    EvalEvent,
    LongitudinalMetrics,
    NanoDatetime,
    PeriodType,
    StoredEvalEvent,
    StudyConfig,
    StudyCreated,
    StudyId,
    StudyPaused,
    StudyResumed,
    StudyStarted,
    StudyStopped,
    TimePeriod,
    uuid7_at,
)
from evals_orm.domain import duration_of, with_nanosecond

__all__ = ["CLOCK_START", "TICK", "Shape", "events", "uuid_v4"]

CLOCK_START = datetime(2024, 1, 1, tzinfo=timezone.utc)
TICK = timedelta(hours=1)
_MILLISECOND = timedelta(milliseconds=1)
_START_SPREAD_TICKS = 48
_PERIODS = (PeriodType.HOURLY, PeriodType.DAILY, PeriodType.WEEKLY, PeriodType.MONTHLY)
_TAGS = ("eval", "nightly", "regression", "swarm", "baseline", "canary")


def uuid_v4(rand: int) -> UUID:
    """Return the UUIDv4 made of 122 random bits ``rand``."""
    value = rand & ~(0xF << 76) & ~(0b11 << 62)
    return UUID(int=value | (0x4 << 76) | (0b10 << 62))


@attrs.frozen
class Shape:
    """``studies`` studies, each recording ``checkpoints_per_study`` checkpoints."""

    studies: int
    checkpoints_per_study: int
    seed: int = 2024
    # Offsets the study numbers, so two streams of one seed can share a database.
    first_study: int = 0
    # Stamp checkpoints to the nanosecond, as the Rust service does.
    nanoseconds: bool = False

    @property
    def events(self) -> int:
        """Return the exact number of events the stream holds."""
        lifecycle = sum(_plan(self, index).event_count for index in range(self.studies))
        return lifecycle + self.checkpoints

    @property
    def checkpoints(self) -> int:
        """Return the number of checkpoints the stream records."""
        return self.studies * self.checkpoints_per_study


@attrs.frozen
class _Plan:
    """When a study starts and which lifecycle events it emits around its checkpoints."""

    start_tick: int
    pause_after: int | None  # checkpoint number after which the study pauses
    resume_after: int | None  # ... and after which it resumes (None: stays paused)
    stops: bool
    redundant_start: bool  # a StudyStarted while running: a no-op that is still applied

    @property
    def event_count(self) -> int:
        extra = sum(x is not None for x in (self.pause_after, self.resume_after))
        return 2 + extra + int(self.stops) + int(self.redundant_start)


def _plan(shape: Shape, index: int) -> _Plan:
    rng = random.Random(f"{shape.seed}/plan/{shape.first_study + index}")
    count = shape.checkpoints_per_study
    start_tick = rng.randrange(_START_SPREAD_TICKS)
    roll = rng.random()
    pause_after = resume_after = None
    if count >= 2 and roll < 0.45:
        pause_after = rng.randrange(count // 2)
        if roll < 0.35:
            resume_after = pause_after + 1
    # Most studies end stopped; some stay running, some stay paused.
    left_paused = pause_after is not None and resume_after is None
    stops = rng.random() < (0.3 if left_paused else 0.6)
    return _Plan(start_tick, pause_after, resume_after, stops, rng.random() < 0.05)


@attrs.define
class _Study:
    """The evolving state of one study while its events are generated."""

    number: int
    id: StudyId
    plan: _Plan
    rng: random.Random
    recorded: int = 0
    sessions: int = 0
    tasks: int = 0
    tokens: int = 0
    cost: float = 0.0
    learnings: int = 0
    success_rate: float = 0.7


class _Clock:
    """Millisecond clock of the event ids: one tick an hour, +1 ms per event."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.now = CLOCK_START

    def at_tick(self, tick: int) -> None:
        self.now = max(self.now, CLOCK_START + tick * TICK)

    def stamp(self, event: EvalEvent) -> StoredEvalEvent:
        self.now += _MILLISECOND
        return StoredEvalEvent(uuid7_at(self.now, self.rng.getrandbits(74)), event)


def events(shape: Shape) -> Iterator[StoredEvalEvent]:
    """Yield the stream of ``shape`` lazily, in event-id order."""
    clock = _Clock(random.Random(f"{shape.seed}/clock/{shape.first_study}"))
    waiting: dict[int, list[_Study]] = {}
    for index in range(shape.studies):
        number = shape.first_study + index
        rng = random.Random(f"{shape.seed}/study/{number}")
        study = _Study(number, StudyId(uuid_v4(rng.getrandbits(128))), _plan(shape, index), rng)
        waiting.setdefault(study.plan.start_tick, []).append(study)
    live: list[_Study] = []
    tick = 0
    while waiting or live:
        clock.at_tick(tick)
        instant = CLOCK_START + tick * TICK
        still_live: list[_Study] = []
        for study in live:
            yield from _step(shape, study, _stamped(shape, study, instant), clock)
            if study.recorded < shape.checkpoints_per_study:
                still_live.append(study)
            elif study.plan.stops:
                yield clock.stamp(StudyStopped(study.id))
        for study in waiting.pop(tick, ()):
            yield clock.stamp(_created(study))
            yield clock.stamp(StudyStarted(study.id))
            if shape.checkpoints_per_study:
                still_live.append(study)
            elif study.plan.stops:
                yield clock.stamp(StudyStopped(study.id))
        live = still_live
        tick += 1


def _created(study: _Study) -> StudyCreated:
    rng = study.rng
    period_type = _PERIODS[study.number % len(_PERIODS)]
    config = StudyConfig()
    if study.number % 3:
        config = StudyConfig(
            description=f"Longitudinal evaluation #{study.number} of the agent swarm",
            tags=rng.sample(_TAGS, rng.randrange(1, 4)),
            metadata={"team": f"team-{study.number % 7}", "model": "m-large"}
            if study.number % 2
            else {},
        )
    return StudyCreated(
        StudyId(study.id),
        f"study-{study.number:06d}",
        period_type,
        rng.randrange(1, 5) if study.number % 5 else None,
        config,
    )


def _step(
    shape: Shape, study: _Study, instant: datetime, clock: _Clock
) -> Iterator[StoredEvalEvent]:
    plan = study.plan
    yield clock.stamp(_checkpoint(study, instant, clock))
    study.recorded += 1
    done = study.recorded - 1
    if done == 0 and plan.redundant_start:
        yield clock.stamp(StudyStarted(study.id))
    if done == plan.pause_after:
        yield clock.stamp(StudyPaused(study.id))
    if done == plan.resume_after:
        yield clock.stamp(StudyResumed(study.id))


def _stamped(shape: Shape, study: _Study, instant: datetime) -> datetime:
    """Return ``instant``, or with ``shape.nanoseconds`` a moment in the second after it."""
    if not shape.nanoseconds:
        return instant
    nanos = study.rng.getrandbits(30) % 1_000_000_000
    return with_nanosecond(instant + timedelta(microseconds=nanos // 1000), nanos % 1000)


def _earlier(instant: datetime, delta: timedelta) -> datetime:
    """``instant - delta``, nanoseconds kept (datetime arithmetic drops them)."""
    if isinstance(instant, NanoDatetime):
        return with_nanosecond(instant - delta, instant.nanosecond)
    return instant - delta


def _checkpoint(study: _Study, instant: datetime, clock: _Clock) -> CheckpointRecorded:
    # Few random draws per checkpoint: generating must stay cheap next to storing.
    draw = study.rng.random
    sessions = 3 + int(draw() * 37)
    tasks = sessions * (2 + int(draw() * 4))
    tokens = tasks * (2_000 + int(draw() * 38_000))
    cost = tokens * 0.000_003
    spread = draw()
    rate = min(0.99, max(0.05, study.success_rate + (spread - 0.45) * 0.04))
    study.success_rate = rate
    succeeded = max(1, round(tasks * rate))
    study.sessions += sessions
    study.tasks += tasks
    study.tokens += tokens
    study.cost += cost
    study.learnings += sessions % 4
    duration = timedelta(microseconds=int(60e6 + spread * 3_540e6))
    if isinstance(instant, NanoDatetime):
        duration = duration_of(*divmod(int(60e9 + spread * 3_540e9), 1_000_000_000))
    metrics = LongitudinalMetrics(
        sessions_completed=study.sessions,
        session_success_rate=rate,
        avg_session_duration=duration,
        tasks_completed=study.tasks,
        first_attempt_success_rate=rate * (0.6 + 0.35 * spread),
        avg_iterations_to_success=1.0 + 3.0 * (1.0 - rate),
        agent_efficiency=0.4 + 0.58 * spread,
        tool_success_rate=0.8 + 0.2 * rate,
        self_correction_rate=0.3 * spread,
        swarm_coordination_overhead=0.01 + 0.24 * (1.0 - spread),
        parallelism_efficiency=0.5 + 0.45 * rate * spread,
        learnings_applied=study.learnings,
        learning_effectiveness=spread * rate,
        total_tokens=study.tokens,
        total_cost=study.cost,
        cost_per_successful_task=cost / succeeded,
        period=TimePeriod(_earlier(instant, TICK), instant),
    )
    first_session = study.sessions - sessions
    return CheckpointRecorded(
        CheckpointId(uuid7_at(clock.now, study.rng.getrandbits(74))),
        study.id,
        instant,
        metrics,
        events_analyzed=tasks * (20 + int(spread * 100)),
        sessions_included=[
            f"s-{study.number}-{n}" for n in range(first_session, first_session + min(sessions, 5))
        ],
    )
