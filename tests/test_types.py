"""Column types: how each backend stores timestamps, UUIDs, JSON and unsigned integers."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from uuid import UUID

import pytest
import sqlalchemy as sa
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy.dialects.sqlite.base import SQLiteDialect
from sqlalchemy.orm import Session

from evals_orm import dumps
from evals_orm.domain import NanoDatetime, NanoTimedelta, StudyConfig, TimePeriod, uuid7
from evals_orm.models import CheckpointRow, StudyRow
from evals_orm.types import GUID, UInt32, UInt64, UTCDateTime, format_utc_text

from support import UTC, checkpoint_row, metrics, raw_rows, seed, study_row

U64_VALUES = (0, 1, 2**31, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1)
CEST = timezone(timedelta(hours=2))


def _is_sqlite(engine: sa.Engine) -> bool:
    return engine.dialect.name == "sqlite"


def _is_mysql(engine: sa.Engine) -> bool:
    return engine.dialect.name in ("mysql", "mariadb")


def _json_value(text: str) -> object:
    return json.loads(text, parse_float=Decimal, parse_int=Decimal)


def test_timestamps_are_fixed_width_utc_text(migrated: sa.Engine) -> None:
    """SQLite/libSQL store `YYYY-MM-DDTHH:MM:SS.ffffffZ` in UTC; PostgreSQL a timestamptz.

    MariaDB stores the UTC wall time in a DATETIME(6), which has no zone.
    """
    study = study_row(
        created_at=datetime(2024, 3, 1, 14, 0, tzinfo=CEST),
        started_at=datetime(2024, 3, 1, 12, 0, 0, 5, tzinfo=UTC),
        stopped_at=datetime(9, 1, 2, 3, 4, 5, 999999, tzinfo=UTC),
    )
    seed(migrated, [study])

    actual = raw_rows(migrated, "SELECT created_at, started_at, stopped_at FROM studies")
    expected: list[tuple[object, ...]]
    if _is_sqlite(migrated):
        expected = [
            (
                "2024-03-01T12:00:00.000000Z",
                "2024-03-01T12:00:00.000005Z",
                "0009-01-02T03:04:05.999999Z",
            )
        ]
    else:
        zone = None if _is_mysql(migrated) else UTC
        expected = [
            (
                datetime(2024, 3, 1, 12, tzinfo=zone),
                datetime(2024, 3, 1, 12, 0, 0, 5, tzinfo=zone),
                datetime(9, 1, 2, 3, 4, 5, 999999, tzinfo=zone),
            )
        ]
    assert expected == actual


class _UUIDSubclass(UUID):
    __slots__ = ()


@given(st.datetimes(timezones=st.just(UTC)), st.integers(0, 999), st.uuids())
def test_timestamp_and_uuid_text_are_isoformat_and_str(
    moment: datetime, nano: int, value: UUID
) -> None:
    """The TEXT columns' forms match isoformat and str, for subclasses too (orjson writes them)."""
    expected = moment.isoformat(timespec="microseconds")[:26] + "Z"
    for instant in (moment, NanoDatetime(*moment.timetuple()[:6], moment.microsecond, UTC)):
        assert expected == format_utc_text(instant)
    nano_instant = NanoDatetime(*moment.timetuple()[:6], moment.microsecond, UTC, nanosecond=nano)
    assert expected == format_utc_text(nano_instant)
    for uuid in (value, _UUIDSubclass(int=value.int)):
        assert str(value) == GUID().process_bind_param(uuid, SQLiteDialect())


def test_stored_timestamp_order_is_time_order(migrated: sa.Engine) -> None:
    """Ordering by the raw column gives time order, across offsets and fraction widths."""
    study_id = uuid7()
    instants = [
        datetime(2024, 3, 2, 1, 0, tzinfo=CEST),  # 2024-03-01T23:00Z
        datetime(2024, 3, 1, 23, 0, 0, 1, tzinfo=UTC),
        datetime(2024, 3, 1, 9, 59, 59, 999999, tzinfo=UTC),
        datetime(2024, 3, 1, 10, tzinfo=UTC),
        datetime(999, 12, 31, 23, 59, 59, tzinfo=UTC),
        datetime(2024, 3, 1, 23, 0, 0, 10, tzinfo=UTC),
    ]
    rows = [checkpoint_row(study_id, instant) for instant in instants]
    seed(migrated, rows)

    ordered = raw_rows(migrated, "SELECT id FROM checkpoints ORDER BY timestamp")
    by_time = sorted(rows, key=lambda row: row.timestamp)
    expected = [_stored_uuid(migrated, row.id) for row in by_time]
    assert expected == [value for (value,) in ordered]


def _stored_uuid(engine: sa.Engine, value: UUID) -> object:
    """Return how ``value`` reads back from a UUID column without its type."""
    if _is_sqlite(engine):
        return str(value)
    return value.bytes if _is_mysql(engine) else value


