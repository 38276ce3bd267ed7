"""The wire format: byte-for-byte compatibility with the original Rust service."""

from __future__ import annotations

import contextlib
import json
import math
import struct
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any
from uuid import UUID

import attrs
import cattrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from evals_orm.converters import (
    configure_converter,
    converter,
    dumps,
    loads,
    make_converter,
    structure,
    unstructure,
    written_decoder,
)
from evals_orm.domain import (
    Checkpoint,
    CheckpointId,
    FieldError,
    LongitudinalMetrics,
    NanoDatetime,
    NanoTimedelta,
    PeriodType,
    StudyConfig,
    StudyId,
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

GOLDEN = Path(__file__).parent / "golden" / "rust_events.jsonl"
GOLDEN_LINES = GOLDEN.read_text(encoding="utf-8").splitlines()

EVENT_ID = "0192d5e0-8c4a-7b1e-9f00-3c2a1b4d5e6f"
STUDY = "0192d5e0-8c40-7000-8000-000000000001"
CHECKPOINT = "0192d5e0-8c51-7000-8000-0000000000c1"
U64_MAX = 2**64 - 1

# --- strategies ---------------------------------------------------------------

# Rust strings hold Unicode scalar values only: no surrogates.
texts = st.text(st.characters(codec="utf-8"), max_size=20)
uuids = st.uuids()
uuid7s = st.integers(0, 2**48 - 1).flatmap(
    lambda ms: st.integers(0, 2**74 - 1).map(
        lambda rand: UUID(
            int=(ms << 80)
            | (7 << 76)
            | ((rand >> 62) << 64)
            | (0b10 << 62)
            | (rand & ((1 << 62) - 1))
        )
    )
)
u64s = st.one_of(st.integers(0, U64_MAX), st.sampled_from([0, 1, 2**53 + 1, 2**63, U64_MAX]))
finite_floats = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([5e-324, 2.2250738585072014e-308, 1.7976931348623157e308, -0.0, 1e16, 1e-5]),
)
micros = st.one_of(
    st.just(0),
    st.integers(0, 999).map(lambda ms: ms * 1000),
    st.integers(0, 999_999),
)
# chrono stamps to the nanosecond: a third of the values carry sub-microsecond digits.
nanos = st.one_of(st.just(0), st.just(0), st.integers(1, 999))
utc_datetimes = st.builds(
    lambda dt, us, ns: NanoDatetime(
        dt.year, dt.month, dt.day, dt.hour, dt.minute, dt.second, us, timezone.utc, nanosecond=ns
    ),
    st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30)),
    micros,
    nanos,
)
timedeltas = st.timedeltas(min_value=timedelta(days=-99_999), max_value=timedelta(days=99_999))
durations = st.builds(
    lambda delta, ns: NanoTimedelta(
        delta.days * 86_400 + delta.seconds, delta.microseconds, nanosecond=ns
    ),
    timedeltas,
    nanos,
)
configs = st.builds(
    StudyConfig,
    st.none() | texts,
    st.lists(texts, max_size=4).map(tuple),
    st.dictionaries(texts, texts, max_size=4),
)
periods = st.builds(TimePeriod, utc_datetimes, utc_datetimes)
metrics = st.builds(
    LongitudinalMetrics,
    u64s,
    finite_floats,
    durations,
    u64s,
    *[finite_floats] * 7,
    u64s,
    finite_floats,
    u64s,
    finite_floats,
    finite_floats,
    periods,
)
events: st.SearchStrategy[Any] = st.one_of(
    st.builds(
        StudyCreated,
        uuids,
        texts,
        st.sampled_from(PeriodType),
        st.none() | st.integers(0, 2**32 - 1),
        configs,
    ),
    *[st.builds(cls, uuids) for cls in (StudyStarted, StudyPaused, StudyResumed, StudyStopped)],
    st.builds(
        CheckpointRecorded,
        uuids,
        uuids,
        utc_datetimes,
        metrics,
        u64s,
        st.lists(texts, max_size=4).map(tuple),
    ),
)
stored_events = st.builds(StoredEvalEvent, uuid7s, events)


def created_line(**changes: Any) -> str:
    """Return a study_created line with some event fields changed (None removes one)."""
    event: dict[str, Any] = {
        "type": "study_created",
        "id": STUDY,
        "name": "n",
        "period_type": "weekly",
        "period_value": 2,
        "config": {},
    }
    for key, value in changes.items():
        if value is None:
            del event[key]
        else:
            event[key] = value
    return json.dumps({"event_id": EVENT_ID, "event": event})


def with_timestamp(text: str) -> str:
    """Return the golden checkpoint line with its event timestamp replaced by ``text``."""
    return GOLDEN_LINES[7].replace("2024-10-28T12:00:00Z", text)


def checkpoint_line(**metric_changes: Any) -> str:
    """Return the golden checkpoint line with some metrics changed (None removes one)."""
    doc = json.loads(GOLDEN_LINES[7])
    for key, value in metric_changes.items():
        if value is None:
            del doc["event"]["metrics"][key]
        else:
            doc["event"]["metrics"][key] = value
    return json.dumps(doc)


# --- round trips ------------------------------------------------------------


