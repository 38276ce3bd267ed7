"""Domain types of longitudinal evaluation studies (no persistence here)."""

from __future__ import annotations

import enum
import math
import secrets
from collections.abc import Callable, Iterable, Mapping
from datetime import date, datetime, timedelta, timezone
from datetime import tzinfo as tzinfo_type
from typing import Any, NewType, SupportsIndex, TypeVar
from uuid import UUID, SafeUUID

import attrs
import uuid_utils.compat

__all__ = [
    "U32_MAX",
    "U64_MAX",
    "Checkpoint",
    "CheckpointId",
    "FieldError",
    "LongitudinalMetrics",
    "NanoDatetime",
    "NanoTimedelta",
    "PeriodType",
    "Study",
    "StudyConfig",
    "StudyId",
    "StudyStatus",
    "TimePeriod",
    "describe",
    "duration_of",
    "ensure_utc",
    "require_aware",
    "require_instance",
    "require_text",
    "require_texts",
    "require_u64",
    "to_texts",
    "to_utc",
    "unchecked_constructor",
    "unchecked_uuid",
    "uuid7",
    "uuid7_at",
    "with_nanosecond",
]

A = TypeVar("A", bound=attrs.AttrsInstance)

StudyId = NewType("StudyId", UUID)
CheckpointId = NewType("CheckpointId", UUID)

EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_MILLISECOND = timedelta(milliseconds=1)
_UTC = timezone.utc
_NANOS_PER_MICRO = 1000
_isfinite = math.isfinite
U32_MAX = 2**32 - 1
U64_MAX = 2**64 - 1


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


_new_uuid = object.__new__
_set_uuid_int = UUID.__dict__["int"].__set__
_set_uuid_is_safe = UUID.__dict__["is_safe"].__set__
_UUID_SAFETY_UNKNOWN = SafeUUID.unknown  # an enum member lookup costs a call


def unchecked_uuid(text: str) -> UUID:
    """Return the UUID written as ``text`` (hex digits, hyphens anywhere), unchecked.

    For UUIDs the package wrote itself: as ``uuid_utils.compat`` builds
    stdlib UUIDs, the slots are filled directly, at half the cost of
    ``UUID(text)``, which validates and normalises the text first.
    """
    uuid = _new_uuid(UUID)
    _set_uuid_int(uuid, int(text.replace("-", ""), 16))
    _set_uuid_is_safe(uuid, _UUID_SAFETY_UNKNOWN)
    return uuid


def ensure_utc(value: datetime, name: str) -> datetime:
    """Return ``value`` in UTC; reject naive datetimes with a ``ValueError`` naming ``name``."""
    if not isinstance(value, datetime):
        raise TypeError(f"{name} must be a datetime, got {type(value).__name__}")
    if value.tzinfo is timezone.utc:  # the usual case, answered without a call
        return value
    offset = value.utcoffset()
    if offset is None:
        raise ValueError(f"{name} must be a timezone-aware datetime, got naive {value.isoformat()}")
    if offset or value.tzinfo is not timezone.utc:
        return value.astimezone(timezone.utc)
    return value


