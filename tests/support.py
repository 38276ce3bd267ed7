"""Shared test helpers: ORM row factories, seeding and raw reads."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta, timezone
from typing import Any
from uuid import UUID

import sqlalchemy as sa
from sqlalchemy.orm import Session

from evals_orm.domain import (
    LongitudinalMetrics,
    PeriodType,
    StudyConfig,
    StudyStatus,
    TimePeriod,
    uuid7,
)
from evals_orm.models import CheckpointRow, StudyRow

__all__ = [
    "HEAD",
    "OUR_TABLES",
    "T0",
    "UTC",
    "checkpoint_row",
    "metrics",
    "raw_rows",
    "seed",
    "study_row",
]

# The package's newest migration and the tables its migrations create.
HEAD = "evals_orm_0002"
OUR_TABLES = {
    "studies",
    "checkpoints",
    "eval_events",
    "eval_tracking",
    "eval_rebuild_studies",
    "eval_rebuild_checkpoints",
}
UTC = timezone.utc
T0 = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)


def metrics(**changes: Any) -> LongitudinalMetrics:
    """Return metrics with every field set to a distinctive non-default value."""
    values: dict[str, Any] = {
        "sessions_completed": 12,
        "session_success_rate": 0.1 + 0.2,
        "avg_session_duration": timedelta(seconds=90, microseconds=123456),
        "tasks_completed": 2**64 - 1,
        "first_attempt_success_rate": 1e-300,
        "avg_iterations_to_success": 2.5,
        "agent_efficiency": 0.75,
        "tool_success_rate": 1.0,
        "self_correction_rate": 1 / 3,
        "swarm_coordination_overhead": 123456789.125,
        "parallelism_efficiency": 5e-324,
        "learnings_applied": 7,
        "learning_effectiveness": 0.5,
        "total_tokens": 2**53 + 1,
        "total_cost": 1.7976931348623157e308,
        "cost_per_successful_task": 0.01,
        "period": TimePeriod(T0, T0 + timedelta(days=7)),
    }
    values.update(changes)
    return LongitudinalMetrics(**values)


def study_row(
    *,
    id: UUID | None = None,
    name: str = "study",
    status: StudyStatus = StudyStatus.PENDING,
    created_at: datetime = T0,
    config: StudyConfig | None = None,
    period_type: PeriodType = PeriodType.WEEKLY,
    period_value: int | None = 2,
    started_at: datetime | None = None,
    stopped_at: datetime | None = None,
) -> StudyRow:
    """Return a ``StudyRow``; unspecified fields get plausible values."""
    return StudyRow(
        id=id or uuid7(),
        name=name,
        status=status,
        period_type=period_type,
        period_value=period_value,
        config=config or StudyConfig(),
        created_at=created_at,
        started_at=started_at,
        stopped_at=stopped_at,
        last_event_id=uuid7(),
    )


def checkpoint_row(
    study_id: UUID,
    timestamp: datetime = T0,
    *,
    id: UUID | None = None,
    events_analyzed: int = 10,
    sessions_included: tuple[str, ...] = ("s1", "s2"),
    metrics_value: LongitudinalMetrics | None = None,
) -> CheckpointRow:
    """Return a ``CheckpointRow`` of ``study_id`` at ``timestamp``."""
    return CheckpointRow(
        id=id or uuid7(),
        study_id=study_id,
        timestamp=timestamp,
        metrics=metrics_value or LongitudinalMetrics(),
        events_analyzed=events_analyzed,
        sessions_included=sessions_included,
    )


def seed(engine: sa.Engine, rows: Iterable[object]) -> None:
    """Insert ORM rows in one committed Session; the rows stay readable afterwards."""
    with Session(engine, expire_on_commit=False) as session:
        session.add_all(list(rows))
        session.commit()


def raw_rows(
    engine: sa.Engine, sql: str, params: Mapping[str, Any] | None = None
) -> list[tuple[Any, ...]]:
    """Run raw SQL (no column types) and return its rows as tuples."""
    with engine.connect() as connection:
        return [tuple(row) for row in connection.execute(sa.text(sql), dict(params or {}))]