@given(stored_events)
def test_stored_event_round_trips(stored: StoredEvalEvent) -> None:
    """Every stored event survives dumps then loads unchanged."""
    assert stored == loads(dumps(stored))


@given(events)
def test_each_event_round_trips_alone_and_as_union(event: Any) -> None:
    """A single event reads back as its own class and through the EvalEvent union."""
    text = dumps(event)
    assert event == loads(text, type(event))
    assert event == loads(text, EvalEvent)


@given(stored_events)
def test_dumps_is_a_fixed_point(stored: StoredEvalEvent) -> None:
    """Writing what was read gives the same bytes (the golden-line property)."""
    text = dumps(stored)
    assert text == dumps(loads(text.encode("utf-8")))


@given(stored_events)
def test_unstructure_structure_round_trip(stored: StoredEvalEvent) -> None:
    """Parsed JSON values (as jsonb returns them) structure back to the same event."""
    data = unstructure(stored)
    assert data == json.loads(dumps(stored))
    assert stored == structure(data)


@given(configs, metrics, periods, st.lists(texts).map(tuple))
def test_value_types_round_trip(
    config: StudyConfig, metric: LongitudinalMetrics, period: TimePeriod, names: tuple[str, ...]
) -> None:
    """The column values (config, metrics, period, sessions) round-trip on their own."""
    assert config == loads(dumps(config), StudyConfig)
    assert metric == loads(dumps(metric), LongitudinalMetrics)
    assert period == loads(dumps(period), TimePeriod)
    assert names == loads(dumps(names), tuple[str, ...])


@given(utc_datetimes, st.integers(-23 * 60 - 59, 23 * 60 + 59), st.integers(0, 999))
def test_offsets_and_nanoseconds_read_as_utc(dt: datetime, offset_min: int, nanos: int) -> None:
    """Any offset converts to UTC, and the nanoseconds are kept and written back."""
    dt = datetime(*dt.timetuple()[:6], dt.microsecond, timezone.utc)
    local = dt.astimezone(timezone(timedelta(minutes=offset_min)))
    if not datetime.min.replace(tzinfo=timezone.utc) < dt < datetime.max.replace(
        tzinfo=timezone.utc
    ) or not (1 <= local.year <= 9999):
        return
    sign, minutes = ("-", -offset_min) if offset_min < 0 else ("+", offset_min)
    fraction = f"{local.microsecond:06d}{nanos:03d}"
    text = (
        f"{local.year:04d}-{local.month:02d}-{local.day:02d}T{local.hour:02d}:"
        f"{local.minute:02d}:{local.second:02d}.{fraction}"
        f"{sign}{minutes // 60:02d}:{minutes % 60:02d}"
    )
    value = loads(json.dumps(text), datetime)
    assert dt == value.replace(tzinfo=timezone.utc)
    assert nanos == getattr(value, "nanosecond", 0)
    utc_text = unstructure(value)
    assert fraction.rstrip("0") == utc_text[20:-1].rstrip("0")
    assert value == loads(json.dumps(utc_text), datetime)


@given(timedeltas, st.integers(0, 999))
def test_duration_is_floored_seconds_and_positive_nanos(delta: timedelta, nanos: int) -> None:
    """Durations are [floor seconds, nanoseconds], the nanoseconds kept to the last digit."""
    seconds, nanoseconds = unstructure(delta)
    assert 0 <= nanoseconds < 1_000_000_000
    assert delta == timedelta(seconds=seconds, microseconds=nanoseconds // 1000)
    value = loads(f"[{seconds},{nanoseconds + nanos}]", timedelta)
    assert [seconds, nanoseconds + nanos] == unstructure(value)
    assert nanos == getattr(value, "nanosecond", 0)


# --- JSON the package wrote ---------------------------------------------------


def same_values(expected: Any, actual: Any) -> None:
    """Assert equal attrs objects whose fields also have the same Python types."""
    assert expected == actual
    assert type(expected) is type(actual)
    if attrs.has(type(expected)):
        for field in attrs.fields(type(expected)):
            same_values(getattr(expected, field.name), getattr(actual, field.name))


@given(stored_events)
def test_written_json_reads_back_as_loads_reads_it(stored: StoredEvalEvent) -> None:
    """What dumps wrote reads back from text, bytes or parsed values as loads reads it."""
    decode = written_decoder(StoredEvalEvent)
    text = dumps(stored)
    for value in (text, text.encode("utf-8"), json.loads(text)):
        same_values(loads(text), decode(value))
    assert text == dumps(decode(text))


@given(configs, metrics, st.lists(texts).map(tuple))
def test_written_column_values_read_back(
    config: StudyConfig, metric: LongitudinalMetrics, names: tuple[str, ...]
) -> None:
    """The projection's JSON columns (config, metrics, sessions) read back unchanged."""
    for value, cls in ((config, StudyConfig), (metric, LongitudinalMetrics)):
        text = dumps(value)
        same_values(loads(text, cls), written_decoder(cls)(text))
        assert value == written_decoder(cls)(text)
    assert names == written_decoder(tuple[str, ...])(dumps(names))


@pytest.mark.parametrize(
    "line", GOLDEN_LINES, ids=[f"line{i}" for i in range(1, len(GOLDEN_LINES) + 1)]
)
def test_written_golden_events_read_back(line: str) -> None:
    """Every golden event, as the log stores it, reads back equal, nanoseconds included."""
    stored = loads(line)
    same_values(stored.event, written_decoder(EvalEvent)(dumps(stored.event)))


@pytest.mark.parametrize(
    "text",
    [
        checkpoint_line(total_cost=3, agent_efficiency=10**30),
        GOLDEN_LINES[7].replace('Z"', '+02:00"'),
        GOLDEN_LINES[7].replace('"event_id":"', '"event_id":"{').replace('","event"', '}","event"'),
    ],
    ids=["integer-floats", "offset", "braced-uuid"],
)
def test_json_of_another_shape_is_read_by_loads(text: str) -> None:
    """JSON dumps would not write (edited by hand) is read by the strict loads instead."""
    same_values(loads(text), written_decoder(StoredEvalEvent)(text))


def test_jsonb_integers_in_float_fields_read_as_floats() -> None:
    """jsonb returns a float holding an integer (1e20) as an integer; it reads as a float."""
    data = json.loads(dumps(LongitudinalMetrics(total_cost=1e20)))
    data["total_cost"] = 10**20
    metric = written_decoder(LongitudinalMetrics)(data)
    assert (float, 1e20) == (type(metric.total_cost), metric.total_cost)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ('{"type":"study_started"}', "event.id: missing field"),
        ('{"type":"study_started","id":"nope"}', "event.id: expected a UUID string"),
        ("[", "invalid JSON"),
    ],
)
def test_broken_written_json_is_an_invalid_event_error(text: str, fragment: str) -> None:
    """A stored value broken beyond reading raises the InvalidEventError loads raises."""
    with pytest.raises(InvalidEventError, match=fragment):
        written_decoder(StoredEvalEvent)(f'{{"event_id":"{EVENT_ID}","event":{text}}}')


