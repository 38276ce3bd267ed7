"""The wire format: one cattrs converter writing the JSON of the original Rust service.

The original serialises with serde, serde_json (1.0.149), chrono and uuid;
the converter reproduces what those crates write and accept, so both
services can share one event stream byte for byte. The domain classes
validate their own fields, so the converter only translates: JSON values to
typed fields and back. orjson writes the bytes.
"""

from __future__ import annotations

import json
import operator
import re
from collections import Counter
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta, timezone
from functools import partial
from typing import Any, NoReturn, TypeVar, overload
from uuid import UUID

import attrs
import cattrs
import orjson
from cattrs.errors import (
    AttributeValidationNote,
    BaseValidationError,
    ClassValidationError,
)
from cattrs.gen import make_dict_structure_fn, make_dict_unstructure_fn, override
from cattrs.strategies import configure_tagged_union

from evals_orm._text import utc_text, uuid_text
from evals_orm.domain import (
    Checkpoint,
    FieldError,
    LongitudinalMetrics,
    NanoDatetime,
    PeriodType,
    StudyConfig,
    TimePeriod,
    describe,
    duration_of,
    unchecked_constructor,
    unchecked_uuid,
    with_nanosecond,
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
    "encoder",
    "loads",
    "make_converter",
    "structure",
    "unstructure",
    "written_decoder",
]

T = TypeVar("T")

_UTC = timezone.utc
_I64_MIN = -(2**63)
_I64_MAX = 2**63 - 1
_NANOS_PER_SECOND = 1_000_000_000

# --- JSON text in -------------------------------------------------------------


class _RepeatedKeys(dict[str, Any]):
    """A JSON object that repeats keys; the last value wins, as in serde maps."""

    __slots__ = ("repeated",)

    repeated: frozenset[str]


def _object_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) == len(pairs):
        return obj
    # Only a repeated *field* of a struct is an error in serde (maps keep the
    # last value), so remember the repeats and let each struct decide.
    marked = _RepeatedKeys(obj)
    marked.repeated = frozenset(
        key for key, count in Counter(k for k, _ in pairs).items() if count > 1
    )
    return marked


def _parse_int(text: str) -> int | float:
    # serde_json reads "-0" and integers beyond u64/i64 as f64, so an integer
    # field rejects them; 20 characters hold every u64 and i64 and keep
    # Python's limit on int() of huge digit strings out of reach.
    if text == "-0" or len(text) > 20:
        return float(text)
    return int(text)


def _parse_constant(text: str) -> NoReturn:
    raise InvalidEventError(f"invalid JSON: {text} is not a JSON value")


# The C scanner calls the hooks only for objects and integers; floats out of
# range come back as inf and are refused by the field they land in.
_DECODER = json.JSONDecoder(
    object_pairs_hook=_object_pairs, parse_int=_parse_int, parse_constant=_parse_constant
)


# --- scalars ------------------------------------------------------------------

_RFC3339 = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt ]([0-9]{2}):([0-9]{2}):([0-9]{2})"
    r"(?:\.([0-9]+))?(?:[Zz]|([+-])([0-9]{2}):([0-9]{2}))"
)


