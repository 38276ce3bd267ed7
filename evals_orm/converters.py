"""The wire format: one cattrs converter writing the JSON of the original Rust service.

The original serialises with serde, serde_json, chrono and uuid; every rule
below reproduces what those crates write and accept, so both services can
share one event stream byte for byte.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta, timezone
from typing import Any, NoReturn, TypeVar, overload
from uuid import UUID

import cattrs

from evals_orm.domain import (
    Checkpoint,
    LongitudinalMetrics,
    PeriodType,
    StudyConfig,
    TimePeriod,
)
from evals_orm.errors import InvalidEventError
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

__all__ = [
    "configure_converter",
    "converter",
    "dumps",
    "loads",
    "loads_stored",
    "make_converter",
    "structure",
    "structure_stored",
    "unstructure",
]

T = TypeVar("T")

_U32_MAX = 2**32 - 1
_U64_MAX = 2**64 - 1
_I64_MIN = -(2**63)
_I64_MAX = 2**63 - 1
_NANOS_PER_SECOND = 1_000_000_000
_UTC = timezone.utc
_isfinite = math.isfinite

_Path = str
_Key = str | int


# --- errors -----------------------------------------------------------------


def _at(path: _Path, key: _Key) -> _Path:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def _fail(path: _Path, reason: str) -> NoReturn:
    raise InvalidEventError(f"{path or 'top level'}: {reason}")


def _fail_at(path: _Path, key: _Key, reason: str) -> NoReturn:
    _fail(_at(path, key), reason)


_KINDS = {
    type(None): "null",
    bool: "boolean",
    int: "integer",
    float: "float",
    str: "string",
    list: "array",
    dict: "object",
}


def _describe(value: Any) -> str:
    """Name a value in an error message: its JSON kind, and the value if it is short."""
    kind = _KINDS.get(type(value), type(value).__name__)
    if isinstance(value, (dict, list, tuple)):
        return kind
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{kind} {text}"


# --- JSON text --------------------------------------------------------------


class _DuplicateKeys(dict[str, Any]):
    """A JSON object that repeats keys; the last value wins, as in serde maps."""

    __slots__ = ("duplicates",)

    duplicates: frozenset[str]


def _object_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) == len(pairs):
        return obj
    # Only a repeated *field* of a struct is an error in serde (maps keep the
    # last value, unknown keys are skipped), so remember the repeats and let
    # each struct decide.
    repeated = _DuplicateKeys(obj)
    counts = Counter(key for key, _ in pairs)
    repeated.duplicates = frozenset(key for key, count in counts.items() if count > 1)
    return repeated


def _parse_int(text: str) -> int | float:
    # serde_json reads "-0" and integers outside i64/u64 as floats, so an
    # integer field rejects them; the 20-character bound keeps every u64 and
    # i64 an int and sidesteps Python's limit on int() of huge digit strings.
    if text == "-0" or len(text) > 20:
        return _parse_float(text)
    return int(text)


def _parse_float(text: str) -> float:
    value = float(text)
    if not _isfinite(value):
        raise InvalidEventError(f"invalid JSON: number out of range: {text[:40]}")
    return value


def _parse_constant(text: str) -> NoReturn:
    raise InvalidEventError(f"invalid JSON: {text} is not a JSON value")


_DECODER = json.JSONDecoder(
    object_pairs_hook=_object_pairs,
    parse_float=_parse_float,
    parse_int=_parse_int,
    parse_constant=_parse_constant,
)

_encode_str: Callable[[str], str] = json.encoder.encode_basestring


def _unencodable(value: Any) -> NoReturn:
    raise InvalidEventError(f"cannot write {_describe(value)} as JSON")


# CPython's C encoder writes floats with ``repr``; that equals ryu's output
# unless ``repr`` chose an exponent, which always shows as digit, ``e``, sign,
# digit. Output without that pattern is exact; the rest (rare: a tiny or huge
# float, or such text in a string) is rewritten by ``_encode``.
_c_make_encoder = getattr(json.encoder, "c_make_encoder", None)
_C_ENCODE: Callable[[Any, int], tuple[str, ...]] | None = (
    None
    if _c_make_encoder is None
    else _c_make_encoder(None, _unencodable, _encode_str, None, ":", ",", False, False, False)
)
_PY_EXPONENT = re.compile(r"[0-9]e[+-][0-9]")


def _format_float(value: float) -> str:
    """Write a finite float exactly as ryu (serde_json's float printer) does.

    Both Python's ``repr`` and ryu print the shortest digits that round-trip,
    so only the layout differs: ryu writes plain decimals for
    ``1e-5 <= |x| < 1e16`` (Python from ``1e-4``) and exponents without a
    ``+`` sign or leading zeros (``1e16``, ``1.5e-7``).
    """
    text = repr(value)
    if "e" not in text:
        return text
    mantissa, _, exponent_text = text.partition("e")
    sign = "-" if mantissa[0] == "-" else ""
    digits = mantissa.lstrip("-").replace(".", "")
    exponent = int(exponent_text)
    # ryu's kk: the decimal point sits kk places after the first digit.
    kk = exponent + 1
    if -5 < kk <= 0:
        return f"{sign}0.{'0' * -kk}{digits}"
    if len(digits) == 1:
        return f"{sign}{digits}e{exponent}"
    return f"{sign}{digits[0]}.{digits[1:]}e{exponent}"


def _encode(value: Any) -> str:  # noqa: PLR0911 - one return per JSON type
    """Write the JSON-compatible output of ``unstructure`` compactly, as serde_json does."""
    kind = type(value)
    if kind is str:
        return _encode_str(value)
    if kind is dict:
        return "{" + ",".join([_encode_str(k) + ":" + _encode(v) for k, v in value.items()]) + "}"
    if kind is float:
        return _format_float(value)
    if kind is int:
        return int.__repr__(value)
    if kind is list:
        return "[" + ",".join([_encode(v) for v in value]) + "]"
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    _unencodable(value)


# --- scalars in -------------------------------------------------------------


def _object(value: Any, path: _Path, fields: frozenset[str]) -> dict[str, Any]:
    kind = type(value)
    if kind is dict:
        return value  # type: ignore[no-any-return]
    if kind is _DuplicateKeys:
        for key in value.duplicates:
            if key in fields:
                _fail_at(path, key, f"duplicate field `{key}`")
        return value  # type: ignore[no-any-return]
    if isinstance(value, dict):
        return value
    _fail(path, f"expected an object, got {_describe(value)}")


def _field(obj: Mapping[str, Any], key: str, path: _Path) -> Any:
    try:
        return obj[key]
    except KeyError:
        _fail_at(path, key, "missing field")


def _text(value: Any, path: _Path, key: _Key) -> str:
    if type(value) is not str:
        _fail_at(path, key, f"expected a string, got {_describe(value)}")
    if not value.isascii():
        _check_surrogates(value, path, key)
    return value


def _check_surrogates(value: str, path: _Path, key: _Key) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        _fail_at(path, key, f"lone surrogate U+{ord(value[exc.start]):04X} in string")


def _str_field(obj: Mapping[str, Any], key: str, path: _Path) -> str:
    return _text(_field(obj, key, path), path, key)


def _u64_field(obj: Mapping[str, Any], key: str, path: _Path) -> int:
    return _u64_out(_field(obj, key, path), path, key)


def _f64_field(obj: Mapping[str, Any], key: str, path: _Path) -> float:
    return _f64_out(_field(obj, key, path), path, key)


_UUID_HYPHENATED = re.compile(
    r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
)
_UUID_SIMPLE = re.compile(r"[0-9a-fA-F]{32}")


def _uuid_value(value: Any, path: _Path, key: _Key) -> UUID:
    if type(value) is str:
        size = len(value)
        text = value
        if size == 38 and value[0] == "{" and value[-1] == "}":
            text = value[1:-1]
        elif size == 45 and value.startswith("urn:uuid:"):
            text = value[9:]
        if (len(text) == 36 and _UUID_HYPHENATED.fullmatch(text)) or (
            size == 32 and _UUID_SIMPLE.fullmatch(text)
        ):
            return UUID(text)
    _fail_at(path, key, f"expected a UUID string, got {_describe(value)}")


def _uuid_field(obj: Mapping[str, Any], key: str, path: _Path) -> UUID:
    return _uuid_value(_field(obj, key, path), path, key)


_RFC3339 = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt ]([0-9]{2}):([0-9]{2}):([0-9]{2})"
    r"(?:\.([0-9]+))?(?:([Zz])|([+-])([0-9]{2}):([0-9]{2}))"
)


def _canonical_datetime(value: str) -> datetime:
    # fromisoformat takes "Z" only from Python 3.11 on.
    return datetime.fromisoformat(value[:-1]).replace(tzinfo=_UTC)


_RFC3339_CANONICAL = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-5][0-9]:[0-5][0-9](?:\.[0-9]{3}(?:[0-9]{3})?)?Z"
)


def _datetime_value(value: Any, path: _Path, key: _Key) -> datetime:
    if type(value) is not str:
        _fail_at(path, key, f"expected an RFC 3339 timestamp string, got {_describe(value)}")
    if _RFC3339_CANONICAL.fullmatch(value):
        # What the original writes; fromisoformat is exact for it, and faster.
        try:
            return _canonical_datetime(value)
        except ValueError as exc:
            _fail_at(path, key, f"invalid timestamp {value!r}: {exc}")
    match = _RFC3339.fullmatch(value)
    if match is None:
        _fail_at(path, key, f"expected an RFC 3339 timestamp with an offset, got {value!r}")
    year, month, day, hour, minute, second, fraction, zulu, sign, off_h, off_m = match.groups()
    micros = int(fraction[:6].ljust(6, "0")) if fraction else 0
    seconds = int(second)
    if seconds == 60:
        # chrono reads a leap second as 59 s plus an overflowing fraction;
        # Python has no leap seconds, so keep it in its second: the last
        # representable microsecond.
        seconds, micros = 59, 999_999
    try:
        if zulu:
            return datetime(
                int(year), int(month), int(day), int(hour), int(minute), seconds, micros, _UTC
            )
        if int(off_m) > 59:
            _fail_at(path, key, f"offset minutes out of range in {value!r}")
        offset = timedelta(hours=int(off_h), minutes=int(off_m))
        tz = timezone(-offset if sign == "-" else offset)
        local = datetime(
            int(year), int(month), int(day), int(hour), int(minute), seconds, micros, tz
        )
        return local.astimezone(_UTC)
    except (ValueError, OverflowError) as exc:
        _fail_at(path, key, f"invalid timestamp {value!r}: {exc}")


def _datetime_field(obj: Mapping[str, Any], key: str, path: _Path) -> datetime:
    return _datetime_value(_field(obj, key, path), path, key)


def _duration_value(value: Any, path: _Path, key: _Key) -> timedelta:
    if type(value) is not list or len(value) != 2:
        _fail_at(path, key, f"expected [seconds, nanoseconds], got {_describe(value)}")
    seconds, nanos = value
    if type(seconds) is not int or not _I64_MIN <= seconds <= _I64_MAX:
        _fail(
            f"{_at(path, key)}[0]",
            f"seconds must be an integer in {_I64_MIN}..{_I64_MAX}, got {_describe(seconds)}",
        )
    if type(nanos) is not int or not 0 <= nanos < _NANOS_PER_SECOND:
        _fail(
            f"{_at(path, key)}[1]",
            f"nanoseconds must be an integer in 0..999999999, got {_describe(nanos)}",
        )
    try:
        return timedelta(seconds=seconds, microseconds=nanos // 1000)
    except OverflowError:
        _fail_at(path, key, f"duration of {seconds} s is out of range")


_PERIOD_TYPES = {member.value: member for member in PeriodType}
_PERIOD_TYPE_NAMES = ", ".join(f"`{name}`" for name in _PERIOD_TYPES)


def _period_type_value(value: Any, path: _Path, key: _Key) -> PeriodType:
    if type(value) is str:
        try:
            return _PERIOD_TYPES[value]
        except KeyError:
            pass
    _fail_at(path, key, f"unknown variant {_describe(value)}, expected one of {_PERIOD_TYPE_NAMES}")


def _str_tuple_value(value: Any, path: _Path, key: _Key) -> tuple[str, ...]:
    if type(value) is not list:
        _fail_at(path, key, f"expected an array of strings, got {_describe(value)}")
    inner = _at(path, key)
    return tuple([_text(item, inner, index) for index, item in enumerate(value)])


def _str_map_value(value: Any, path: _Path, key: _Key) -> dict[str, str]:
    inner = _at(path, key)
    obj = _object(value, inner, frozenset())
    for name, item in obj.items():
        if not name.isascii():
            _check_surrogates(name, inner, name)
        _text(item, inner, name)
    return dict(obj)


# --- structured types in ----------------------------------------------------

_CONFIG_FIELDS = frozenset(("description", "tags", "metadata"))
_PERIOD_FIELDS = frozenset(("start", "end"))
_METRICS_U64 = ("sessions_completed", "tasks_completed", "learnings_applied", "total_tokens")
_METRICS_F64 = (
    "session_success_rate",
    "first_attempt_success_rate",
    "avg_iterations_to_success",
    "agent_efficiency",
    "tool_success_rate",
    "self_correction_rate",
    "swarm_coordination_overhead",
    "parallelism_efficiency",
    "learning_effectiveness",
    "total_cost",
    "cost_per_successful_task",
)
_METRICS_FIELDS = frozenset((*_METRICS_U64, *_METRICS_F64, "avg_session_duration", "period"))
_CHECKPOINT_FIELDS = frozenset(
    ("type", "id", "study_id", "timestamp", "metrics", "events_analyzed", "sessions_included")
)
_CREATED_FIELDS = frozenset(("type", "id", "name", "period_type", "period_value", "config"))
_LIFECYCLE_FIELDS = frozenset(("type", "id"))
_STORED_FIELDS = frozenset(("event_id", "event"))


def _s_config(value: Any, path: _Path) -> StudyConfig:
    obj = _object(value, path, _CONFIG_FIELDS)
    description = obj.get("description")
    if description is not None:
        description = _text(description, path, "description")
    tags = obj.get("tags")
    metadata = obj.get("metadata")
    return StudyConfig(
        description,
        () if tags is None and "tags" not in obj else _str_tuple_value(tags, path, "tags"),
        {}
        if metadata is None and "metadata" not in obj
        else _str_map_value(metadata, path, "metadata"),
    )


def _s_period(value: Any, path: _Path) -> TimePeriod:
    obj = _object(value, path, _PERIOD_FIELDS)
    return TimePeriod(_datetime_field(obj, "start", path), _datetime_field(obj, "end", path))


def _s_metrics(value: Any, path: _Path) -> LongitudinalMetrics:
    # Valid metrics (a plain dict: no repeated keys) take the straight path.
    fast = _fast_metrics(value)
    if fast is not None:
        return fast
    o = _object(value, path, _METRICS_FIELDS)
    p = path
    return LongitudinalMetrics(
        _u64_field(o, "sessions_completed", p),
        _f64_field(o, "session_success_rate", p),
        _duration_value(_field(o, "avg_session_duration", p), p, "avg_session_duration"),
        _u64_field(o, "tasks_completed", p),
        _f64_field(o, "first_attempt_success_rate", p),
        _f64_field(o, "avg_iterations_to_success", p),
        _f64_field(o, "agent_efficiency", p),
        _f64_field(o, "tool_success_rate", p),
        _f64_field(o, "self_correction_rate", p),
        _f64_field(o, "swarm_coordination_overhead", p),
        _f64_field(o, "parallelism_efficiency", p),
        _u64_field(o, "learnings_applied", p),
        _f64_field(o, "learning_effectiveness", p),
        _u64_field(o, "total_tokens", p),
        _f64_field(o, "total_cost", p),
        _f64_field(o, "cost_per_successful_task", p),
        _s_period(_field(o, "period", p), _at(p, "period")),
    )


def _s_checkpoint_fields(
    obj: Mapping[str, Any], path: _Path
) -> tuple[UUID, UUID, datetime, LongitudinalMetrics, int, tuple[str, ...]]:
    return (
        _uuid_field(obj, "id", path),
        _uuid_field(obj, "study_id", path),
        _datetime_field(obj, "timestamp", path),
        _s_metrics(_field(obj, "metrics", path), _at(path, "metrics")),
        _u64_field(obj, "events_analyzed", path),
        _str_tuple_value(_field(obj, "sessions_included", path), path, "sessions_included"),
    )


def _s_checkpoint(value: Any, path: _Path) -> Checkpoint:
    # The id types are NewTypes over UUID: no conversion needed.
    return Checkpoint(*_s_checkpoint_fields(_object(value, path, _CHECKPOINT_FIELDS), path))  # type: ignore[arg-type]


def _e_created(obj: Mapping[str, Any], path: _Path) -> StudyCreated:
    period_value = obj.get("period_value")
    if period_value is not None and (
        type(period_value) is not int or not 0 <= period_value <= _U32_MAX
    ):
        _fail_at(
            path,
            "period_value",
            f"must be null or an integer in 0..{_U32_MAX}, got {_describe(period_value)}",
        )
    return StudyCreated(
        _uuid_field(obj, "id", path),  # type: ignore[arg-type]
        _str_field(obj, "name", path),
        _period_type_value(_field(obj, "period_type", path), path, "period_type"),
        period_value,
        _s_config(_field(obj, "config", path), _at(path, "config")),
    )


def _lifecycle(
    cls: type[StudyStarted | StudyPaused | StudyResumed | StudyStopped],
) -> Callable[[Mapping[str, Any], _Path], EvalEvent]:
    def structure_event(obj: Mapping[str, Any], path: _Path) -> EvalEvent:
        return cls(_uuid_field(obj, "id", path))  # type: ignore[arg-type]

    return structure_event


def _e_checkpoint(obj: Mapping[str, Any], path: _Path) -> CheckpointRecorded:
    return CheckpointRecorded(*_s_checkpoint_fields(obj, path))  # type: ignore[arg-type]


_TAGS: dict[type[Any], str] = {
    StudyCreated: "study_created",
    StudyStarted: "study_started",
    StudyPaused: "study_paused",
    StudyResumed: "study_resumed",
    StudyStopped: "study_stopped",
    CheckpointRecorded: "checkpoint_recorded",
}
_EVENT_FIELDS: dict[str, frozenset[str]] = {
    "study_created": _CREATED_FIELDS,
    "study_started": _LIFECYCLE_FIELDS,
    "study_paused": _LIFECYCLE_FIELDS,
    "study_resumed": _LIFECYCLE_FIELDS,
    "study_stopped": _LIFECYCLE_FIELDS,
    "checkpoint_recorded": _CHECKPOINT_FIELDS,
}
_EVENT_STRUCTURERS: dict[str, Callable[[Mapping[str, Any], _Path], EvalEvent]] = {
    "study_created": _e_created,
    "study_started": _lifecycle(StudyStarted),
    "study_paused": _lifecycle(StudyPaused),
    "study_resumed": _lifecycle(StudyResumed),
    "study_stopped": _lifecycle(StudyStopped),
    "checkpoint_recorded": _e_checkpoint,
}
_TAG_NAMES = ", ".join(f"`{tag}`" for tag in _EVENT_STRUCTURERS)


def _event_tag(value: Any, path: _Path) -> tuple[dict[str, Any], str]:
    obj = _object(value, path, _LIFECYCLE_FIELDS)
    tag = _field(obj, "type", path)
    if type(tag) is not str or tag not in _EVENT_FIELDS:
        _fail_at(path, "type", f"unknown variant {_describe(tag)}, expected one of {_TAG_NAMES}")
    fields = _EVENT_FIELDS[tag]
    if type(obj) is _DuplicateKeys:
        _object(obj, path, fields)
    return obj, tag


def _s_event(value: Any, path: _Path) -> EvalEvent:
    obj, tag = _event_tag(value, path)
    return _EVENT_STRUCTURERS[tag](obj, path)


def _s_one_event(cls: type[T]) -> Callable[[Any, _Path], T]:
    expected = _TAGS[cls]

    def structure_event(value: Any, path: _Path) -> T:
        obj, tag = _event_tag(value, path)
        if tag != expected:
            _fail_at(path, "type", f"expected `{expected}`, got `{tag}`")
        return _EVENT_STRUCTURERS[tag](obj, path)  # type: ignore[return-value]

    return structure_event


def _s_stored(value: Any, path: _Path) -> StoredEvalEvent:
    obj = _object(value, path, _STORED_FIELDS)
    event_id = _uuid_field(obj, "event_id", path)
    if event_id.version != 7 or event_id.variant != "specified in RFC 4122":
        _fail_at(path, "event_id", f"must be a UUID of version 7, got {event_id}")
    return StoredEvalEvent(event_id, _s_event(_field(obj, "event", path), _at(path, "event")))


def _s_str_tuple(value: Any, path: _Path) -> tuple[str, ...]:
    if type(value) is not list:
        _fail(path, f"expected an array of strings, got {_describe(value)}")
    return tuple([_text(item, path, index) for index, item in enumerate(value)])


# --- values out -------------------------------------------------------------


def _check_type(value: Any, cls: type[Any], path: _Path) -> None:
    if type(value) is not cls:
        _fail(path, f"expected {cls.__name__}, got {_describe(value)}")


def _u64_out(value: Any, path: _Path, key: str) -> int:
    if type(value) is int and 0 <= value <= _U64_MAX:
        return value
    _fail_at(path, key, f"must be an integer in 0..{_U64_MAX}, got {_describe(value)}")


def _f64_out(value: Any, path: _Path, key: str) -> float:
    kind = type(value)
    if kind is float and _isfinite(value):
        return value  # type: ignore[no-any-return]
    if kind is int:
        try:
            return float(value)
        except OverflowError:
            pass
    _fail_at(path, key, f"must be a finite number, got {_describe(value)}")


def _uuid_out(value: Any, path: _Path, key: _Key) -> str:
    if not isinstance(value, UUID):
        _fail_at(path, key, f"expected a uuid.UUID, got {_describe(value)}")
    return str(value)


def _datetime_out(value: Any, path: _Path, key: _Key) -> str:
    if not isinstance(value, datetime):
        _fail_at(path, key, f"expected a datetime, got {_describe(value)}")
    if value.tzinfo is not _UTC:
        if value.utcoffset() is None:
            _fail_at(path, key, f"naive datetime {value.isoformat()} has no offset")
        value = value.astimezone(_UTC)
    micros = value.microsecond
    text: str
    if micros == 0:
        text = value.isoformat(timespec="seconds")
    elif micros % 1000 == 0:
        text = value.isoformat(timespec="milliseconds")
    else:
        text = value.isoformat(timespec="microseconds")
    return text[:-6] + "Z"


def _duration_out(value: Any, path: _Path, key: _Key) -> list[int]:
    if not isinstance(value, timedelta):
        _fail_at(path, key, f"expected a timedelta, got {_describe(value)}")
    return [value.days * 86_400 + value.seconds, value.microseconds * 1000]


def _period_type_out(value: Any, path: _Path, key: _Key) -> str:
    if not isinstance(value, PeriodType):
        _fail_at(path, key, f"expected a PeriodType, got {_describe(value)}")
    return value.value


def _str_list_out(value: Any, path: _Path, key: _Key) -> list[str]:
    inner = _at(path, key)
    if not isinstance(value, tuple):
        _fail(inner, f"expected a tuple of str, got {_describe(value)}")
    return [_text(item, inner, index) for index, item in enumerate(value)]


def _u_config(config: Any, path: _Path) -> dict[str, Any]:
    _check_type(config, StudyConfig, path)
    out: dict[str, Any] = {}
    if config.description is not None:
        out["description"] = _text(config.description, path, "description")
    if config.tags:
        out["tags"] = _str_list_out(config.tags, path, "tags")
    if config.metadata:
        inner = _at(path, "metadata")
        out["metadata"] = {
            _text(name, inner, "<key>"): _text(item, inner, name)
            for name, item in config.metadata.items()
        }
    return out


def _u_period(period: Any, path: _Path) -> dict[str, Any]:
    _check_type(period, TimePeriod, path)
    return {
        "start": _datetime_out(period.start, path, "start"),
        "end": _datetime_out(period.end, path, "end"),
    }


def _u_metrics(m: Any, path: _Path) -> dict[str, Any]:
    _check_type(m, LongitudinalMetrics, path)
    p = path
    return {
        "sessions_completed": _u64_out(m.sessions_completed, p, "sessions_completed"),
        "session_success_rate": _f64_out(m.session_success_rate, p, "session_success_rate"),
        "avg_session_duration": _duration_out(m.avg_session_duration, p, "avg_session_duration"),
        "tasks_completed": _u64_out(m.tasks_completed, p, "tasks_completed"),
        "first_attempt_success_rate": _f64_out(
            m.first_attempt_success_rate, p, "first_attempt_success_rate"
        ),
        "avg_iterations_to_success": _f64_out(
            m.avg_iterations_to_success, p, "avg_iterations_to_success"
        ),
        "agent_efficiency": _f64_out(m.agent_efficiency, p, "agent_efficiency"),
        "tool_success_rate": _f64_out(m.tool_success_rate, p, "tool_success_rate"),
        "self_correction_rate": _f64_out(m.self_correction_rate, p, "self_correction_rate"),
        "swarm_coordination_overhead": _f64_out(
            m.swarm_coordination_overhead, p, "swarm_coordination_overhead"
        ),
        "parallelism_efficiency": _f64_out(m.parallelism_efficiency, p, "parallelism_efficiency"),
        "learnings_applied": _u64_out(m.learnings_applied, p, "learnings_applied"),
        "learning_effectiveness": _f64_out(m.learning_effectiveness, p, "learning_effectiveness"),
        "total_tokens": _u64_out(m.total_tokens, p, "total_tokens"),
        "total_cost": _f64_out(m.total_cost, p, "total_cost"),
        "cost_per_successful_task": _f64_out(
            m.cost_per_successful_task, p, "cost_per_successful_task"
        ),
        "period": _u_period(m.period, _at(p, "period")),
    }


def _u_checkpoint_fields(c: Any, path: _Path, out: dict[str, Any]) -> dict[str, Any]:
    out["id"] = _uuid_out(c.id, path, "id")
    out["study_id"] = _uuid_out(c.study_id, path, "study_id")
    out["timestamp"] = _datetime_out(c.timestamp, path, "timestamp")
    out["metrics"] = _u_metrics(c.metrics, _at(path, "metrics"))
    out["events_analyzed"] = _u64_out(c.events_analyzed, path, "events_analyzed")
    out["sessions_included"] = _str_list_out(c.sessions_included, path, "sessions_included")
    return out


def _u_checkpoint(checkpoint: Any, path: _Path) -> dict[str, Any]:
    _check_type(checkpoint, Checkpoint, path)
    return _u_checkpoint_fields(checkpoint, path, {})


def _u_event(event: Any, path: _Path) -> dict[str, Any]:
    kind = type(event)
    tag = _TAGS.get(kind)
    if tag is None:
        _fail(path, f"expected an event, got {_describe(event)}")
    if kind is CheckpointRecorded:
        return _u_checkpoint_fields(event, path, {"type": tag})
    if kind is StudyCreated:
        period_value = event.period_value
        if period_value is not None and (
            type(period_value) is not int or not 0 <= period_value <= _U32_MAX
        ):
            _fail_at(
                path,
                "period_value",
                f"must be None or an integer in 0..{_U32_MAX}, got {_describe(period_value)}",
            )
        return {
            "type": tag,
            "id": _uuid_out(event.id, path, "id"),
            "name": _text(event.name, path, "name"),
            "period_type": _period_type_out(event.period_type, path, "period_type"),
            "period_value": period_value,
            "config": _u_config(event.config, _at(path, "config")),
        }
    return {"type": tag, "id": _uuid_out(event.id, path, "id")}


def _u_stored(stored: Any, path: _Path) -> dict[str, Any]:
    _check_type(stored, StoredEvalEvent, path)
    return {
        "event_id": _uuid_out(stored.event_id, path, "event_id"),
        "event": _u_event(stored.event, _at(path, "event")),
    }


def _u_str_tuple(value: Any, path: _Path) -> list[str]:
    if not isinstance(value, tuple):
        _fail(path, f"expected a tuple of str, got {_describe(value)}")
    return [_text(item, path, index) for index, item in enumerate(value)]


# --- fast paths for the SQL columns ---------------------------------------
#
# A checkpoint's metrics are written and read once per row, so they get
# straight-line code. Each fast path handles only values that are valid
# beyond doubt and gives up (returns None) on anything else, leaving the
# general path above to produce the same output or the precise error.

_METRICS_JSON = (
    '{"sessions_completed":%d,"session_success_rate":%s,"avg_session_duration":[%d,%d],'
    '"tasks_completed":%d,"first_attempt_success_rate":%s,"avg_iterations_to_success":%s,'
    '"agent_efficiency":%s,"tool_success_rate":%s,"self_correction_rate":%s,'
    '"swarm_coordination_overhead":%s,"parallelism_efficiency":%s,"learnings_applied":%d,'
    '"learning_effectiveness":%s,"total_tokens":%d,"total_cost":%s,'
    '"cost_per_successful_task":%s,"period":{"start":"%s","end":"%s"}}'
)
_float_repr = float.__repr__


def _plain_u64(value: Any) -> bool:
    return type(value) is int and 0 <= value <= _U64_MAX


def _fast_metrics_json(m: LongitudinalMetrics) -> str | None:
    try:
        # float.__repr__ refuses anything but a float (an int, a bool).
        floats = list(
            map(
                _float_repr,
                (
                    m.session_success_rate,
                    m.first_attempt_success_rate,
                    m.avg_iterations_to_success,
                    m.agent_efficiency,
                    m.tool_success_rate,
                    m.self_correction_rate,
                    m.swarm_coordination_overhead,
                    m.parallelism_efficiency,
                    m.learning_effectiveness,
                    m.total_cost,
                    m.cost_per_successful_task,
                ),
            )
        )
    except TypeError:
        return None
    written = "".join(floats)
    duration = m.avg_session_duration
    period = m.period
    if (
        # "e": an exponent, which ryu writes otherwise; "n": inf or nan.
        "e" in written
        or "n" in written
        or not (
            _plain_u64(m.sessions_completed)
            and _plain_u64(m.tasks_completed)
            and _plain_u64(m.learnings_applied)
            and _plain_u64(m.total_tokens)
        )
        or type(duration) is not timedelta
        or type(period) is not TimePeriod
    ):
        return None
    return _METRICS_JSON % (
        m.sessions_completed,
        floats[0],
        duration.days * 86_400 + duration.seconds,
        duration.microseconds * 1000,
        m.tasks_completed,
        *floats[1:8],
        m.learnings_applied,
        floats[8],
        m.total_tokens,
        floats[9],
        floats[10],
        _datetime_out(period.start, "", "start"),
        _datetime_out(period.end, "", "end"),
    )


def _fast_checkpoint_event_json(event: CheckpointRecorded) -> str | None:
    metrics = _fast_metrics_json(event.metrics)
    sessions = _fast_str_tuple_json(event.sessions_included)
    if (
        metrics is None
        or sessions is None
        or type(event.id) is not UUID
        or type(event.study_id) is not UUID
        or type(event.timestamp) is not datetime
        or not _plain_u64(event.events_analyzed)
    ):
        return None
    return (
        f'{{"type":"checkpoint_recorded","id":"{event.id}","study_id":"{event.study_id}",'
        f'"timestamp":"{_datetime_out(event.timestamp, "", "timestamp")}","metrics":{metrics},'
        f'"events_analyzed":{event.events_analyzed},"sessions_included":{sessions}}}'
    )


def _fast_str_tuple_json(value: Any) -> str | None:
    if type(value) is not tuple or _C_ENCODE is None:
        return None
    for item in value:
        if type(item) is not str or not item.isascii():
            return None
    return "".join(_C_ENCODE(list(value), 0))


# Stored JSON was written by ``dumps`` (or the original service), so reading
# it back needs neither the duplicate-key check nor Python-level number hooks.
_TRUSTED_DECODER = json.JSONDecoder(parse_constant=_parse_constant)


def _fast_metrics(o: Any) -> LongitudinalMetrics | None:  # noqa: PLR0911 - one exit per check
    if type(o) is not dict:
        return None
    try:
        for key in _METRICS_U64:
            if not _plain_u64(o[key]):
                return None
        for key in _METRICS_F64:
            if type(o[key]) is not float:
                return None
        seconds, nanos = o["avg_session_duration"]
        period = o["period"]
        start, end = period["start"], period["end"]
    except (KeyError, TypeError, ValueError):
        return None
    if not (
        type(seconds) is int
        and type(nanos) is int
        and 0 <= nanos < _NANOS_PER_SECOND
        and -(2**37) < seconds < 2**37  # well inside timedelta's range
        and type(start) is str
        and type(end) is str
        and _RFC3339_CANONICAL.fullmatch(start)
        and _RFC3339_CANONICAL.fullmatch(end)
    ):
        return None
    try:
        period = TimePeriod(_canonical_datetime(start), _canonical_datetime(end))
    except ValueError:  # a canonical shape with an impossible date
        return None
    return LongitudinalMetrics(
        o["sessions_completed"],
        o["session_success_rate"],
        timedelta(seconds=seconds, microseconds=nanos // 1000),
        o["tasks_completed"],
        o["first_attempt_success_rate"],
        o["avg_iterations_to_success"],
        o["agent_efficiency"],
        o["tool_success_rate"],
        o["self_correction_rate"],
        o["swarm_coordination_overhead"],
        o["parallelism_efficiency"],
        o["learnings_applied"],
        o["learning_effectiveness"],
        o["total_tokens"],
        o["total_cost"],
        o["cost_per_successful_task"],
        period,
    )


# --- the converter ----------------------------------------------------------

_StructureFn = Callable[[Any, _Path], Any]
_UnstructureFn = Callable[[Any, _Path], Any]

# Each wire type with its structure and unstructure function. Hooks are
# plain functions written once per class: no introspection per call, and
# exact control of key order, error paths and serde's rules.
_HOOKS: tuple[tuple[Any, _StructureFn, _UnstructureFn], ...] = (
    (StoredEvalEvent, _s_stored, _u_stored),
    (EvalEvent, _s_event, _u_event),
    *((cls, _s_one_event(cls), _u_event) for cls in _TAGS),
    (StudyConfig, _s_config, _u_config),
    (TimePeriod, _s_period, _u_period),
    (LongitudinalMetrics, _s_metrics, _u_metrics),
    (Checkpoint, _s_checkpoint, _u_checkpoint),
    (tuple[str, ...], _s_str_tuple, _u_str_tuple),
    (tuple, _s_str_tuple, _u_str_tuple),
    (UUID, lambda v, p: _uuid_value(v, p, ""), lambda v, p: _uuid_out(v, p, "")),
    (datetime, lambda v, p: _datetime_value(v, p, ""), lambda v, p: _datetime_out(v, p, "")),
    (timedelta, lambda v, p: _duration_value(v, p, ""), lambda v, p: _duration_out(v, p, "")),
    (
        PeriodType,
        lambda v, p: _period_type_value(v, p, ""),
        lambda v, p: _period_type_out(v, p, ""),
    ),
)


def _root_structure(fn: _StructureFn) -> Callable[[Any, Any], Any]:
    def hook(data: Any, _cls: Any) -> Any:
        return fn(data, "")

    return hook


def _root_unstructure(fn: _UnstructureFn) -> Callable[[Any], Any]:
    def hook(obj: Any) -> Any:
        return fn(obj, "")

    return hook


def _equals(cls: Any) -> Callable[[Any], bool]:
    def predicate(candidate: Any) -> bool:
        return bool(candidate == cls)

    return predicate


def configure_converter(conv: cattrs.Converter) -> None:
    """Teach ``conv`` the wire format of the original Rust service.

    Rules (serde + serde_json + chrono + uuid, as the original writes them):

    * ``StoredEvalEvent`` is ``{"event_id": ..., "event": {...}}``; events are
      internally tagged, ``{"type": "<snake_case name>", <fields in declaration
      order>}``, the tag first. A single event class reads and writes the same
      tagged form and rejects another tag.
    * UUIDs are written lowercase hyphenated; read in the forms of the uuid
      crate: hyphenated, simple (32 hex digits), braced ``{...}`` and
      ``urn:uuid:...``, hex digits in either case. ``event_id`` must be
      version 7 (RFC 4122 variant).
    * Datetimes are written as RFC 3339 UTC with ``Z`` and 0, 3 or 6 fraction
      digits (none when the microseconds are 0, 3 for whole milliseconds),
      as chrono does. Read: ``YYYY-MM-DD``, ``T``/``t``/space,
      ``hh:mm:ss``, an optional fraction of one or more digits (truncated to
      microseconds), then ``Z``/``z`` or ``+hh:mm``/``-hh:mm`` (converted to
      UTC). No offset is an error. A leap second ``:60`` (chrono accepts
      it) becomes ``:59.999999``, Python having no leap seconds.
    * ``avg_session_duration`` is chrono's ``[seconds, nanoseconds]``: seconds
      an i64 floored, nanoseconds 0..999999999, so -0.5 s is
      ``[-1, 500000000]``; nanoseconds are truncated to microseconds.
    * ``PeriodType`` is its string value. ``period_value`` is an integer in
      0..2**32-1 or null, always written, missing reads as null.
    * ``StudyConfig`` leaves out ``description`` when None, ``tags`` when
      empty and ``metadata`` when empty; missing ones take their defaults,
      explicit ``null`` description is None. Metadata keeps key order;
      a repeated metadata key keeps its last value (serde maps do).
    * Every other field is required (all ``LongitudinalMetrics`` fields,
      ``config``, ``events_analyzed``, ``sessions_included``); unknown keys
      are ignored; a repeated known field is an error (``duplicate field``).
    * u64 fields (``sessions_completed``, ``tasks_completed``,
      ``learnings_applied``, ``total_tokens``, ``events_analyzed``) are JSON
      integers in 0..2**64-1; ``3.0``, ``-0`` and booleans are rejected.
      Float fields accept JSON integers and must be finite; they are written
      as ryu (serde_json) writes f64: ``1.0``, ``0.00001``, ``1e-7``,
      ``1e16``, ``1.5e300``, ``-0.0``.
    * Strings must be valid Unicode scalar values (no lone surrogates).
    * Every violation raises ``InvalidEventError`` naming the field path;
      writing a value the original could not hold (NaN, out-of-range int,
      naive datetime, wrong type) raises it too.
    """
    for cls, structure_fn, unstructure_fn in _HOOKS:
        if isinstance(cls, type):
            conv.register_structure_hook(cls, _root_structure(structure_fn))
            conv.register_unstructure_hook(cls, _root_unstructure(unstructure_fn))
        else:
            # Generic aliases and unions are not classes: match them by equality.
            conv.register_structure_hook_func(_equals(cls), _root_structure(structure_fn))
            conv.register_unstructure_hook_func(_equals(cls), _root_unstructure(unstructure_fn))


def make_converter() -> cattrs.Converter:
    """Return a new converter for the wire format (see ``configure_converter``)."""
    conv = cattrs.Converter()
    configure_converter(conv)
    return conv


converter = make_converter()


def unstructure(obj: Any, cls: Any = None) -> Any:
    """Return ``obj`` as JSON-compatible Python values in the wire format."""
    return converter.unstructure(obj, unstructure_as=cls)


@overload
def structure(data: Any) -> StoredEvalEvent: ...
@overload
def structure(data: Any, cls: type[T]) -> T: ...
@overload
def structure(data: Any, cls: Any) -> Any: ...
def structure(data: Any, cls: Any = StoredEvalEvent) -> Any:
    """Build a ``cls`` from already-parsed JSON values (for example from jsonb)."""
    return converter.structure(data, cls)


def dumps(obj: Any, cls: Any = None) -> str:
    """Return the compact wire-format JSON of ``obj``, byte-identical to the original."""
    kind = type(obj)
    if kind is LongitudinalMetrics:
        fast = _fast_metrics_json(obj)
        if fast is not None:
            return fast
    elif kind is tuple:
        fast = _fast_str_tuple_json(obj)
        if fast is not None:
            return fast
    elif kind is CheckpointRecorded:
        fast = _fast_checkpoint_event_json(obj)
        if fast is not None:
            return fast
    data = converter.unstructure(obj, unstructure_as=cls)
    if _C_ENCODE is not None:
        text = "".join(_C_ENCODE(data, 0))
        if _PY_EXPONENT.search(text) is None:
            return text
    return _encode(data)


def loads_stored(text: str | bytes, cls: Any) -> Any:
    """Parse JSON this package stored in a column, as ``loads(text, cls)`` does.

    Stored JSON was written by ``dumps`` (or the original service), so it is
    read without the duplicate-key check and number hooks that untrusted
    input needs, and the common shapes take a fast path.
    """
    try:
        data = _TRUSTED_DECODER.decode(text if isinstance(text, str) else text.decode())
    except (ValueError, InvalidEventError, RecursionError):
        return loads(text, cls)
    return structure_stored(data, cls)


def structure_stored(data: Any, cls: Any) -> Any:
    """Build a ``cls`` from JSON values this package stored (e.g. jsonb), as ``structure``."""
    if cls is LongitudinalMetrics:
        fast: Any = _fast_metrics(data)
        if fast is not None:
            return fast
    elif cls == tuple[str, ...] and type(data) is list:
        fast = tuple(data)
        if all(type(item) is str for item in fast):
            return fast
    return structure(data, cls)


@overload
def loads(text: str | bytes) -> StoredEvalEvent: ...
@overload
def loads(text: str | bytes, cls: type[T]) -> T: ...
@overload
def loads(text: str | bytes, cls: Any) -> Any: ...
def loads(text: str | bytes, cls: Any = StoredEvalEvent) -> Any:
    """Parse wire-format JSON into a ``cls``; any bad input raises ``InvalidEventError``."""
    if isinstance(text, (bytes, bytearray, memoryview)):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidEventError(f"invalid UTF-8 at byte {exc.start}") from None
    elif not isinstance(text, str):
        raise InvalidEventError(f"expected JSON text as str or bytes, got {_describe(text)}")
    try:
        data = _DECODER.decode(text)
    except json.JSONDecodeError as exc:
        raise InvalidEventError(f"invalid JSON: {exc}") from None
    except RecursionError:
        raise InvalidEventError("invalid JSON: nested too deeply") from None
    return converter.structure(data, cls)
