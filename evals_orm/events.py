"""The six immutable events of a study's history (no persistence here)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from uuid import UUID

import attrs

from evals_orm.domain import (
    EPOCH,
    Checkpoint,
    CheckpointId,
    LongitudinalMetrics,
    PeriodType,
    StudyConfig,
    StudyId,
    _aware,
    _tags,
    _to_utc,
    uuid7,
)

__all__ = [
    "CheckpointRecorded",
    "EvalEvent",
    "StoredEvalEvent",
    "StudyCreated",
    "StudyPaused",
    "StudyResumed",
    "StudyStarted",
    "StudyStopped",
    "uuid7_time",
]


@attrs.frozen
class StudyCreated:
    """A study was defined; it starts out pending."""

    id: StudyId
    name: str
    period_type: PeriodType
    period_value: int | None = None
    config: StudyConfig = attrs.field(factory=StudyConfig)

    @property
    def study_id(self) -> StudyId:
        """Id of the study the event belongs to."""
        return self.id


@attrs.frozen
class StudyStarted:
    """A pending study started running."""

    id: StudyId

    @property
    def study_id(self) -> StudyId:
        """Id of the study the event belongs to."""
        return self.id


@attrs.frozen
class StudyPaused:
    """A running study was paused."""

    id: StudyId

    @property
    def study_id(self) -> StudyId:
        """Id of the study the event belongs to."""
        return self.id


@attrs.frozen
class StudyResumed:
    """A paused study runs again."""

    id: StudyId

    @property
    def study_id(self) -> StudyId:
        """Id of the study the event belongs to."""
        return self.id


@attrs.frozen
class StudyStopped:
    """A study was stopped for good."""

    id: StudyId

    @property
    def study_id(self) -> StudyId:
        """Id of the study the event belongs to."""
        return self.id


@attrs.frozen
class CheckpointRecorded:
    """Metrics of a study were recorded at ``timestamp``."""

    id: CheckpointId
    study_id: StudyId
    timestamp: datetime = attrs.field(converter=_to_utc, validator=_aware)
    metrics: LongitudinalMetrics = attrs.field(factory=LongitudinalMetrics)
    events_analyzed: int = 0
    sessions_included: tuple[str, ...] = attrs.field(default=(), converter=_tags)

    def to_checkpoint(self) -> Checkpoint:
        """Return the checkpoint this event records."""
        return Checkpoint(
            self.id,
            self.study_id,
            self.timestamp,
            self.metrics,
            self.events_analyzed,
            self.sessions_included,
        )


EvalEvent = (
    StudyCreated | StudyStarted | StudyPaused | StudyResumed | StudyStopped | CheckpointRecorded
)


# The last millisecond a datetime holds; a UUIDv7's 48 bits reach the year 10889.
_LAST_MS = (datetime.max.replace(tzinfo=timezone.utc) - EPOCH) // timedelta(milliseconds=1)


def uuid7_time(value: UUID) -> datetime:
    """Return the UTC instant (millisecond precision) carried by a UUIDv7.

    Raises ``ValueError`` for a time after the year 9999, which a UUIDv7 can
    carry but a ``datetime`` cannot.
    """
    millis = value.int >> 80
    if millis > _LAST_MS:
        raise ValueError(f"UUIDv7 {value} carries a time after the year 9999")
    return EPOCH + timedelta(milliseconds=millis)


def _check_uuid7(_instance: object, _attribute: object, value: UUID) -> None:
    if not isinstance(value, UUID):
        raise TypeError(f"event_id must be a uuid.UUID, got {type(value).__name__}")
    if value.version != 7 or value.variant != "specified in RFC 4122":
        raise ValueError(f"event_id must be a UUID of version 7, got {value}")


@attrs.frozen
class StoredEvalEvent:
    """An event stamped with its UUIDv7, as stored in the stream."""

    event_id: UUID = attrs.field(validator=_check_uuid7)
    event: EvalEvent

    @classmethod
    def new(cls, event: EvalEvent) -> StoredEvalEvent:
        """Stamp ``event`` with a fresh UUIDv7."""
        return cls(uuid7(), event)

    @property
    def occurred_at(self) -> datetime:
        """The UTC instant carried by ``event_id``, to the millisecond."""
        return uuid7_time(self.event_id)

    @property
    def study_id(self) -> StudyId:
        """Id of the study the event belongs to."""
        return self.event.study_id