# --- golden lines -----------------------------------------------------------


@pytest.mark.parametrize(
    "line", GOLDEN_LINES, ids=[f"line{i}" for i in range(1, len(GOLDEN_LINES) + 1)]
)
def test_golden_line_round_trips_byte_for_byte(line: str) -> None:
    """Lines written by the Rust service come back out identical."""
    assert line == dumps(loads(line))


def test_golden_stream_covers_every_event_type() -> None:
    """The golden stream holds every event type."""
    expected = {
        "study_created",
        "study_started",
        "study_paused",
        "study_resumed",
        "study_stopped",
        "checkpoint_recorded",
    }
    assert expected == {json.loads(line)["event"]["type"] for line in GOLDEN_LINES}


NON_CANONICAL = [
    (
        '{"event":{"id":"{0192D5E0-8C40-7000-8000-000000000001}","type":"study_started",'
        '"extra":[1,{"x":null}]},"event_id":"urn:uuid:0192D5E0-8C4a-7B1E-9F00-3C2A1B4D5E6F"}',
        '{"event_id":"0192d5e0-8c4a-7b1e-9f00-3c2a1b4d5e6f",'
        '"event":{"type":"study_started","id":"0192d5e0-8c40-7000-8000-000000000001"}}',
    ),
    (
        ' {"event_id":"0192d5e08c4a7b1e9f003c2a1b4d5e6f","event":{"type":"study_stopped",'
        '"id":"0192D5E08C4070008000000000000001"}} \n',
        '{"event_id":"0192d5e0-8c4a-7b1e-9f00-3c2a1b4d5e6f",'
        '"event":{"type":"study_stopped","id":"0192d5e0-8c40-7000-8000-000000000001"}}',
    ),
    (
        '{"event_id":"0192d5e0-8c4a-7b1e-9f00-3c2a1b4d5e6f","event":{"type":"study_created",'
        '"id":"0192d5e0-8c40-7000-8000-000000000001","name":"n","period_type":"daily",'
        '"config":{"description":null,"tags":[],"metadata":{},"future":1}}}',
        '{"event_id":"0192d5e0-8c4a-7b1e-9f00-3c2a1b4d5e6f","event":{"type":"study_created",'
        '"id":"0192d5e0-8c40-7000-8000-000000000001","name":"n","period_type":"daily",'
        '"period_value":null,"config":{}}}',
    ),
    (
        '{"event_id":"0192d5e0-8c4a-7b1e-9f00-3c2a1b4d5e6f","event":{"type":"study_created",'
        '"id":"0192d5e0-8c40-7000-8000-000000000001","name":"\\u00e9\\ud83d\\ude80\\/",'
        '"period_type":"daily","period_value":3,"config":{"metadata":{"k":"1","k":"2"}}}}',
        '{"event_id":"0192d5e0-8c4a-7b1e-9f00-3c2a1b4d5e6f","event":{"type":"study_created",'
        '"id":"0192d5e0-8c40-7000-8000-000000000001","name":"é🚀/",'
        '"period_type":"daily","period_value":3,"config":{"metadata":{"k":"2"}}}}',
    ),
]