def _structure_datetime(value: Any, _: Any) -> datetime:
    """Read RFC 3339 as chrono does, to the nanosecond, into UTC."""
    if type(value) is not str:
        raise FieldError("", f"expected an RFC 3339 timestamp string, got {describe(value)}")
    match = _RFC3339.fullmatch(value)
    if match is None:
        raise FieldError("", f"expected an RFC 3339 timestamp with an offset, got {value!r}")
    if value.startswith("0000"):
        reason = f"timestamp {value!r} is outside the years 1..9999 a Python datetime holds"
        raise FieldError("", reason)
    year, month, day, hour, minute, second, fraction, sign, off_h, off_m = match.groups()
    if second == "60":
        raise FieldError("", f"leap second in {value!r}: Python datetimes hold seconds 0..59")
    nanos = int(fraction[:9].ljust(9, "0")) if fraction else 0
    micros, nanosecond = divmod(nanos, 1000)
    try:
        moment = datetime(
            int(year), int(month), int(day), int(hour), int(minute), int(second), micros, _UTC
        )
        if sign:
            if int(off_h) > 23 or int(off_m) > 59:
                raise ValueError("offset out of range")
            offset = timedelta(hours=int(off_h), minutes=int(off_m))
            moment -= -offset if sign == "-" else offset
    except ValueError as exc:
        raise FieldError("", f"invalid timestamp {value!r}: {exc}") from None
    except OverflowError:
        reason = f"timestamp {value!r} is outside the years 1..9999 a Python datetime holds"
        raise FieldError("", reason) from None
    return with_nanosecond(moment, nanosecond) if nanosecond else moment


def _unstructure_datetime(value: datetime) -> str:
    """Write RFC 3339 UTC with ``Z`` and 0, 3, 6 or 9 fraction digits, as chrono's AutoSi."""
    if value.tzinfo is not _UTC:
        if value.utcoffset() is None:
            raise FieldError("", f"naive datetime {value.isoformat()} has no offset")
        value = value.astimezone(_UTC)
    text = utc_text(value)  # "YYYY-MM-DDTHH:MM:SSZ", with ".ffffff" if there are microseconds
    microsecond = value.microsecond
    nanosecond = value.nanosecond if isinstance(value, NanoDatetime) else 0
    if nanosecond:
        return f"{text[:19]}.{microsecond:06d}{nanosecond:03d}Z"
    if microsecond % 1000 or not microsecond:
        return text
    return text[:-4] + "Z"  # milliseconds: three digits


def _structure_duration(value: Any, _: Any) -> timedelta:
    """Read chrono's ``[seconds, nanoseconds]`` (seconds floored, nanoseconds 0..999999999)."""
    if type(value) is not list or len(value) != 2:
        raise FieldError("", f"expected [seconds, nanoseconds], got {describe(value)}")
    seconds, nanos = value
    if type(seconds) is not int or not _I64_MIN <= seconds <= _I64_MAX:
        reason = f"seconds must be an integer in {_I64_MIN}..{_I64_MAX}, got {describe(seconds)}"
        raise FieldError("[0]", reason)
    if type(nanos) is not int or not 0 <= nanos < _NANOS_PER_SECOND:
        reason = f"nanoseconds must be an integer in 0..999999999, got {describe(nanos)}"
        raise FieldError("[1]", reason)
    try:
        return duration_of(seconds, nanos)
    except OverflowError:
        reason = f"duration of {seconds} s is out of range (a timedelta holds ±999999999 days)"
        raise FieldError("", reason) from None


def _unstructure_duration(value: timedelta) -> list[int]:
    nanos = value.microseconds * 1000 + getattr(value, "nanosecond", 0)
    return [value.days * 86_400 + value.seconds, nanos]


_UUID_HYPHENATED = re.compile(
    r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
)
_UUID_SIMPLE = re.compile(r"[0-9a-fA-F]{32}")


def _structure_uuid(value: Any, _: Any) -> UUID:
    """Read the uuid crate's forms: hyphenated, simple, ``{braced}``, ``urn:uuid:``."""
    if type(value) is str:
        text = value
        if len(value) == 38 and value[0] == "{" and value[-1] == "}":
            text = value[1:-1]
        elif len(value) == 45 and value.startswith("urn:uuid:"):
            text = value[9:]
        if _UUID_HYPHENATED.fullmatch(text) or _UUID_SIMPLE.fullmatch(value):
            return UUID(text)
    raise FieldError("", f"expected a UUID string, got {describe(value)}")


_PERIOD_TYPES = {member.value: member for member in PeriodType}