def test_naive_datetime_is_rejected_with_value_error(migrated: sa.Engine) -> None:
    """A naive datetime bound to a UTC column raises ValueError and writes nothing."""
    naive = datetime(2024, 3, 1, 12)
    with pytest.raises(ValueError, match="naive"):
        UTCDateTime().process_bind_param(naive, migrated.dialect)

    with pytest.raises(sa.exc.StatementError) as raised:
        seed(migrated, [study_row(created_at=naive)])
    # A bad parameter is the caller's mistake, not a database failure.
    assert not isinstance(raised.value, sa.exc.DBAPIError)
    assert isinstance(raised.value.orig, ValueError)
    assert [] == raw_rows(migrated, "SELECT id FROM studies")


def test_aware_datetimes_come_back_in_utc(migrated: sa.Engine) -> None:
    """A non-UTC aware datetime is stored as the same instant and read back as UTC."""
    created = datetime(2024, 3, 1, 14, 30, 1, 250000, tzinfo=CEST)
    study = study_row(created_at=created)
    seed(migrated, [study])

    with Session(migrated) as session:
        actual = session.scalars(sa.select(StudyRow.created_at)).one()
    assert datetime(2024, 3, 1, 12, 30, 1, 250000, tzinfo=UTC) == actual
    assert timezone.utc == actual.tzinfo


def test_uuids_are_lowercase_text(migrated: sa.Engine) -> None:
    """UUIDs: lowercase hyphenated text on SQLite/libSQL, uuid on PostgreSQL, bytes on MariaDB."""
    study_id = UUID("ABCDEF01-2345-7789-ABCD-EF0123456789")
    seed(migrated, [study_row(id=study_id)])

    (actual,) = raw_rows(migrated, "SELECT id FROM studies")
    expected = (
        "abcdef01-2345-7789-abcd-ef0123456789"
        if _is_sqlite(migrated)
        else _stored_uuid(migrated, study_id)
    )
    assert (expected,) == actual
    with Session(migrated) as session:
        assert study_id == session.scalars(sa.select(StudyRow.id)).one()


def test_uuids_written_elsewhere_read_in_every_form_uuid_reads(migrated: sa.Engine) -> None:
    """A row written by other software (braced, simple or uppercase UUID text) reads back."""
    study_id = UUID("abcdef01-2345-7789-abcd-ef0123456789")
    seed(migrated, [study_row(id=study_id)])
    with Session(migrated) as session:
        for text in (f"{{{study_id}}}", study_id.hex, str(study_id).upper()):
            if _is_sqlite(migrated):
                session.execute(sa.text("UPDATE studies SET id = :id"), {"id": text})
            assert study_id == session.scalars(sa.select(StudyRow.id)).one()


def test_timestamps_written_elsewhere_read_back_in_utc(migrated: sa.Engine) -> None:
    """SQLite/libSQL text in other ISO 8601 forms (z, a space and an offset, none) reads as UTC."""
    if not _is_sqlite(migrated):
        pytest.skip("only SQLite/libSQL store timestamps as text")
    seed(migrated, [study_row()])
    expected = datetime(2024, 3, 1, 12, 0, 0, 250000, tzinfo=UTC)
    with Session(migrated) as session:
        for text in (
            "2024-03-01T12:00:00.250000Z",
            "2024-03-01T12:00:00.25z",
            "2024-03-01 14:00:00.25+02:00",
            "2024-03-01T12:00:00.250",
        ):
            session.execute(sa.text("UPDATE studies SET created_at = :at"), {"at": text})
            actual = session.scalars(sa.select(StudyRow.created_at)).one()
            assert (expected, UTC) == (actual, actual.tzinfo), text


def test_json_columns_hold_the_wire_format(migrated: sa.Engine) -> None:
    """config, metrics and sessions_included are dumps() text (SQLite, libSQL, MariaDB) or jsonb."""
    config = StudyConfig('Ünïcode ✓ "quoted"', ("b", "a"), {"zeta": "1", "alpha": "2"})
    study = study_row(config=config)
    checkpoint = checkpoint_row(study.id, metrics_value=metrics(), sessions_included=("é", "s\n2"))
    seed(migrated, [study, checkpoint])

    text = _is_sqlite(migrated) or _is_mysql(migrated)
    cast = "" if text else "::text"
    (stored_config,) = raw_rows(migrated, f"SELECT config{cast} FROM studies")
    (stored_metrics, stored_sessions) = raw_rows(
        migrated, f"SELECT metrics{cast}, sessions_included{cast} FROM checkpoints"
    )[0]
    expected = (dumps(config), dumps(checkpoint.metrics), dumps(("é", "s\n2")))
    actual = (stored_config[0], stored_metrics, stored_sessions)
    if text:
        assert expected == actual
    else:
        # jsonb keeps numbers as numeric (1.7976931348623157e308 comes back in
        # positional notation), so compare the JSON values with exact decimals.
        assert [_json_value(text) for text in expected] == [_json_value(text) for text in actual]


