"""The six immutable events of a study's history (no persistence here)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any
from uuid import UUID

import attrs

from evals_orm.domain import (
    EPOCH,
    U32_MAX,
    Checkpoint,
    CheckpointId,
    FieldError,
    LongitudinalMetrics,
    PeriodType,
    StudyConfig,
    StudyId,
    describe,
    require_aware,
    require_instance,
    require_text,
    require_texts,
    require_u64,
    to_texts,
    to_utc,
    unchecked_constructor,
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


def _require_u32(_instance: object, field: attrs.Attribute[Any], value: int | None) -> None:
    if value is None or (type(value) is int and 0 <= value <= U32_MAX):
        return
    raise FieldError(
        field.name, f"must be null or an integer in 0..{U32_MAX}, got {describe(value)}"
    )


_require_uuid = require_instance(UUID)


@attrs.frozen
class StudyCreated:
    """A study was defined; it starts out pending."""

    id: StudyId = attrs.field(converter=StudyId, validator=_require_uuid)
    name: str = attrs.field(validator=require_text)
    period_type: PeriodType = attrs.field(validator=require_instance(PeriodType))
    period_value: int | None = attrs.field(default=None, validator=_require_u32)
    config: StudyConfig = attrs.field(factory=StudyConfig, validator=require_instance(StudyConfig))

    @property
    def study_id(self) -> StudyId:
        """Id of the study the event belongs to."""
        return self.id


@attrs.frozen
class _Lifecycle:
    """A study changed its status; ``id`` is the study's."""

    id: StudyId = attrs.field(converter=StudyId, validator=_require_uuid)

    @property
    def study_id(self) -> StudyId:
        """Id of the study the event belongs to."""
        return self.id


@attrs.frozen
class StudyStarted(_Lifecycle):
    """A pending study started running."""


@attrs.frozen
class StudyPaused(_Lifecycle):
    """A running study was paused."""


@attrs.frozen
class StudyResumed(_Lifecycle):
    """A paused study runs again."""


@attrs.frozen
class StudyStopped(_Lifecycle):
    """A study was stopped for good."""


# This event's fields are valid, so they make a valid checkpoint as they are.
_checkpoint = unchecked_constructor(Checkpoint)


@attrs.frozen
class CheckpointRecorded:
    """Metrics of a study were recorded at ``timestamp``."""

    id: CheckpointId = attrs.field(converter=CheckpointId, validator=_require_uuid)
    study_id: StudyId = attrs.field(converter=StudyId, validator=_require_uuid)
    timestamp: datetime = attrs.field(converter=to_utc, validator=require_aware)
    metrics: LongitudinalMetrics = attrs.field(
        factory=LongitudinalMetrics, validator=require_instance(LongitudinalMetrics)
    )
    events_analyzed: int = attrs.field(default=0, validator=require_u64)
    sessions_included: tuple[str, ...] = attrs.field(
        default=(), converter=to_texts, validator=require_texts
    )

    def to_checkpoint(self) -> Checkpoint:
        """Return the checkpoint this event records."""
        return _checkpoint(
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


def _check_uuid7(_instance: object, field: attrs.Attribute[Any], value: UUID) -> None:
    if not isinstance(value, UUID):
        raise FieldError(field.name, f"expected UUID, got {describe(value)}")
    # The version nibble and the RFC 4122 variant bits, read off the integer
    # (UUID's version/variant properties cost more than the whole check).
    if (value.int >> 76) & 0xF != 7 or (value.int >> 62) & 0b11 != 0b10:
        raise FieldError(field.name, f"must be a UUID of version 7, got {value}")


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
