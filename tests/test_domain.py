"""Domain types: UUIDv7 ids and their times, nanosecond datetimes, validation on construction."""

from __future__ import annotations

import copy
import math
import pickle
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from uuid import UUID

import pytest
from hypothesis import given
from hypothesis import strategies as st

from evals_orm import PeriodType, StoredEvalEvent, StudyStarted, uuid7, uuid7_at
from evals_orm.domain import (
    Checkpoint,
    FieldError,
    LongitudinalMetrics,
    NanoDatetime,
    NanoTimedelta,
    StudyConfig,
    TimePeriod,
    as_datetime,
    duration_of,
    unchecked_constructor,
    unchecked_uuid,
    with_nanosecond,
)
from evals_orm.events import CheckpointRecorded, StudyCreated, StudyPaused, uuid7_time

UTC = timezone.utc
moments = st.datetimes(min_value=datetime(1970, 1, 1), timezones=st.timezones()).filter(
    lambda moment: moment.astimezone(UTC).year >= 1970
)
random_bits = st.integers(0, 2**74 - 1)


def _truncated_to_ms(moment: datetime) -> datetime:
    utc = moment.astimezone(UTC)
    return utc.replace(microsecond=utc.microsecond // 1000 * 1000)


def test_uuid7_is_version_7_and_increasing() -> None:
    ids = [uuid7() for _ in range(1000)]
    assert {7} == {value.version for value in ids}
    assert ids == sorted(ids)
    assert len(ids) == len(set(ids))


def test_new_stamps_the_event_with_the_current_time() -> None:
    before = datetime.now(UTC) - timedelta(milliseconds=1)
    stored = StoredEvalEvent.new(StudyStarted(uuid7()))
    after = datetime.now(UTC)
    assert 7 == stored.event_id.version
    assert before <= stored.occurred_at <= after
    assert UTC == stored.occurred_at.tzinfo


@given(moments, random_bits)
def test_uuid7_at_carries_the_moment_to_the_millisecond(moment: datetime, bits: int) -> None:
    value = uuid7_at(moment, bits)
    assert (7, "specified in RFC 4122") == (value.version, value.variant)
    assert _truncated_to_ms(moment) == uuid7_time(value)
    assert value == StoredEvalEvent(value, StudyStarted(value)).event_id


@given(moments, random_bits, random_bits)
def test_ids_of_one_millisecond_sort_by_their_random_bits(
    moment: datetime, first: int, second: int
) -> None:
    assert (first < second) == (uuid7_at(moment, first) < uuid7_at(moment, second))


def test_uuid7_at_draws_random_bits_when_not_given() -> None:
    moment = datetime(2026, 1, 1, tzinfo=UTC)
    assert uuid7_at(moment) != uuid7_at(moment)
    # 2026-01-01T00:00:00Z is 1_767_225_600_000 ms = 0x019b76daa800.
    assert UUID("019b76da-a800-7000-8000-000000000001") == uuid7_at(moment, 1)


@pytest.mark.parametrize(
    ("moment", "bits", "error", "fragment"),
    [
        (datetime(2026, 1, 1), 0, ValueError, "naive"),
        (datetime(1969, 12, 31, 23, 59, tzinfo=UTC), 0, ValueError, "before 1970"),
        (datetime(2026, 1, 1, tzinfo=UTC), -1, ValueError, "random_bits"),
        (datetime(2026, 1, 1, tzinfo=UTC), 2**74, ValueError, "random_bits"),
        ("2026-01-01", 0, TypeError, "moment must be a datetime"),
    ],
)
def test_uuid7_at_rejects_what_no_uuid7_can_carry(
    moment: object, bits: int, error: type[Exception], fragment: str
) -> None:
    with pytest.raises(error, match=fragment):
        uuid7_at(moment, bits)  # type: ignore[arg-type]


def test_a_time_after_the_year_9999_is_a_clear_value_error() -> None:
    last = uuid7_at(datetime.max.replace(tzinfo=UTC), 2**74 - 1)
    assert datetime(9999, 12, 31, 23, 59, 59, 999000, tzinfo=UTC) == uuid7_time(last)
    beyond = UUID(int=last.int + (1 << 80))
    stored = StoredEvalEvent(beyond, StudyStarted(beyond))
    with pytest.raises(ValueError, match="after the year 9999"):
        stored.occurred_at  # noqa: B018 - the property raises


def test_nano_types_compare_and_hash_with_their_nanoseconds() -> None:
    """NanoDatetime/NanoTimedelta order and hash by the nanosecond; 0 equals the plain type."""
    plain = datetime(2024, 1, 1, 0, 0, 0, 5, timezone.utc)
    later = NanoDatetime(2024, 1, 1, 0, 0, 0, 5, timezone.utc, nanosecond=1)
    assert plain < later
    assert later > plain
    assert plain != later
    assert plain == NanoDatetime(2024, 1, 1, 0, 0, 0, 5, timezone.utc)
    assert hash(plain) == hash(NanoDatetime(2024, 1, 1, 0, 0, 0, 5, timezone.utc))
    assert later < datetime(2024, 1, 1, 0, 0, 0, 6, timezone.utc)
    assert len({plain, later}) == 2
    assert copy.deepcopy(later) == later
    assert pickle.loads(pickle.dumps(later)) == later
    short = timedelta(microseconds=5)
    longer = NanoTimedelta(0, 5, nanosecond=1)
    assert short < longer
    assert longer > short
    assert short != longer
    assert short == NanoTimedelta(0, 5)
    assert pickle.loads(pickle.dumps(longer)) == longer
    assert len({short, longer}) == 2
    with pytest.raises(ValueError, match=r"nanosecond must be in 0\.\.999"):
        NanoTimedelta(0, nanosecond=1000)


def test_nano_datetime_keeps_its_nanoseconds_across_time_zones_only() -> None:
    """astimezone keeps the nanoseconds; replace and arithmetic drop them."""
    value = NanoDatetime(2024, 1, 1, 0, 0, 0, 5, timezone.utc, nanosecond=7)
    assert 7 == value.nanosecond
    local = value.astimezone(timezone(timedelta(hours=2)))
    assert (2, 7) == (local.hour, local.nanosecond)
    assert value == TimePeriod(local, local).start
    assert 0 == value.replace(second=1).nanosecond
    assert datetime(2024, 1, 1, 0, 0, 1, 5, timezone.utc) == value + timedelta(seconds=1)


@given(st.datetimes(timezones=st.sampled_from([None, UTC])), st.integers(0, 999))
def test_with_nanosecond_is_the_moment_with_its_nanoseconds(moment: datetime, nano: int) -> None:
    """with_nanosecond builds what NanoDatetime's constructor builds; as_datetime undoes it."""
    fields = (moment.year, moment.month, moment.day, moment.hour, moment.minute, moment.second)
    expected = NanoDatetime(*fields, moment.microsecond, moment.tzinfo, nanosecond=nano)
    actual = with_nanosecond(moment, nano)
    assert (type(expected), expected, expected.tzinfo) == (type(actual), actual, actual.tzinfo)
    assert nano == actual.nanosecond
    with pytest.raises(ValueError, match=r"nanosecond must be in 0\.\.999"):
        with_nanosecond(moment, 1000)
    plain = as_datetime(actual)
    assert (datetime, moment, moment.tzinfo) == (type(plain), plain, plain.tzinfo)
    assert as_datetime(moment) is moment


@given(st.integers(-(10**12), 10**12), st.integers(0, 999_999_999))
def test_duration_of_is_chronos_seconds_and_nanoseconds(seconds: int, nanos: int) -> None:
    """duration_of holds exactly seconds + nanoseconds, as a NanoTimedelta only below the µs."""
    micro, nano = divmod(nanos, 1000)
    actual = duration_of(seconds, nanos)
    assert NanoTimedelta(seconds, micro, nanosecond=nano) == actual
    assert (NanoTimedelta if nano else timedelta) is type(actual)
    assert nano == getattr(actual, "nanosecond", 0)
    assert timedelta(seconds=seconds, microseconds=micro) == actual - NanoTimedelta(0)


def test_float_fields_take_integers_and_lifecycle_events_share_study_id() -> None:
    """An int rate becomes a float; every lifecycle event answers study_id with its id."""
    assert 3.0 == LongitudinalMetrics(total_cost=3).total_cost
    assert isinstance(LongitudinalMetrics(total_cost=3).total_cost, float)
    study = uuid7()
    assert study == StudyPaused(study).study_id


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: LongitudinalMetrics(total_cost=math.nan), "total_cost: must be a finite number"),
        (lambda: LongitudinalMetrics(tasks_completed=-1), "tasks_completed: must be an integer"),
        (lambda: TimePeriod(datetime(2024, 1, 1)), "start: must be a timezone-aware datetime"),
        (lambda: StudyConfig(tags=("a", 1)), "tags[1]: expected a string, got integer 1"),  # type: ignore[arg-type]
        (
            lambda: CheckpointRecorded(
                uuid7(),
                uuid7(),
                datetime.now(UTC),
                sessions_included=(1,),  # type: ignore[arg-type]
            ),
            "sessions_included[0]: expected a string",
        ),
        (
            lambda: StudyCreated(uuid7(), "n", "daily"),  # type: ignore[arg-type]
            "period_type: expected PeriodType",
        ),
    ],
)
def test_invalid_values_are_refused_naming_the_field(
    build: Callable[[], object], message: str
) -> None:
    """Construction validates: a FieldError (a ValueError) names the field, never another one."""
    with pytest.raises(FieldError) as info:
        build()
    assert str(info.value).startswith(message)