def test_events_analyzed_round_trips_every_u64(migrated: sa.Engine) -> None:
    """events_analyzed stores 0..2**64-1 losslessly, as a two's-complement INTEGER on SQLite."""
    rows = {value: checkpoint_row(uuid7(), events_analyzed=value) for value in U64_VALUES}
    seed(migrated, rows.values())

    with Session(migrated) as session:
        pairs = session.execute(sa.select(CheckpointRow.id, CheckpointRow.events_analyzed))
        read = dict(pairs.all())
        found = {
            value: session.scalars(
                sa.select(CheckpointRow.id).where(CheckpointRow.events_analyzed == value)
            ).all()
            for value in U64_VALUES
        }
    assert {row.id: value for value, row in rows.items()} == read
    assert {value: [row.id] for value, row in rows.items()} == found
    raw = raw_rows(
        migrated,
        "SELECT events_analyzed, typeof(events_analyzed) FROM checkpoints ORDER BY events_analyzed"
        if _is_sqlite(migrated)
        else "SELECT events_analyzed, 'numeric' FROM checkpoints ORDER BY events_analyzed",
    )
    if _is_sqlite(migrated):
        stored = sorted(value - 2**64 if value >= 2**63 else value for value in U64_VALUES)
        assert [(value, "integer") for value in stored] == raw
    else:
        assert [(Decimal(value), "numeric") for value in U64_VALUES] == raw


def test_period_value_round_trips_every_u32(migrated: sa.Engine) -> None:
    """period_value stores 0..2**32-1 exactly, as an integer."""
    values = (0, 1, 2**31, 2**32 - 1)
    seed(migrated, [study_row(period_value=value) for value in values])

    with Session(migrated) as session:
        read = session.scalars(sa.select(StudyRow.period_value).order_by(StudyRow.period_value))
        assert list(values) == list(read)
    raw = raw_rows(migrated, "SELECT period_value FROM studies ORDER BY period_value")
    assert [(value,) for value in values] == raw


@pytest.mark.parametrize("url", ["sqlite://", "postgresql+psycopg://"])
@pytest.mark.parametrize(
    ("column_type", "value"),
    [(UInt32(), 2**32), (UInt32(), -1), (UInt64(), 2**64), (UInt64(), -1)],
)
def test_out_of_range_unsigned_values_are_rejected(
    url: str, column_type: UInt32 | UInt64, value: int
) -> None:
    """Values outside the unsigned range raise ValueError before reaching the database."""
    dialect = sa.create_engine(url).dialect  # no connection is made
    with pytest.raises(ValueError, match=str(value)):
        column_type.process_bind_param(value, dialect)


def test_out_of_range_period_value_is_not_written(migrated: sa.Engine) -> None:
    """Inserting period_value 2**32 fails and leaves the table empty."""
    with pytest.raises(sa.exc.StatementError) as raised:
        seed(migrated, [study_row(period_value=2**32)])
    assert isinstance(raised.value.orig, ValueError)
    assert [] == raw_rows(migrated, "SELECT id FROM studies")


def test_null_optional_columns_round_trip(migrated: sa.Engine) -> None:
    """NULL period_value, started_at and stopped_at come back as None."""
    seed(migrated, [study_row(period_value=None)])

    with Session(migrated) as session:
        row = session.execute(
            sa.select(StudyRow.period_value, StudyRow.started_at, StudyRow.stopped_at)
        ).one()
    assert (None, None, None) == tuple(row)


def test_nanoseconds_survive_json_columns_and_truncate_in_timestamp_columns(
    migrated: sa.Engine,
) -> None:
    """Metrics keep 9-digit times and nanosecond durations; a timestamp column drops the nanos."""
    period = TimePeriod(
        NanoDatetime(2024, 1, 1, 0, 0, 0, 1, UTC, nanosecond=999),
        NanoDatetime(2024, 1, 2, tzinfo=UTC, nanosecond=1),
    )
    value = metrics(avg_session_duration=NanoTimedelta(90, 123456, nanosecond=789), period=period)
    study = study_row()
    moment = NanoDatetime(2024, 1, 1, 0, 0, 0, 5, UTC, nanosecond=7)
    checkpoint = checkpoint_row(study.id, moment, metrics_value=value)
    seed(migrated, [study, checkpoint])
    with Session(migrated) as session:
        row = session.get(CheckpointRow, checkpoint.id)
        assert row is not None
        assert dumps(value) == dumps(row.metrics)
        assert value == row.metrics
        assert datetime(2024, 1, 1, 0, 0, 0, 5, UTC) == row.timestamp
        assert 0 == getattr(row.timestamp, "nanosecond", 0)