@pytest.mark.parametrize(("text", "expected"), NON_CANONICAL)
def test_non_canonical_input_is_written_canonically(text: str, expected: str) -> None:
    """Other uuid forms, key orders, defaults, escapes and extra keys normalise."""
    assert expected == dumps(loads(text))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('"2024-10-28T17:30:00+05:30"', "2024-10-28T12:00:00Z"),
        ('"2024-10-28T12:00:00-00:00"', "2024-10-28T12:00:00Z"),
        ('"2024-10-28t12:00:00z"', "2024-10-28T12:00:00Z"),
        ('"2024-10-28 12:00:00Z"', "2024-10-28T12:00:00Z"),
        ('"2024-10-28T12:00:00.123456789Z"', "2024-10-28T12:00:00.123456789Z"),
        ('"2024-10-28T12:00:00.000000001+01:00"', "2024-10-28T11:00:00.000000001Z"),
        ('"2024-10-28T12:00:00.123456000Z"', "2024-10-28T12:00:00.123456Z"),
        ('"2024-10-28T12:00:00.1Z"', "2024-10-28T12:00:00.100Z"),
        ('"2024-10-28T12:00:00.120000Z"', "2024-10-28T12:00:00.120Z"),
        ('"2024-10-28T12:00:00.000000000Z"', "2024-10-28T12:00:00Z"),
        ('"2024-10-28T12:00:00.0000019999Z"', "2024-10-28T12:00:00.000001999Z"),
        ('"2024-10-28T00:30:00+01:00"', "2024-10-27T23:30:00Z"),
    ],
)
def test_timestamp_input_forms(text: str, expected: str) -> None:
    """RFC 3339 offsets, separators and fraction lengths read as the same UTC instant."""
    assert expected == unstructure(loads(text, datetime))


@pytest.mark.parametrize(
    ("micro", "nano", "expected"),
    [
        (0, 0, "2024-01-02T03:04:05Z"),
        (120_000, 0, "2024-01-02T03:04:05.120Z"),
        (1_000, 0, "2024-01-02T03:04:05.001Z"),
        (1, 0, "2024-01-02T03:04:05.000001Z"),
        (123_400, 0, "2024-01-02T03:04:05.123400Z"),
        (0, 1, "2024-01-02T03:04:05.000000001Z"),
        (306_853, 659, "2024-01-02T03:04:05.306853659Z"),
        (999_999, 999, "2024-01-02T03:04:05.999999999Z"),
    ],
)
def test_timestamp_output_uses_0_3_6_or_9_digits(micro: int, nano: int, expected: str) -> None:
    """Timestamps are written with chrono's automatic 0, 3, 6 or 9 fraction digits."""
    values: list[datetime] = [
        NanoDatetime(2024, 1, 2, 3, 4, 5, micro, timezone.utc, nanosecond=nano)
    ]
    if not nano:
        values.append(datetime(2024, 1, 2, 3, 4, 5, micro, timezone.utc))
    assert [expected] * len(values) == [unstructure(value) for value in values]


def test_non_utc_datetime_is_written_in_utc() -> None:
    """An aware non-UTC datetime is written as the same instant with Z."""
    value = datetime(2024, 1, 2, 5, 4, 5, tzinfo=timezone(timedelta(hours=2)))
    assert '"2024-01-02T03:04:05Z"' == dumps(value)


def zmij(value: float) -> str:
    """Write a finite float as serde_json >= 1.0.147 (zmij) does: the reference for dumps.

    Python's ``repr`` prints the same shortest round-trip digits as zmij and
    ryu; only the layout differs. With ``k`` the decimal exponent of the
    first digit, zmij writes plain decimals for -5 <= k < 16 (always with a
    fraction) and ``d.ddde[+-]k`` otherwise, the exponent's sign always written.
    """
    sign = "-" if math.copysign(1.0, value) < 0 else ""
    if value == 0:
        return f"{sign}0.0"
    shortest = Decimal(repr(abs(value))).normalize()
    digits = "".join(map(str, shortest.as_tuple().digits))
    k = shortest.adjusted()
    if -5 <= k < 0:
        return f"{sign}0.{'0' * (-k - 1)}{digits}"
    if 0 <= k < 16:
        return f"{sign}{digits[: k + 1].ljust(k + 1, '0')}.{digits[k + 1 :] or '0'}"
    tail = f".{digits[1:]}" if len(digits) > 1 else ""
    return f"{sign}{digits[0]}{tail}e{'+' if k > 0 else '-'}{abs(k)}"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0.0, "0.0"),
        (-0.0, "-0.0"),
        (1.0, "1.0"),
        (100.0, "100.0"),
        (0.1, "0.1"),
        (1e-7, "1e-7"),
        (1e16, "1e+16"),
        (1e20, "1e+20"),
        (1.5e300, "1.5e+300"),
        (-1.5e-300, "-1.5e-300"),
        (1e15, "1000000000000000.0"),
        (9999999999999998.0, "9999999999999998.0"),
        (9007199254740992.0, "9007199254740992.0"),
        (123456789012345680.0, "1.2345678901234568e+17"),
        (0.0001, "0.0001"),
        (0.00001, "0.00001"),
        (0.000015, "0.000015"),
        (-0.00001234, "-0.00001234"),
        (0.000001, "1e-6"),
        (5e-324, "5e-324"),
        (1.7976931348623157e308, "1.7976931348623157e+308"),
        (2.2250738585072014e-308, "2.2250738585072014e-308"),
        (0.3333333333333333, "0.3333333333333333"),
    ],
)
def test_floats_are_written_as_serde_json_1_0_147_does(value: float, expected: str) -> None:
    """Floats use zmij's layout: plain from 1e-5 to below 1e16, else exponents with a sign."""
    assert expected == zmij(value)
    assert (
        expected
        == dumps(LongitudinalMetrics(total_cost=value)).split('"total_cost":')[1].split(",")[0]
    )


