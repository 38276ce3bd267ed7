"""A realistic, deterministic sample event stream for ``evals-orm demo``.

Every id and every number comes from a seeded generator and fixed dates, so
the stream is identical on every run: ingesting it twice adds nothing.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone

from evals_orm.domain import (
    CheckpointId,
    LongitudinalMetrics,
    PeriodType,
    StudyConfig,
    StudyId,
    TimePeriod,
    uuid7_at,
)
from evals_orm.events import (
    CheckpointRecorded,
    EvalEvent,
    StoredEvalEvent,
    StudyCreated,
    StudyPaused,
    StudyResumed,
    StudyStarted,
    StudyStopped,
)

__all__ = ["FEATURED_STUDY", "sample_events"]

SEED = 20250303
START = datetime(2025, 3, 3, 9, 0, tzinfo=timezone.utc)
# The study whose metrics the demo charts: the one with the longest history.
FEATURED_STUDY = "swarm-coordination"

_PERIOD_LENGTH = {
    PeriodType.HOURLY: timedelta(hours=1),
    PeriodType.DAILY: timedelta(days=1),
    PeriodType.WEEKLY: timedelta(weeks=1),
    PeriodType.MONTHLY: timedelta(days=30),
}


class _Study:
    """Writes the events of one study, each stamped at a given instant."""

    def __init__(
        self,
        rng: random.Random,
        created: datetime,
        *,
        name: str,
        period_type: PeriodType,
        period_value: int,
        config: StudyConfig,
    ) -> None:
        self.rng = rng
        self.id = StudyId(uuid7_at(created, rng.getrandbits(74)))
        self.period = _PERIOD_LENGTH[period_type] * period_value
        self.events: list[StoredEvalEvent] = []
        self._emit(created, StudyCreated(self.id, name, period_type, period_value, config))

    def _emit(self, moment: datetime, event: EvalEvent) -> None:
        self.events.append(StoredEvalEvent(uuid7_at(moment, self.rng.getrandbits(74)), event))

    def start(self, moment: datetime) -> None:
        self._emit(moment, StudyStarted(self.id))

    def pause(self, moment: datetime) -> None:
        self._emit(moment, StudyPaused(self.id))

    def resume(self, moment: datetime) -> None:
        self._emit(moment, StudyResumed(self.id))

    def stop(self, moment: datetime) -> None:
        self._emit(moment, StudyStopped(self.id))

    def checkpoints(
        self,
        first_end: datetime,
        count: int,
        *,
        success: tuple[float, float],
        cost: tuple[float, float],
    ) -> datetime:
        """Record ``count`` checkpoints, one per period; return the last period's end.

        The session success rate moves from ``success[0]`` to ``success[1]``
        and the cost per session from ``cost[0]`` to ``cost[1]``, with some
        noise; the other metrics follow the success rate.
        """
        rng = self.rng
        end = first_end
        for index in range(count):
            progress = index / max(count - 1, 1)
            sessions = 24 + round(8 * progress) + rng.randint(-2, 2)
            success_rate = _rate(success[0] + (success[1] - success[0]) * progress, rng, 0.02)
            tasks = sessions * rng.randint(3, 5)
            successful = max(round(tasks * success_rate), 1)
            per_session = cost[0] + (cost[1] - cost[0]) * progress
            total_cost = round(sessions * per_session * rng.uniform(0.95, 1.05), 2)
            metrics = LongitudinalMetrics(
                sessions_completed=sessions,
                session_success_rate=success_rate,
                avg_session_duration=timedelta(
                    seconds=round(900 - 300 * success_rate + rng.uniform(-40, 40), 3)
                ),
                tasks_completed=tasks,
                first_attempt_success_rate=_rate(success_rate - 0.18, rng, 0.03),
                avg_iterations_to_success=round(3.4 - 2 * success_rate + rng.uniform(-0.1, 0.1), 2),
                agent_efficiency=_rate(success_rate - 0.05, rng, 0.04),
                tool_success_rate=_rate(0.7 + 0.25 * success_rate, rng, 0.01),
                self_correction_rate=_rate(success_rate / 2, rng, 0.05),
                swarm_coordination_overhead=_rate(0.35 - 0.25 * success_rate, rng, 0.02),
                parallelism_efficiency=_rate(success_rate, rng, 0.04),
                learnings_applied=round(index * 1.5) + rng.randint(0, 3),
                learning_effectiveness=_rate(success_rate - 0.2, rng, 0.05),
                total_tokens=sessions * rng.randint(38_000, 52_000),
                total_cost=total_cost,
                cost_per_successful_task=round(total_cost / successful, 4),
                period=TimePeriod(end - self.period, end),
            )
            self._emit(
                end + timedelta(minutes=5),
                CheckpointRecorded(
                    CheckpointId(uuid7_at(end, rng.getrandbits(74))),
                    self.id,
                    end,
                    metrics,
                    events_analyzed=sessions * rng.randint(90, 220),
                    sessions_included=tuple(
                        f"session-{rng.getrandbits(48):012x}" for _ in range(sessions)
                    ),
                ),
            )
            end += self.period
        return end - self.period


def _rate(value: float, rng: random.Random, noise: float) -> float:
    return round(min(max(value + rng.uniform(-noise, noise), 0.0), 1.0), 4)


def _studies(rng: random.Random) -> Iterator[_Study]:
    day = timedelta(days=1)
    hour = timedelta(hours=1)

    baseline = _Study(
        rng,
        START,
        name="baseline-agent",
        period_type=PeriodType.WEEKLY,
        period_value=1,
        config=StudyConfig("Single agent on the regression suite", ("baseline", "regression")),
    )
    baseline.start(START + hour)
    last = baseline.checkpoints(START + 7 * day, 8, success=(0.62, 0.81), cost=(1.1, 0.8))
    baseline.stop(last + hour)
    yield baseline

    swarm = _Study(
        rng,
        START + 7 * day,
        name=FEATURED_STUDY,
        period_type=PeriodType.DAILY,
        period_value=1,
        config=StudyConfig(
            "Five-agent swarm with a shared planner",
            ("swarm", "planner"),
            {"model": "agent-large", "agents": "5"},
        ),
    )
    swarm.start(START + 7 * day + hour)
    last = swarm.checkpoints(START + 8 * day, 10, success=(0.58, 0.72), cost=(1.45, 1.2))
    swarm.pause(last + 2 * hour)
    swarm.resume(last + 3 * day)
    swarm.checkpoints(last + 4 * day, 10, success=(0.75, 0.9), cost=(1.1, 0.7))
    yield swarm

    transfer = _Study(
        rng,
        START + 3 * day,
        name="learning-transfer",
        period_type=PeriodType.WEEKLY,
        period_value=2,
        config=StudyConfig("Reuse of learnings across repositories", ("learning",)),
    )
    transfer.start(START + 4 * day)
    last = transfer.checkpoints(START + 18 * day, 3, success=(0.66, 0.79), cost=(0.95, 0.85))
    transfer.pause(last + day)
    yield transfer

    yield _Study(
        rng,
        START + 40 * day,
        name="cost-reduction-q2",
        period_type=PeriodType.MONTHLY,
        period_value=1,
        config=StudyConfig("Cheaper models for routine tasks", ("cost",)),
    )


def sample_events() -> list[StoredEvalEvent]:
    """Return the demo stream: four studies over seven weeks, in stream order."""
    rng = random.Random(SEED)
    events = [stored for study in _studies(rng) for stored in study.events]
    return sorted(events, key=lambda stored: stored.event_id)