class FieldError(ValueError):
    """A value a field cannot hold; the message starts with the field's name."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}" if field else reason)
        self.field = field
        self.reason = reason


_KINDS = {
    type(None): "null",
    bool: "boolean",
    int: "integer",
    float: "float",
    str: "string",
    list: "array",
    dict: "object",
}


def describe(value: object) -> str:
    """Name a value in an error message: its JSON kind, and the value if it is short."""
    kind = _KINDS.get(type(value), type(value).__name__)
    if isinstance(value, float) and value.is_integer() and abs(value) >= 2**63:
        # The JSON reader gives an integer literal beyond 64 bits as a float:
        # say "number" (JSON's kind) rather than calling ``10**30`` a float.
        kind = "number"
    if value is None or isinstance(value, (dict, list, tuple)):
        return kind
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{kind} {text}"


def _nanosecond_of(value: object) -> int:
    return getattr(value, "nanosecond", 0)


def _check_nanosecond(nanosecond: int) -> None:
    if not 0 <= nanosecond < _NANOS_PER_MICRO:
        raise ValueError(f"nanosecond must be in 0..999, got {nanosecond}")


class NanoDatetime(datetime):
    """A ``datetime`` that also holds the nanoseconds below its microsecond.

    chrono (the original's clock) stamps events to the nanosecond; Python's
    ``datetime`` holds microseconds. ``nanosecond`` (0..999) carries the
    rest, so a 9-digit fraction read from the wire is written back
    unchanged. Equality, order and hash count the nanoseconds (a plain
    ``datetime`` has 0); arithmetic, ``replace`` and ``astimezone`` work on
    the microseconds and return plain datetimes.
    """

    # datetime's C methods (replace, arithmetic) build instances of the
    # subclass without calling __new__: the slot may be unset, meaning 0.
    __slots__ = ("_nanosecond",)
    _nanosecond: int

    @property
    def nanosecond(self) -> int:
        """Nanoseconds after ``microsecond``, 0..999."""
        return getattr(self, "_nanosecond", 0)

    def __new__(  # noqa: PLR0917 - datetime's own fields plus one
        cls,
        year: int,
        month: int,
        day: int,
        hour: int = 0,
        minute: int = 0,
        second: int = 0,
        microsecond: int = 0,
        tzinfo: tzinfo_type | None = None,
        *,
        nanosecond: int = 0,
    ) -> NanoDatetime:
        """Build the datetime, ``nanosecond`` (0..999) after ``microsecond``."""
        _check_nanosecond(nanosecond)
        self = super().__new__(cls, year, month, day, hour, minute, second, microsecond, tzinfo)
        self._nanosecond = nanosecond
        return self

    def __reduce_ex__(self, protocol: SupportsIndex) -> tuple[Any, ...]:
        fields = (self.year, self.month, self.day, self.hour, self.minute, self.second)
        return (_nano_datetime, (*fields, self.microsecond, self.tzinfo, self.nanosecond))

    def astimezone(self, tz: tzinfo_type | None = None) -> NanoDatetime:
        """Return the same instant in ``tz``, nanoseconds kept."""
        return with_nanosecond(datetime.astimezone(self, tz), self.nanosecond)

    def __hash__(self) -> int:
        plain = datetime.__hash__(self)
        return hash((plain, self.nanosecond)) if self.nanosecond else plain

    def _compare(self, other: object) -> int | None:
        if not isinstance(other, datetime):
            return None
        if datetime.__eq__(self, other):
            return self.nanosecond - _nanosecond_of(other)
        return -1 if datetime.__lt__(self, other) else 1

    def __eq__(self, other: object) -> bool:
        order = self._compare(other)
        return NotImplemented if order is None else order == 0

    def __ne__(self, other: object) -> bool:
        order = self._compare(other)
        return NotImplemented if order is None else order != 0

    def __lt__(self, other: date) -> bool:
        order = self._compare(other)
        return NotImplemented if order is None else order < 0

    def __le__(self, other: date) -> bool:
        order = self._compare(other)
        return NotImplemented if order is None else order <= 0

    def __gt__(self, other: date) -> bool:
        order = self._compare(other)
        return NotImplemented if order is None else order > 0

    def __ge__(self, other: date) -> bool:
        order = self._compare(other)
        return NotImplemented if order is None else order >= 0


_new_datetime = datetime.__new__
_datetime_state = datetime.__reduce__
_set_nanosecond = NanoDatetime.__dict__["_nanosecond"].__set__


def with_nanosecond(moment: datetime, nanosecond: int) -> NanoDatetime:
    """Return ``moment`` (its fields and time zone) with ``nanosecond`` (0..999) added."""
    _check_nanosecond(nanosecond)
    # datetime's own constructor on the subclass, from the fields packed as
    # its pickle state, and the slot set directly: several times faster than
    # ``timetuple()`` and NanoDatetime's __new__.
    value = _new_datetime(NanoDatetime, *_datetime_state(moment)[1])
    _set_nanosecond(value, nanosecond)
    return value


def as_datetime(moment: datetime) -> datetime:
    """Return ``moment`` as a plain ``datetime`` (a ``NanoDatetime`` without its nanoseconds)."""
    if type(moment) is datetime:
        return moment
    return datetime(*_datetime_state(moment)[1])


def _nano_datetime(  # noqa: PLR0917 - NanoDatetime's fields, for pickle and copy
    year: int,
    month: int,
    day: int,
    hour: int,
    minute: int,
    second: int,
    microsecond: int,
    tz: tzinfo_type | None,
    nanosecond: int,
) -> NanoDatetime:
    return NanoDatetime(
        year, month, day, hour, minute, second, microsecond, tz, nanosecond=nanosecond
    )


class NanoTimedelta(timedelta):
    """A ``timedelta`` that also holds the nanoseconds below its microsecond.

    The counterpart of ``NanoDatetime`` for chrono's durations:
    ``nanosecond`` (0..999) is added to the (normalised, non-negative)
    ``microseconds``, so ``[seconds, nanoseconds]`` read from the wire is
    written back unchanged. Equality, order and hash count the nanoseconds;
    arithmetic works on the microseconds and returns plain timedeltas.
    """

    # datetime's C methods (replace, arithmetic) build instances of the
    # subclass without calling __new__: the slot may be unset, meaning 0.
    __slots__ = ("_nanosecond",)
    _nanosecond: int

    @property
    def nanosecond(self) -> int:
        """Nanoseconds after ``microsecond``, 0..999."""
        return getattr(self, "_nanosecond", 0)

    def __new__(
        cls, seconds: int = 0, microseconds: int = 0, *, nanosecond: int = 0
    ) -> NanoTimedelta:
        """Build ``seconds`` + ``microseconds`` + ``nanosecond`` (0..999) nanoseconds."""
        _check_nanosecond(nanosecond)
        self = super().__new__(cls, 0, seconds, microseconds)
        self._nanosecond = nanosecond
        return self

    def __reduce_ex__(self, protocol: SupportsIndex) -> tuple[Any, ...]:
        seconds = self.days * 86_400 + self.seconds
        return (type(self), (seconds, self.microseconds), {"nanosecond": self.nanosecond})

    def __setstate__(self, state: dict[str, int]) -> None:
        self._nanosecond = state["nanosecond"]

    def __hash__(self) -> int:
        plain = timedelta.__hash__(self)
        return hash((plain, self.nanosecond)) if self.nanosecond else plain

    def _compare(self, other: object) -> int | None:
        if not isinstance(other, timedelta):
            return None
        if timedelta.__eq__(self, other):
            return self.nanosecond - _nanosecond_of(other)
        return -1 if timedelta.__lt__(self, other) else 1

    def __eq__(self, other: object) -> bool:
        order = self._compare(other)
        return NotImplemented if order is None else order == 0

    def __ne__(self, other: object) -> bool:
        order = self._compare(other)
        return NotImplemented if order is None else order != 0

    def __lt__(self, other: timedelta) -> bool:
        order = self._compare(other)
        return NotImplemented if order is None else order < 0

    def __le__(self, other: timedelta) -> bool:
        order = self._compare(other)
        return NotImplemented if order is None else order <= 0

    def __gt__(self, other: timedelta) -> bool:
        order = self._compare(other)
        return NotImplemented if order is None else order > 0

    def __ge__(self, other: timedelta) -> bool:
        order = self._compare(other)
        return NotImplemented if order is None else order >= 0


_new_timedelta = timedelta.__new__
_set_timedelta_nanosecond = NanoTimedelta.__dict__["_nanosecond"].__set__


def duration_of(seconds: int, nanoseconds: int) -> timedelta:
    """Return ``seconds`` and ``nanoseconds`` (0..999,999,999), chrono's two parts of a duration.

    A ``NanoTimedelta`` if there are nanoseconds below the microsecond, else
    a plain ``timedelta``; built by timedelta's own constructor, the slot set
    directly (NanoTimedelta's __new__ costs twice as much).
    """
    microseconds, nanosecond = divmod(nanoseconds, _NANOS_PER_MICRO)
    if not nanosecond:
        return timedelta(0, seconds, microseconds)
    value = _new_timedelta(NanoTimedelta, 0, seconds, microseconds)
    _set_timedelta_nanosecond(value, nanosecond)
    return value


def to_utc(value: datetime) -> datetime:
    """Convert an aware datetime to UTC; leave anything else to ``require_aware``."""
    if isinstance(value, datetime) and value.tzinfo is not _UTC and value.utcoffset() is not None:
        return value.astimezone(_UTC)
    return value


def _optional_to_utc(value: datetime | None) -> datetime | None:
    """Convert an aware datetime to UTC, keep None; leave anything else to ``require_aware``."""
    return None if value is None else to_utc(value)


def require_aware(_instance: object, field: attrs.Attribute[Any], value: datetime | None) -> None:
    """Validate an optional timezone-aware datetime."""
    if value is None:
        return
    if not isinstance(value, datetime):
        raise FieldError(field.name, f"expected a datetime, got {describe(value)}")
    if value.utcoffset() is None:
        reason = f"must be a timezone-aware datetime, got naive {value.isoformat()}"
        raise FieldError(field.name, reason)


def require_u64(_instance: object, field: attrs.Attribute[Any], value: int) -> None:
    """Validate an integer in 0..2**64-1 (a u64 of the original; booleans are not integers)."""
    if type(value) is not int or not 0 <= value <= U64_MAX:
        raise FieldError(field.name, f"must be an integer in 0..{U64_MAX}, got {describe(value)}")


def _to_float(value: float) -> float:
    # Integers are numbers too (serde reads them into f64); bool is left to
    # the validator, which rejects it.
    if type(value) is int:
        try:
            return float(value)
        except OverflowError:
            pass
    return value


def _require_finite(_instance: object, field: attrs.Attribute[Any], value: float) -> None:
    if type(value) is not float or not _isfinite(value):
        raise FieldError(field.name, f"must be a finite number, got {describe(value)}")


def _text(value: object, field: str) -> None:
    if type(value) is not str:
        raise FieldError(field, f"expected a string, got {describe(value)}")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            code = ord(value[exc.start])
            raise FieldError(field, f"lone surrogate U+{code:04X} in string") from None


def require_text(_instance: object, field: attrs.Attribute[Any], value: str) -> None:
    """Validate a string of Unicode scalar values (no lone surrogates)."""
    _text(value, field.name)


def to_texts(value: Iterable[str]) -> tuple[str, ...]:
    """Make a tuple of any iterable but a str; leave anything else to ``require_texts``."""
    if isinstance(value, Iterable) and not isinstance(value, (str, tuple)):
        return tuple(value)
    return value  # type: ignore[return-value]


def require_texts(_instance: object, field: attrs.Attribute[Any], value: tuple[str, ...]) -> None:
    """Validate a tuple of strings (each as ``require_text``)."""
    if type(value) is not tuple:
        raise FieldError(field.name, f"expected a sequence of strings, got {describe(value)}")
    for index, item in enumerate(value):
        _text(item, f"{field.name}[{index}]")


def _to_text_map(value: Mapping[str, str]) -> dict[str, str]:
    return dict(value) if isinstance(value, Mapping) else value


def _require_text_map(
    _instance: object, field: attrs.Attribute[Any], value: Mapping[str, str]
) -> None:
    if not isinstance(value, dict):
        reason = f"expected a mapping of str to str, got {describe(value)}"
        raise FieldError(field.name, reason)
    for key, item in value.items():
        _text(key, f"{field.name} key")
        _text(item, f"{field.name}.{key}")


def unchecked_constructor(cls: type[A]) -> Callable[..., A]:
    """Return a function building a ``cls`` from its fields, in order, as they are.

    For values that were valid when the package wrote them (rows of its own
    tables, its own log): the class's converters and validators ran then
    and are skipped now. The function is generated once per class, as attrs
    generates ``__init__``, and fills the slots directly (``cls`` must be a
    slotted attrs class without ``__attrs_post_init__``).
    """
    names = [field.name for field in attrs.fields(cls)]
    # A slot's member descriptor sets it past the frozen class's __setattr__.
    namespace: dict[str, Any] = {"_new": object.__new__, "_cls": cls}
    namespace.update({f"_set_{name}": getattr(cls, name).__set__ for name in names})
    lines = [f"def unchecked_{cls.__name__}({', '.join(names)}):", "    self = _new(_cls)"]
    lines += [f"    _set_{name}(self, {name})" for name in names]
    lines.append("    return self")
    # Generated from the attrs fields, as attrs generates __init__.
    exec(compile("\n".join(lines), f"<unchecked {cls.__qualname__}>", "exec"), namespace)
    constructor: Callable[..., A] = namespace[f"unchecked_{cls.__name__}"]
    return constructor


def require_instance(cls: type[Any]) -> Callable[[object, attrs.Attribute[Any], object], None]:
    """Return a validator accepting only instances of ``cls``."""

    def check(_instance: object, field: attrs.Attribute[Any], value: object) -> None:
        if not isinstance(value, cls):
            raise FieldError(field.name, f"expected {cls.__name__}, got {describe(value)}")

    return check


_require_uuid = require_instance(UUID)
_require_duration = require_instance(timedelta)


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


@attrs.frozen
class StudyConfig:
    """Free-form description, tags and metadata of a study."""

    description: str | None = attrs.field(
        default=None, validator=attrs.validators.optional(require_text)
    )
    tags: tuple[str, ...] = attrs.field(default=(), converter=to_texts, validator=require_texts)
    # A dict keeps the wire order of the keys; it is left out of the hash
    # (equal configs still hash equal) because dicts are unhashable.
    metadata: Mapping[str, str] = attrs.field(
        factory=dict, converter=_to_text_map, validator=_require_text_map, hash=False
    )


@attrs.frozen
class TimePeriod:
    """A half-open interval ``[start, end)`` of UTC time."""

    start: datetime = attrs.field(default=EPOCH, converter=to_utc, validator=require_aware)
    end: datetime = attrs.field(default=EPOCH, converter=to_utc, validator=require_aware)

    @property
    def duration(self) -> timedelta:
        """Length of the period (to the microsecond)."""
        return self.end - self.start

    def contains(self, instant: datetime) -> bool:
        """Tell whether ``start <= instant < end``."""
        return self.start <= ensure_utc(instant, "instant") < self.end


@attrs.frozen
class LongitudinalMetrics:
    """Metrics aggregated over one period of a study.

    Counts are u64 (0..2**64-1) and rates finite floats (integers are
    converted), as the original holds them; anything else is a ``FieldError``.
    """

    sessions_completed: int = attrs.field(default=0, validator=require_u64)
    session_success_rate: float = attrs.field(
        default=0.0, converter=_to_float, validator=_require_finite
    )
    avg_session_duration: timedelta = attrs.field(default=timedelta(0), validator=_require_duration)
    tasks_completed: int = attrs.field(default=0, validator=require_u64)
    first_attempt_success_rate: float = attrs.field(
        default=0.0, converter=_to_float, validator=_require_finite
    )
    avg_iterations_to_success: float = attrs.field(
        default=0.0, converter=_to_float, validator=_require_finite
    )
    agent_efficiency: float = attrs.field(
        default=0.0, converter=_to_float, validator=_require_finite
    )
    tool_success_rate: float = attrs.field(
        default=0.0, converter=_to_float, validator=_require_finite
    )
    self_correction_rate: float = attrs.field(
        default=0.0, converter=_to_float, validator=_require_finite
    )
    swarm_coordination_overhead: float = attrs.field(
        default=0.0, converter=_to_float, validator=_require_finite
    )
    parallelism_efficiency: float = attrs.field(
        default=0.0, converter=_to_float, validator=_require_finite
    )
    learnings_applied: int = attrs.field(default=0, validator=require_u64)
    learning_effectiveness: float = attrs.field(
        default=0.0, converter=_to_float, validator=_require_finite
    )
    total_tokens: int = attrs.field(default=0, validator=require_u64)
    total_cost: float = attrs.field(default=0.0, converter=_to_float, validator=_require_finite)
    cost_per_successful_task: float = attrs.field(
        default=0.0, converter=_to_float, validator=_require_finite
    )
    period: TimePeriod = attrs.field(factory=TimePeriod, validator=require_instance(TimePeriod))


@attrs.frozen
class Study:
    """A study as the projection holds it."""

    id: StudyId
    name: str
    status: StudyStatus
    period_type: PeriodType
    period_value: int | None
    config: StudyConfig
    created_at: datetime = attrs.field(converter=to_utc, validator=require_aware)
    started_at: datetime | None = attrs.field(
        default=None, converter=_optional_to_utc, validator=require_aware
    )
    stopped_at: datetime | None = attrs.field(
        default=None, converter=_optional_to_utc, validator=require_aware
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