@given(st.uuids())
def test_unchecked_uuid_is_the_uuid_of_its_text(value: UUID) -> None:
    """An unchecked UUID equals, hashes, prints and pickles as the UUID its text names."""
    for text in (str(value), value.hex):
        read = unchecked_uuid(text)
        assert (value, hash(value), str(value)) == (read, hash(read), str(read))
        assert value == pickle.loads(pickle.dumps(read))


def test_unchecked_constructor_fills_the_fields_without_checking_them() -> None:
    """The unchecked constructor builds an equal object from valid fields, and checks nothing."""
    fields = (uuid7(), uuid7(), datetime(2024, 1, 1, tzinfo=UTC), LongitudinalMetrics(), 7, ("s",))
    checkpoint = unchecked_constructor(Checkpoint)(*fields)
    assert Checkpoint(*fields) == checkpoint
    assert hash(Checkpoint(*fields)) == hash(checkpoint)
    assert -1 == unchecked_constructor(Checkpoint)(*fields[:4], -1, ()).events_analyzed


def test_ids_convert_to_their_new_types_from_plain_uuids() -> None:
    """Events and checkpoints take plain UUIDs for their ids (StudyId is a NewType of UUID)."""
    study, checkpoint = uuid7(), uuid7()
    recorded = CheckpointRecorded(checkpoint, study, datetime(2024, 1, 1, tzinfo=UTC))
    assert (checkpoint, study) == (recorded.id, recorded.study_id)
    assert study == StudyCreated(study, "n", PeriodType.DAILY).id
