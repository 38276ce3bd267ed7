"""Domain types of longitudinal evaluation studies (no persistence here)."""

from __future__ import annotations

import enum
import secrets
from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta, timezone
from typing import Any, NewType
from uuid import UUID

import attrs
import uuid_utils.compat

__all__ = [
    "Checkpoint",
    "CheckpointId",
    "LongitudinalMetrics",
    "PeriodType",
    "Study",
    "StudyConfig",
    "StudyId",
    "StudyStatus",
    "TimePeriod",
    "ensure_utc",
    "uuid7",
    "uuid7_at",
]

StudyId = NewType("StudyId", UUID)
CheckpointId = NewType("CheckpointId", UUID)

EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_MILLISECOND = timedelta(milliseconds=1)


def uuid7() -> UUID:
    """Return a new time-ordered UUID (version 7) as a stdlib ``uuid.UUID``."""
    return uuid_utils.compat.uuid7()


def uuid7_at(moment: datetime, random_bits: int | None = None) -> UUID:
    """Return a UUIDv7 carrying ``moment`` (to the millisecond).

    For stamping history recorded elsewhere, and for reproducible streams:
    ``random_bits`` (74 bits) fills the rest of the id, in that order, so ids
    of one millisecond sort by it; it is drawn at random when omitted.
    """
    unix_ms = (ensure_utc(moment, "moment") - EPOCH) // _MILLISECOND
    if unix_ms < 0:
        raise ValueError(f"moment must not be before 1970, got {moment.isoformat()}")
    if random_bits is None:
        random_bits = secrets.randbits(74)
    elif not 0 <= random_bits < 1 << 74:
        raise ValueError(f"random_bits must be in [0, 2**74), got {random_bits}")
    rand_a, rand_b = random_bits >> 62, random_bits & ((1 << 62) - 1)
    return UUID(int=(unix_ms << 80) | (0x7 << 76) | (rand_a << 64) | (0b10 << 62) | rand_b)


def ensure_utc(value: datetime, name: str) -> datetime:
    """Return ``value`` in UTC; reject naive datetimes with a ``ValueError`` naming ``name``."""
    if not isinstance(value, datetime):
        raise TypeError(f"{name} must be a datetime, got {type(value).__name__}")
    offset = value.utcoffset()
    if offset is None:
        raise ValueError(f"{name} must be a timezone-aware datetime, got naive {value.isoformat()}")
    if offset or value.tzinfo is not timezone.utc:
        return value.astimezone(timezone.utc)
    return value


def _to_utc(value: datetime) -> datetime:
    # Naive values pass through to ``_aware``, which knows the field's name.
    if isinstance(value, datetime) and value.utcoffset() is not None:
        return ensure_utc(value, "datetime")
    return value


def _optional_to_utc(value: datetime | None) -> datetime | None:
    return None if value is None else _to_utc(value)


def _aware(_instance: object, attribute: attrs.Attribute[Any], value: datetime | None) -> None:
    if value is not None:
        ensure_utc(value, attribute.name)


class StudyStatus(str, enum.Enum):
    """Lifecycle status of a study."""

    PENDING = "pending"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"

    def __str__(self) -> str:
        return self.value


class PeriodType(str, enum.Enum):
    """Granularity of a study's checkpoints."""

    HOURLY = "hourly"
    DAILY = "daily"
    WEEKLY = "weekly"
    MONTHLY = "monthly"

    def __str__(self) -> str:
        return self.value


def _tags(value: Iterable[str]) -> tuple[str, ...]:
    if isinstance(value, str):
        raise TypeError("tags must be a sequence of str, not a str")
    return tuple(value)


def _metadata(value: Mapping[str, str]) -> dict[str, str]:
    return dict(value)


@attrs.frozen
class StudyConfig:
    """Free-form description, tags and metadata of a study."""

    description: str | None = None
    tags: tuple[str, ...] = attrs.field(default=(), converter=_tags)
    # A dict keeps the wire order of the keys; it is left out of the hash
    # (equal configs still hash equal) because dicts are unhashable.
    metadata: Mapping[str, str] = attrs.field(factory=dict, converter=_metadata, hash=False)


@attrs.frozen
class TimePeriod:
    """A half-open interval ``[start, end)`` of UTC time."""

    start: datetime = attrs.field(default=EPOCH, converter=_to_utc, validator=_aware)
    end: datetime = attrs.field(default=EPOCH, converter=_to_utc, validator=_aware)

    @property
    def duration(self) -> timedelta:
        """Length of the period."""
        return self.end - self.start

    def contains(self, instant: datetime) -> bool:
        """Tell whether ``start <= instant < end``."""
        return self.start <= ensure_utc(instant, "instant") < self.end


@attrs.frozen
class LongitudinalMetrics:
    """Metrics aggregated over one period of a study."""

    sessions_completed: int = 0
    session_success_rate: float = 0.0
    avg_session_duration: timedelta = timedelta(0)
    tasks_completed: int = 0
    first_attempt_success_rate: float = 0.0
    avg_iterations_to_success: float = 0.0
    agent_efficiency: float = 0.0
    tool_success_rate: float = 0.0
    self_correction_rate: float = 0.0
    swarm_coordination_overhead: float = 0.0
    parallelism_efficiency: float = 0.0
    learnings_applied: int = 0
    learning_effectiveness: float = 0.0
    total_tokens: int = 0
    total_cost: float = 0.0
    cost_per_successful_task: float = 0.0
    period: TimePeriod = attrs.field(factory=TimePeriod)


@attrs.frozen
class Study:
    """A study as the projection holds it."""

    id: StudyId
    name: str
    status: StudyStatus
    period_type: PeriodType
    period_value: int | None
    config: StudyConfig
    created_at: datetime = attrs.field(converter=_to_utc, validator=_aware)
    started_at: datetime | None = attrs.field(
        default=None, converter=_optional_to_utc, validator=_aware
    )
    stopped_at: datetime | None = attrs.field(
        default=None, converter=_optional_to_utc, validator=_aware
    )

    @property
    def is_active(self) -> bool:
        """Tell whether the study is running or paused."""
        return self.status in (StudyStatus.RUNNING, StudyStatus.PAUSED)

    @property
    def is_terminal(self) -> bool:
        """Tell whether the study is stopped for good."""
        return self.status is StudyStatus.STOPPED


@attrs.frozen
class Checkpoint:
    """Metrics of one study recorded at one instant."""

    id: CheckpointId
    study_id: StudyId
    timestamp: datetime = attrs.field(converter=_to_utc, validator=_aware)
    metrics: LongitudinalMetrics = attrs.field(factory=LongitudinalMetrics)
    events_analyzed: int = 0
    sessions_included: tuple[str, ...] = attrs.field(default=(), converter=_tags)