def _structure_period_type(value: Any, _: Any) -> PeriodType:
    if type(value) is str and value in _PERIOD_TYPES:
        return _PERIOD_TYPES[value]
    names = ", ".join(f"`{name}`" for name in _PERIOD_TYPES)
    raise FieldError("", f"unknown variant {describe(value)}, expected one of {names}")


def _structure_texts(value: Any, _: Any) -> tuple[str, ...]:
    if type(value) is not list:
        raise FieldError("", f"expected an array of strings, got {describe(value)}")
    for index, item in enumerate(value):
        if type(item) is not str:
            raise FieldError(f"[{index}]", f"expected a string, got {describe(item)}")
    return tuple(value)


def _structure_text_map(value: Any, _: Any) -> Mapping[str, str]:
    if not isinstance(value, dict):
        raise FieldError("", f"expected an object, got {describe(value)}")
    for key, item in value.items():
        if type(item) is not str:
            raise FieldError(key, f"expected a string, got {describe(item)}")
    return value


def _as_is(value: Any, _: Any) -> Any:
    # The attrs classes check these values (type, range, finiteness).
    return value


# --- objects ------------------------------------------------------------------

_TAGS: dict[type[Any], str] = {
    StudyCreated: "study_created",
    StudyStarted: "study_started",
    StudyPaused: "study_paused",
    StudyResumed: "study_resumed",
    StudyStopped: "study_stopped",
    CheckpointRecorded: "checkpoint_recorded",
}
_TAG_NAMES = ", ".join(f"`{tag}`" for tag in _TAGS.values())
# Fields the original may leave out (``#[serde(default)]``/``skip_serializing_if``);
# every other field is required on the wire even where Python has a default.
_OPTIONAL = {StudyConfig: ("description", "tags", "metadata"), StudyCreated: ("period_value",)}


def _as_object(value: Any) -> dict[str, Any]:
    if isinstance(value, dict):
        return value
    raise FieldError("", f"expected an object, got {describe(value)}")