def _double(bits: int) -> float:
    return float(struct.unpack("<d", struct.pack("<Q", bits))[0])


# Any sign, exponent (subnormals included) and mantissa, and integral values,
# which zmij writes with ".0" up to 1e16 and as exponents beyond.
doubles = st.one_of(
    st.integers(0, 2**64 - 1).map(_double).filter(math.isfinite),
    st.integers(0, 2**52 - 1).map(_double),
    st.integers(-(2**70), 2**70).map(float),
    st.integers(-400, 400).map(lambda exponent: float(f"1e{exponent}")),
    st.floats(allow_nan=False, allow_infinity=False),
)
FLOAT_FIELDS = [
    field.name for field in attrs.fields(LongitudinalMetrics) if str(field.type) == "float"
]


@settings(max_examples=3000)
@given(st.lists(doubles, min_size=len(FLOAT_FIELDS), max_size=len(FLOAT_FIELDS)))
def test_float_writer_agrees_with_the_zmij_reference(values: list[float]) -> None:
    """dumps writes every float as the reference zmij layout does, and reads it back to the bits."""
    metric = LongitudinalMetrics(**dict(zip(FLOAT_FIELDS, values, strict=True)))  # type: ignore[arg-type]
    written = json.loads(dumps(metric), parse_float=str)
    for name, value in zip(FLOAT_FIELDS, values, strict=True):
        assert zmij(value) == written[name]
        assert struct.pack("<d", value) == struct.pack("<d", float(written[name]))


@pytest.mark.parametrize("text", ["1e16", "1e+16", "1E16", "1.0e16", "10000000000000000", "1e016"])
def test_both_exponent_forms_read_back(text: str) -> None:
    """loads reads the old ryu form, the zmij form and any other JSON number alike."""
    event = loads(checkpoint_line().replace("0.75", text)).event
    assert isinstance(event, CheckpointRecorded)
    assert 1e16 == event.metrics.session_success_rate


def test_strings_are_escaped_as_serde_json_does() -> None:
    """Only quote, backslash and control characters are escaped; DEL and non-ASCII are raw."""
    value = '"\\\n\r\t\b\f\x00\x1f\x7f\u2028é🚀'
    assert '"\\"\\\\\\n\\r\\t\\b\\f\\u0000\\u001f\x7f\u2028é🚀"' == dumps((value,))[1:-1]


def test_study_config_omits_empty_parts() -> None:
    """StudyConfig leaves out a None description, empty tags and empty metadata."""
    assert "{}" == dumps(StudyConfig())
    assert '{"description":"d","tags":["t"],"metadata":{"k":"v"}}' == dumps(
        StudyConfig("d", ("t",), {"k": "v"})
    )


def test_checkpoint_value_uses_the_event_field_layout() -> None:
    """A Checkpoint writes the CheckpointRecorded fields without the tag."""
    event = loads(GOLDEN_LINES[7]).event
    assert isinstance(event, CheckpointRecorded)
    checkpoint = event.to_checkpoint()
    text = dumps(checkpoint)
    assert json.loads(GOLDEN_LINES[7])["event"] == {"type": "checkpoint_recorded"} | json.loads(
        text
    )
    assert checkpoint == loads(text, Checkpoint)


def test_missing_period_value_reads_as_null() -> None:
    """A study_created without period_value has period_value None."""
    event = loads(created_line(period_value=None)).event
    assert isinstance(event, StudyCreated)
    assert event.period_value is None


def test_float_fields_accept_integers() -> None:
    """A float field given a JSON integer, even a huge one, reads as a float."""
    stored = loads(checkpoint_line(total_cost=3, agent_efficiency=10**30))
    assert isinstance(stored.event, CheckpointRecorded)
    assert (3.0, 1e30) == (stored.event.metrics.total_cost, stored.event.metrics.agent_efficiency)


def test_bytes_input_is_read_as_utf8() -> None:
    """loads accepts UTF-8 bytes."""
    assert loads(GOLDEN_LINES[2]) == loads(GOLDEN_LINES[2].encode("utf-8"))


def test_converter_is_its_own() -> None:
    """The module converter is a configured cattrs.Converter, not the global one."""
    assert isinstance(converter, cattrs.Converter)
    assert converter is not cattrs.global_converter
    fresh = cattrs.Converter()
    configure_converter(fresh)
    stored = loads(GOLDEN_LINES[0])
    assert unstructure(stored) == fresh.unstructure(stored) == make_converter().unstructure(stored)


def test_single_event_class_rejects_another_tag() -> None:
    """Loading as one event class requires that class's tag."""
    with pytest.raises(InvalidEventError, match="type: expected `study_started`"):
        loads(f'{{"type":"study_paused","id":"{STUDY}"}}', StudyStarted)


# --- bad input --------------------------------------------------------------

