"""UUIDv7 ids and their times: uuid7, uuid7_at, StoredEvalEvent.new and occurred_at."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from uuid import UUID

import pytest
from hypothesis import given
from hypothesis import strategies as st

from evals_orm import StoredEvalEvent, StudyId, StudyStarted, uuid7, uuid7_at
from evals_orm.events import uuid7_time

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
    stored = StoredEvalEvent.new(StudyStarted(StudyId(uuid7())))
    after = datetime.now(UTC)
    assert 7 == stored.event_id.version
    assert before <= stored.occurred_at <= after
    assert UTC == stored.occurred_at.tzinfo


@given(moments, random_bits)
def test_uuid7_at_carries_the_moment_to_the_millisecond(moment: datetime, bits: int) -> None:
    value = uuid7_at(moment, bits)
    assert (7, "specified in RFC 4122") == (value.version, value.variant)
    assert _truncated_to_ms(moment) == uuid7_time(value)
    assert value == StoredEvalEvent(value, StudyStarted(StudyId(value))).event_id


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
    stored = StoredEvalEvent(beyond, StudyStarted(StudyId(beyond)))
    with pytest.raises(ValueError, match="after the year 9999"):
        stored.occurred_at  # noqa: B018 - the property raises