def _object_hook(cls: type[Any], generated: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    """Wrap a generated structure function with serde's object rules for ``cls``."""
    names = [field.name for field in attrs.fields(cls)]
    tag = _TAGS.get(cls)
    if tag is not None:
        names.insert(0, "type")
    required = [name for name in names if name not in _OPTIONAL.get(cls, ())]
    required_set = frozenset(required)

    def structure_object(value: Any, _: Any) -> Any:
        obj = _as_object(value)
        if type(obj) is _RepeatedKeys:
            for name in names:
                if name in obj.repeated:
                    raise FieldError(name, f"duplicate field `{name}`")
        if tag is not None and "type" in obj and obj["type"] != tag:
            raise FieldError("type", f"expected `{tag}`, got {describe(obj['type'])}")
        if required_set <= obj.keys():
            return generated(obj, cls)
        # Python defaults must not fill in a field the wire requires; report
        # it among the other bad fields, in declaration order, as serde does.
        errors: list[Exception] = []
        for name in required:
            if name not in obj:
                missing = FieldError("", "missing field")
                # As cattrs notes its own errors (add_note is Python 3.11+).
                missing.__notes__ = [AttributeValidationNote(f"missing {name}", name, None)]  # type: ignore[attr-defined]
                errors.append(missing)
        try:
            generated(obj, cls)
        except ClassValidationError as exc:
            errors.extend(exc.exceptions)
        errors.sort(key=lambda error: order.get(_attribute_of(error), len(names)))
        raise ClassValidationError(f"While structuring {cls.__name__}", errors, cls)

    order = {name: index for index, name in enumerate(names)}
    return structure_object


def _attribute_of(error: BaseException) -> str | None:
    for note in getattr(error, "__notes__", ()):
        if isinstance(note, AttributeValidationNote):
            return note.name
    return None


def _event_hook(dispatch: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    """Check the tag before cattrs' tagged-union strategy dispatches on it."""

    def structure_event(value: Any, cls: Any) -> Any:
        obj = _as_object(value)
        if "type" not in obj:
            raise FieldError("type", "missing field")
        tag = obj["type"]
        if type(tag) is not str or tag not in _EVENT_TAGS:
            reason = f"unknown variant {describe(tag)}, expected one of {_TAG_NAMES}"
            raise FieldError("type", reason)
        return dispatch(obj, cls)

    return structure_event


_EVENT_TAGS = frozenset(_TAGS.values())


def _tag_first(
    tag: str, generated: Callable[[Any], dict[str, Any]]
) -> Callable[[Any], dict[str, Any]]:
    def unstructure_event(event: Any) -> dict[str, Any]:
        out = {"type": tag}
        out.update(generated(event))
        return out

    return unstructure_event


_FIXED_UNSTRUCTURE = (datetime, timedelta, tuple[str, ...])


def _register_class(conv: cattrs.Converter, cls: type[Any]) -> None:
    # Generated functions look up the hooks of their fields' types when they
    # are made, so classes are registered after the classes they hold. A
    # float field's own converter (int to float) and validator (finite) do
    # all the work, so its JSON value goes straight in; the other converted
    # fields (datetimes, string tuples, maps) are parsed by their type's hook.
    fields = attrs.fields(attrs.resolve_types(cls))
    hooks: dict[str, Any] = {
        field.name: override(struct_hook=conv.get_structure_hook(field.type))
        for field in fields
        if field.converter is not None and field.type is not float
    }
    structure_fn: Callable[[Any, Any], Any] = make_dict_structure_fn(
        cls, conv, _cattrs_prefer_attrib_converters=True, **hooks
    )
    conv.register_structure_hook(cls, _object_hook(cls, structure_fn))
    # Without a fixed hook cattrs looks one up by each value's class, on
    # every call; the hooks of these types take their subclasses too
    # (NanoDatetime, NanoTimedelta) and the classes have none.
    unstructure_hooks: dict[str, Any] = {
        field.name: override(unstruct_hook=conv.get_unstructure_hook(field.type))
        for field in fields
        if field.type in _FIXED_UNSTRUCTURE or attrs.has(field.type)
    }
    unstructure_fn: Callable[[Any], dict[str, Any]] = make_dict_unstructure_fn(
        cls, conv, _cattrs_omit_if_default=cls is StudyConfig, **unstructure_hooks
    )
    tag = _TAGS.get(cls)
    conv.register_unstructure_hook(
        cls, unstructure_fn if tag is None else _tag_first(tag, unstructure_fn)
    )


def configure_converter(conv: cattrs.Converter) -> None:
    """Teach ``conv`` the wire format of the original Rust service.

    Rules (serde + serde_json + chrono + uuid, as the original writes them):

    * ``StoredEvalEvent`` is ``{"event_id": ..., "event": {...}}``; events are
      internally tagged, ``{"type": "<snake_case name>", <fields in declaration
      order>}``, the tag first (cattrs' tagged-union strategy). A single event
      class reads and writes the same tagged form and rejects another tag.
    * UUIDs are written lowercase hyphenated; read in the uuid crate's forms:
      hyphenated, simple (32 hex digits), ``{braced}`` and ``urn:uuid:``.
    * Datetimes are written as RFC 3339 UTC with ``Z`` and 0, 3, 6 or 9
      fraction digits, the fewest that hold the value (chrono's AutoSi).
      Read: ``YYYY-MM-DD``, ``T``/``t``/space, ``hh:mm:ss``, an optional
      fraction (kept to the nanosecond, further digits dropped as chrono
      does), then ``Z``/``z`` or ``+hh:mm``/``-hh:mm`` (converted to UTC).
      Nanoseconds below the microsecond come back as a ``NanoDatetime``. No
      offset, a leap second (``:60``) and years outside 1..9999 are errors.
    * ``avg_session_duration`` is chrono's ``[seconds, nanoseconds]``: seconds
      an i64 floored, nanoseconds 0..999999999 (-0.5 s is
      ``[-1, 500000000]``); sub-microsecond nanoseconds come back as a
      ``NanoTimedelta``; beyond ``timedelta``'s ±999999999 days is an error.
    * ``PeriodType`` is its string value. ``period_value`` is an integer in
      0..2**32-1 or null, always written, missing reads as null.
    * ``StudyConfig`` leaves out ``description`` when None, ``tags`` when
      empty and ``metadata`` when empty (``omit_if_default``); missing ones
      take their defaults. A repeated metadata key keeps its last value.
    * Every other field is required (all ``LongitudinalMetrics`` fields
      too); unknown keys are ignored; a repeated field is an error.
    * Numbers: u64 fields take integers in 0..2**64-1 (not ``3.0``, ``-0``
      or booleans); float fields take integers too and must be finite.
    * Every violation raises ``InvalidEventError`` naming the field path
      (see ``loads``); the classes themselves refuse values the original
      could not hold, so whatever exists can be written.
    """
    conv.register_structure_hook(datetime, _structure_datetime)
    conv.register_unstructure_hook(datetime, _unstructure_datetime)
    conv.register_structure_hook(timedelta, _structure_duration)
    conv.register_unstructure_hook(timedelta, _unstructure_duration)
    conv.register_structure_hook(UUID, _structure_uuid)
    conv.register_unstructure_hook(UUID, uuid_text)
    conv.register_structure_hook(PeriodType, _structure_period_type)
    conv.register_unstructure_hook(PeriodType, lambda member: member.value)
    # A list of the strings as they are (cattrs would unstructure each one).
    conv.register_unstructure_hook_func(partial(operator.eq, tuple[str, ...]), list)
    # Generic aliases and optionals are no classes: cattrs matches them by a predicate.
    for alias, hook in (
        (tuple[str, ...], _structure_texts),
        (Mapping[str, str], _structure_text_map),
        (int | None, _as_is),
        (str | None, _as_is),
    ):
        conv.register_structure_hook_func(partial(operator.eq, alias), hook)
    for scalar in (int, float, str):
        conv.register_structure_hook(scalar, _as_is)
    for cls in (TimePeriod, StudyConfig, LongitudinalMetrics, Checkpoint, *_TAGS):
        _register_class(conv, cls)
    configure_tagged_union(EvalEvent, conv, tag_generator=_TAGS.__getitem__, tag_name="type")
    conv.register_structure_hook(EvalEvent, _event_hook(conv.get_structure_hook(EvalEvent)))
    _register_class(conv, StoredEvalEvent)


def make_converter() -> cattrs.Converter:
    """Return a new converter for the wire format (see ``configure_converter``)."""
    conv = cattrs.Converter(detailed_validation=True)
    configure_converter(conv)
    return conv


converter = make_converter()


# --- errors -------------------------------------------------------------------


def _join(path: str, field: str) -> str:
    if not field:
        return path
    if field.startswith("[") or not path:
        return path + field
    return f"{path}.{field}"


def _invalid(exc: Exception) -> InvalidEventError:
    """Turn cattrs' exception groups into one message naming the first bad field's path."""
    path = ""
    while isinstance(exc, BaseValidationError):
        exc = exc.exceptions[0]
        for note in getattr(exc, "__notes__", ()):
            if isinstance(note, AttributeValidationNote):
                path = _join(path, note.name)
    if isinstance(exc, FieldError):
        path, reason = _join(path, exc.field), exc.reason
    else:
        reason = str(exc)
    return InvalidEventError(f"{path or 'top level'}: {reason}")


# --- JSON the package wrote ------------------------------------------------------
#
# The log's payloads and the projection's JSON columns hold only what
# ``dumps`` wrote from valid objects, so reading them back needs neither
# serde's strictness nor the classes' validators: orjson parses, and one
# generated function per class puts the values into their slots.

_fromisoformat = datetime.fromisoformat
# Length of what _unstructure_datetime writes with nine fraction digits.
_NANO_TIMESTAMP_LENGTH = len("2000-01-01T00:00:00.000000000Z")


def _written_datetime(text: str) -> datetime:
    # "+00:00" rather than "Z": Python 3.10's fromisoformat knows only offsets.
    if len(text) < _NANO_TIMESTAMP_LENGTH:
        return _fromisoformat(text[:-1] + "+00:00")
    return with_nanosecond(_fromisoformat(text[:26] + "+00:00"), int(text[26:29]))


def _written_duration(value: list[int]) -> timedelta:
    return duration_of(*value)


_WRITTEN_SCALARS: dict[Any, Callable[[Any], Any]] = {
    UUID: unchecked_uuid,
    datetime: _written_datetime,
    timedelta: _written_duration,
    PeriodType: _PERIOD_TYPES.__getitem__,
    tuple[str, ...]: tuple,
    # jsonb gives a float that holds an integer back as an integer (1e20 as
    # 100000000000000000000), so the float is made again.
    float: float,
}
# JSON values that already are what the field holds.
_WRITTEN_AS_PARSED = (int, str, int | None, str | None, Mapping[str, str])
_WRITTEN: dict[Any, Callable[[Any], Any]] = {}


def _written_hook(field_type: Any) -> Callable[[Any], Any] | None:
    field_type = getattr(field_type, "__supertype__", field_type)  # the NewType ids
    if field_type in _WRITTEN_AS_PARSED:
        return None
    if field_type in _WRITTEN_SCALARS:
        return _WRITTEN_SCALARS[field_type]
    return _WRITTEN[field_type]


def _written_builder(cls: type[Any]) -> Callable[[Any], Any]:
    """Generate the function building a ``cls`` from the JSON object ``dumps`` wrote."""
    namespace: dict[str, Any] = {"_make": unchecked_constructor(cls)}
    arguments = []
    for field in attrs.fields(attrs.resolve_types(cls)):
        name = field.name
        value = f"o[{name!r}]"
        hook = _written_hook(field.type)
        if hook is not None:
            namespace[f"_h_{name}"] = hook
            value = f"_h_{name}({value})"
        if name in _OPTIONAL.get(cls, ()):
            default = field.default
            if isinstance(default, attrs.Factory):  # type: ignore[arg-type]
                namespace[f"_d_{name}"] = default.factory
                value = f"({value} if {name!r} in o else _d_{name}())"
            else:
                namespace[f"_d_{name}"] = default
                value = f"({value} if {name!r} in o else _d_{name})"
        arguments.append(value)
    source = f"def build_{cls.__name__}(o):\n    return _make({', '.join(arguments)})"
    # Generated from the attrs fields, as cattrs generates its hooks.
    exec(compile(source, f"<written {cls.__qualname__}>", "exec"), namespace)
    builder: Callable[[Any], Any] = namespace[f"build_{cls.__name__}"]
    return builder


for _cls in (TimePeriod, StudyConfig, LongitudinalMetrics, Checkpoint, *_TAGS):
    _WRITTEN[_cls] = _written_builder(_cls)
_WRITTEN_EVENTS = {tag: _WRITTEN[cls] for cls, tag in _TAGS.items()}
_WRITTEN[EvalEvent] = lambda obj: _WRITTEN_EVENTS[obj["type"]](obj)
_WRITTEN[StoredEvalEvent] = _written_builder(StoredEvalEvent)
_WRITTEN[tuple[str, ...]] = tuple


def written_decoder(cls: Any) -> Callable[[Any], Any]:
    """Return a reader of JSON that ``dumps`` wrote from a ``cls``.

    ``cls`` is one of the converter's classes, ``EvalEvent`` or ``tuple[str, ...]``.

    For the package's own tables: the log's payloads and the projection's
    JSON columns (text, or jsonb already parsed by the driver). Those values
    were valid objects when written, so the reader skips serde's checks and
    the classes' validators; whatever does not have the shape ``dumps``
    writes (a row edited by hand) goes through ``loads``/``structure``
    instead, which return it or raise ``InvalidEventError``.
    """
    build = _WRITTEN[cls]

    def decode(value: Any) -> Any:
        is_text = isinstance(value, (str, bytes))
        try:
            return build(orjson.loads(value) if is_text else value)
        except (LookupError, TypeError, ValueError, OverflowError):
            return loads(value, cls) if is_text else structure(value, cls)

    return decode


# --- entry points ---------------------------------------------------------------


def unstructure(obj: Any, cls: Any = None) -> Any:
    """Return ``obj`` as JSON-compatible Python values in the wire format."""
    try:
        return converter.unstructure(obj, unstructure_as=cls)
    except (FieldError, BaseValidationError) as exc:
        raise _invalid(exc) from None


@overload
def structure(data: Any) -> StoredEvalEvent: ...
@overload
def structure(data: Any, cls: type[T]) -> T: ...
@overload
def structure(data: Any, cls: Any) -> Any: ...
def structure(data: Any, cls: Any = StoredEvalEvent) -> Any:
    """Build a ``cls`` from already-parsed JSON values (for example from jsonb)."""
    try:
        return converter.structure(data, cls)
    except (ValueError, TypeError, BaseValidationError) as exc:
        raise _invalid(exc) from None


def dumps(obj: Any, cls: Any = None) -> str:
    """Return the compact wire-format JSON of ``obj``, byte-identical to serde_json >= 1.0.147.

    orjson writes the bytes: compact, strings escaped as serde_json does
    (quote, backslash, control characters; ``\\u00XX`` lowercase; ``/``,
    U+2028/U+2029 and non-ASCII raw), u64 integers exact, and floats as
    zmij (serde_json's printer since 1.0.147) does: the shortest digits
    that round-trip, plain decimals for decimal exponents -5..15
    (``0.00001``, ``1000000000000000.0``, always with a fraction), else
    exponent form with a signed positive exponent (``1e-7``, ``1e+16``,
    ``1.5e+300``). Older serde_json (ryu) wrote ``1e16`` and ``1.5e300``;
    everything else is the same. ``loads`` reads both.
    """
    return _encode(converter.get_unstructure_hook(obj.__class__ if cls is None else cls), obj)


def encoder(cls: Any) -> Callable[[Any], str]:
    """Return ``dumps`` for values of ``cls``, with the hook of ``cls`` looked up once."""
    return partial(_encode, converter.get_unstructure_hook(cls))


def _encode(hook: Callable[[Any], Any], obj: Any) -> str:
    try:
        return orjson.dumps(hook(obj)).decode()
    except (FieldError, BaseValidationError) as exc:
        raise _invalid(exc) from None
    except orjson.JSONEncodeError as exc:
        raise InvalidEventError(f"cannot write {describe(obj)} as JSON: {exc}") from None


@overload
def loads(text: str | bytes) -> StoredEvalEvent: ...
@overload
def loads(text: str | bytes, cls: type[T]) -> T: ...
@overload
def loads(text: str | bytes, cls: Any) -> Any: ...
def loads(text: str | bytes, cls: Any = StoredEvalEvent) -> Any:
    """Parse wire-format JSON into a ``cls``; any bad input raises ``InvalidEventError``.

    Strict as serde_json: ``NaN``/``Infinity``, a repeated field, a lone
    surrogate, a number its field cannot hold are errors whose message
    starts with the field's path (``event.metrics.total_tokens: ...``).
    """
    if isinstance(text, (bytes, bytearray, memoryview)):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidEventError(f"invalid UTF-8 at byte {exc.start}") from None
    elif not isinstance(text, str):
        raise InvalidEventError(f"expected JSON text as str or bytes, got {describe(text)}")
    try:
        data = _DECODER.decode(text)
    except json.JSONDecodeError as exc:
        raise InvalidEventError(f"invalid JSON: {exc}") from None
    except RecursionError:
        raise InvalidEventError("invalid JSON: nested too deeply") from None
    return structure(data, cls)