BAD_INPUTS: list[tuple[str | bytes, str]] = [
    ("", "invalid JSON"),
    ("{", "invalid JSON"),
    ("nope", "invalid JSON"),
    (GOLDEN_LINES[0] + "x", "invalid JSON"),
    (b"\xff" + GOLDEN_LINES[0].encode(), "invalid UTF-8"),
    (b"\xef\xbb\xbf" + GOLDEN_LINES[0].encode(), "invalid JSON"),
    ("[]", "top level: expected an object, got array"),
    ("null", "top level: expected an object, got null"),
    ('"x"', "top level: expected an object"),
    ("{}", "event_id: missing field"),
    (f'{{"event_id":"{EVENT_ID}"}}', "event: missing field"),
    (f'{{"event_id":"{EVENT_ID}","event":[]}}', "event: expected an object"),
    (f'{{"event_id":"{EVENT_ID}","event":{{"id":"{STUDY}"}}}}', "event.type: missing field"),
    (created_line(type="study_deleted"), "event.type: unknown variant"),
    (created_line(type="StudyCreated"), "event.type: unknown variant"),
    (created_line(type=1), "event.type: unknown variant integer 1"),
    (
        created_line().replace(EVENT_ID, "c232ab00-9414-11ec-b3c8-9f6bdeced846"),
        "event_id: must be a UUID of version 7",
    ),
    (created_line().replace(EVENT_ID, "0192d5e0-8c4a-4b1e-9f00-3c2a1b4d5e6f"), "version 7"),
    (created_line().replace(EVENT_ID, "0192d5e0-8c4a-7b1e-1f00-3c2a1b4d5e6f"), "version 7"),
    (created_line().replace(EVENT_ID, "not-a-uuid"), "event_id: expected a UUID string"),
    (created_line().replace(EVENT_ID, EVENT_ID[:-1]), "event_id: expected a UUID string"),
    (created_line().replace(EVENT_ID, EVENT_ID + "0"), "event_id: expected a UUID string"),
    (created_line().replace(EVENT_ID, EVENT_ID.replace("-", "", 1)), "event_id: expected a UUID"),
    (created_line().replace(f'"{EVENT_ID}"', "1"), "event_id: expected a UUID string, got int"),
    (created_line(id="0192d5e0-8c40-7000-8000-00000000000g"), "event.id: expected a UUID"),
    (created_line(id="URN:UUID:" + STUDY), "event.id: expected a UUID"),
    (created_line(name=None), "event.name: missing field"),
    (created_line(name=5), "event.name: expected a string, got integer 5"),
    (
        created_line().replace('"name": "n"', '"name": null'),
        "event.name: expected a string, got null",
    ),
    (created_line(name="\ud800"), "event.name: lone surrogate U+D800"),
    (created_line(name="\udc00x"), "event.name: lone surrogate U+DC00"),
    (created_line(period_type="Weekly"), "event.period_type: unknown variant"),
    (created_line(period_type="yearly"), "event.period_type: unknown variant"),
    (created_line(period_type=None), "event.period_type: missing field"),
    (created_line(period_value=-1), "event.period_value: must be null or an integer"),
    (created_line(period_value=2**32), "event.period_value: must be null or an integer"),
    (created_line(period_value=2.0), "event.period_value: must be null or an integer"),
    (created_line(period_value=True), "event.period_value: must be null or an integer"),
    (created_line(period_value="2"), "event.period_value: must be null or an integer"),
    (created_line(config=None), "event.config: missing field"),
    (created_line(config=[]), "event.config: expected an object"),
    (created_line(config={"tags": None}), "event.config.tags: expected an array"),
    (created_line(config={"tags": "a"}), "event.config.tags: expected an array"),
    (created_line(config={"tags": ["a", 1]}), "event.config.tags[1]: expected a string"),
    (created_line(config={"description": 1}), "event.config.description: expected a string"),
    (created_line(config={"metadata": None}), "event.config.metadata: expected an object"),
    (created_line(config={"metadata": {"k": 1}}), "event.config.metadata.k: expected a string"),
    (created_line(config={"metadata": {"\udfff": "v"}}), "event.config.metadata"),
    (
        created_line().replace('"name": "n"', '"name": "n", "name": "m"'),
        "event.name: duplicate field `name`",
    ),
    (
        created_line().replace('"type": "study_created"', '"type": "x", "type": "study_created"'),
        "event.type: duplicate field `type`",
    ),
    (
        '{"event_id":"%s","event_id":"%s","event":{}}' % (EVENT_ID, EVENT_ID),  # noqa: UP031
        "event_id: duplicate field",
    ),
    (
        checkpoint_line(total_tokens=-1),
        f"event.metrics.total_tokens: must be an integer in 0..{U64_MAX}, got integer -1",
    ),
    (checkpoint_line(total_tokens=2**64), "event.metrics.total_tokens: must be an integer"),
    (
        checkpoint_line(total_tokens=10**30),
        f"event.metrics.total_tokens: must be an integer in 0..{U64_MAX}, got number 1e+30",
    ),
    (checkpoint_line(total_tokens=3.0), "event.metrics.total_tokens: must be an integer"),
    (checkpoint_line(total_tokens=True), "got boolean True"),
    (checkpoint_line(total_tokens="3"), "event.metrics.total_tokens: must be an integer"),
    (checkpoint_line(total_tokens=None), "event.metrics.total_tokens: missing field"),
    (
        checkpoint_line().replace('"tasks_completed": 40', '"tasks_completed": -0'),
        "tasks_completed",
    ),
    (
        checkpoint_line().replace('"tasks_completed": 40', '"tasks_completed": 4e1'),
        "tasks_completed",
    ),
    (checkpoint_line(period=None), "event.metrics.period: missing field"),
    (checkpoint_line(session_success_rate="0.5"), "session_success_rate: must be a finite number"),
    (checkpoint_line(session_success_rate=False), "session_success_rate: must be a finite"),
    (checkpoint_line(session_success_rate=None), "session_success_rate: missing field"),
    (checkpoint_line().replace("0.75", "NaN"), "invalid JSON: NaN is not a JSON value"),
    (checkpoint_line().replace("0.75", "Infinity"), "invalid JSON: Infinity"),
    (checkpoint_line().replace("0.75", "-Infinity"), "invalid JSON: -Infinity"),
    (
        checkpoint_line().replace("0.75", "1e400"),
        "event.metrics.session_success_rate: must be a finite number, got float inf",
    ),
    (
        checkpoint_line().replace("0.75", "1" * 400),
        "event.metrics.session_success_rate: must be a finite number",
    ),
    (checkpoint_line(avg_session_duration=[1]), "avg_session_duration: expected [seconds,"),
    (checkpoint_line(avg_session_duration=[1, 2, 3]), "avg_session_duration: expected"),
    (checkpoint_line(avg_session_duration={"secs": 1, "nanos": 0}), "avg_session_duration"),
    (checkpoint_line(avg_session_duration=[1, 10**9]), "avg_session_duration[1]: nanoseconds"),
    (checkpoint_line(avg_session_duration=[1, -1]), "avg_session_duration[1]: nanoseconds"),
    (checkpoint_line(avg_session_duration=[1.5, 0]), "avg_session_duration[0]: seconds"),
    (checkpoint_line(avg_session_duration=[2**63, 0]), "avg_session_duration[0]: seconds"),
    (
        checkpoint_line(avg_session_duration=[2**62, 0]),
        "event.metrics.avg_session_duration: duration of 4611686018427387904 s is out of range"
        " (a timedelta holds ±999999999 days)",
    ),
    (
        with_timestamp("2016-12-31T23:59:60Z"),
        "event.timestamp: leap second in '2016-12-31T23:59:60Z':"
        " Python datetimes hold seconds 0..59",
    ),
    (with_timestamp("2016-12-31T23:59:60.500Z"), "event.timestamp: leap second"),
    (
        with_timestamp("0000-12-31T23:59:59Z"),
        "event.timestamp: timestamp '0000-12-31T23:59:59Z' is outside the years 1..9999",
    ),
    (with_timestamp("9999-12-31T23:59:59-00:01"), "event.timestamp: timestamp"),
    (with_timestamp("9999-12-31T23:59:59-00:01"), "outside the years 1..9999"),
    (checkpoint_line(period={"start": "2024-01-01T00:00:00Z"}), "metrics.period.end: missing"),
    (checkpoint_line(period=[]), "event.metrics.period: expected an object"),
    (
        with_timestamp("2024-10-28T12:00:00"),
        "event.timestamp: expected an RFC 3339 timestamp with an offset",
    ),
    (with_timestamp("2024-10-28"), "event.timestamp"),
    (
        with_timestamp("2024-02-30T12:00:00Z"),
        "day is out of range",
    ),
    (
        with_timestamp("2024-13-01T12:00:00Z"),
        "event.timestamp: invalid",
    ),
    (
        with_timestamp("2024-10-28T24:00:00Z"),
        "event.timestamp: invalid",
    ),
    (with_timestamp("2024-10-28T12:00:00.Z"), "event.timestamp"),
    (
        with_timestamp("2024-10-28T12:00:00+24:00"),
        "event.timestamp: invalid",
    ),
    (
        with_timestamp("2024-10-28T12:00:00+01:60"),
        "offset out of range",
    ),
    (
        with_timestamp("2024-10-28T12:00:00+0100"),
        "event.timestamp",
    ),
    (
        with_timestamp("2024-10-28T12:00:00Z\\n"),
        "event.timestamp",
    ),
    (
        with_timestamp("0001-01-01T00:00:00+01:00"),
        "event.timestamp: timestamp '0001-01-01T00:00:00+01:00' is outside the years 1..9999",
    ),
    (
        with_timestamp("").replace('""', "1730116800"),
        "event.timestamp: expected an RFC 3339 timestamp string",
    ),
    (
        GOLDEN_LINES[7].replace('"session-2"', "null"),
        "event.sessions_included[1]: expected a string",
    ),
    (
        GOLDEN_LINES[7].replace("18446744073709551615,", "18446744073709551616,"),
        "event.metrics.total_tokens",
    ),
    (
        GOLDEN_LINES[7].replace(',"events_analyzed":18446744073709551615', ""),
        "event.events_analyzed: missing field",
    ),
    ("[" * 100_000 + "]" * 100_000, "invalid JSON"),
]


@pytest.mark.parametrize(("text", "fragment"), BAD_INPUTS)
def test_bad_input_raises_invalid_event_error(text: str | bytes, fragment: str) -> None:
    """Malformed input raises InvalidEventError naming the field and the problem."""
    with pytest.raises(InvalidEventError) as info:
        loads(text)
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    ("text", "cls", "fragment"),
    [
        ('"2024-01-01T00:00:00Z"', tuple[str, ...], "top level: expected an array of strings"),
        ("[1]", tuple[str, ...], "[0]: expected a string"),
        ("{}", LongitudinalMetrics, "sessions_completed: missing field"),
        ('{"start":"x","end":"y"}', TimePeriod, "start: expected an RFC 3339"),
        ('{"tags":[1]}', StudyConfig, "tags[0]: expected a string"),
        (f'{{"id":"{STUDY}"}}', StudyStarted, "type: missing field"),
        ("[1,2]", datetime, "top level: expected an RFC 3339 timestamp string"),
    ],
)
def test_bad_value_type_input_raises(text: str, cls: Any, fragment: str) -> None:
    """Value types reject bad input with InvalidEventError too."""
    with pytest.raises(InvalidEventError) as info:
        loads(text, cls)
    assert fragment in str(info.value)


def test_non_text_input_is_rejected() -> None:
    """loads of something that is neither str nor bytes raises InvalidEventError."""
    with pytest.raises(InvalidEventError, match="expected JSON text"):
        loads(42)  # type: ignore[call-overload]


JUNK = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | texts,
    lambda inner: st.lists(inner) | st.dictionaries(texts, inner),
    max_leaves=10,
)


@given(JUNK, st.sampled_from(["event_id", "event", "type", "metrics", "period", "id", "name"]))
def test_any_mutation_raises_only_invalid_event_error(junk: Any, key: str) -> None:
    """Replacing any field of a valid document by junk either loads or raises InvalidEventError."""
    doc = json.loads(GOLDEN_LINES[7])
    targets = [doc, doc["event"], doc["event"]["metrics"], doc["event"]["metrics"]["period"]]
    for target in targets:
        if key in target:
            target[key] = junk
    try:
        text = json.dumps(doc)
    except ValueError:
        return
    with contextlib.suppress(InvalidEventError):
        loads(text)


# --- invalid objects ---------------------------------------------------------

BASE_METRICS = LongitudinalMetrics()
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


@pytest.mark.parametrize(
    ("build", "fragment"),
    [
        (lambda: LongitudinalMetrics(total_cost=math.nan), "total_cost: must be a finite number"),
        (lambda: LongitudinalMetrics(total_cost=math.inf), "total_cost: must be a finite number"),
        (lambda: LongitudinalMetrics(total_cost=10**400), "total_cost: must be a finite number"),
        (lambda: LongitudinalMetrics(total_tokens=-1), "total_tokens: must be an integer in 0.."),
        (lambda: LongitudinalMetrics(total_tokens=2**64), "total_tokens: must be an integer"),
        (lambda: LongitudinalMetrics(total_tokens=True), "total_tokens: must be an integer"),
        (lambda: LongitudinalMetrics(total_tokens=1.0), "total_tokens: must be an integer"),  # type: ignore[arg-type]
        (lambda: LongitudinalMetrics(period=None), "period: expected TimePeriod"),  # type: ignore[arg-type]
        (lambda: StudyConfig(description=1), "description: expected a string"),  # type: ignore[arg-type]
        (lambda: StudyConfig(tags=("\ud800",)), "tags[0]: lone surrogate"),
        (lambda: StudyConfig(tags="ab"), "tags: expected a sequence of strings"),
        (lambda: StudyCreated(StudyId(UUID(STUDY)), "n", PeriodType.DAILY, -1), "period_value"),
        (lambda: StudyCreated(StudyId(UUID(STUDY)), "n", PeriodType.DAILY, 2**32), "period_value"),
        (
            lambda: StudyCreated(StudyId(UUID(STUDY)), "n", "daily"),  # type: ignore[arg-type]
            "period_type: expected PeriodType",
        ),
        (lambda: StudyStarted(STUDY), "id: expected UUID"),  # type: ignore[arg-type]
        (
            lambda: CheckpointRecorded(
                CheckpointId(UUID(CHECKPOINT)),
                StudyId(UUID(STUDY)),
                datetime(2024, 1, 1, tzinfo=timezone.utc),
                BASE_METRICS,
                -5,
            ),
            "events_analyzed: must be an integer",
        ),
        (
            lambda: CheckpointRecorded(
                CheckpointId(UUID(CHECKPOINT)),
                StudyId(UUID(STUDY)),
                datetime(2024, 1, 1, tzinfo=timezone.utc),
                sessions_included=("a", 1),  # type: ignore[arg-type]
            ),
            "sessions_included[1]: expected a string",
        ),
        (lambda: TimePeriod(datetime(2024, 1, 1), EPOCH), "start: must be a timezone-aware"),
    ],
)
def test_objects_refuse_values_the_original_cannot_hold(
    build: Callable[[], object], fragment: str
) -> None:
    """NaN, out-of-range ints, wrong types: the object is never built, so dumps never sees it."""
    with pytest.raises(FieldError) as info:
        build()
    assert fragment in str(info.value)


def test_dumps_refuses_a_value_it_cannot_write() -> None:
    """A value outside the wire format raises InvalidEventError, not an encoder error."""
    with pytest.raises(InvalidEventError, match="cannot write"):
        dumps(object())
