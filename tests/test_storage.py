"""SqlEvalStorage: every read query of the spec, on every backend."""

from __future__ import annotations

import socket
from datetime import datetime, timedelta, timezone
from typing import Any
from uuid import UUID

import pytest
import sqlalchemy as sa
from conftest import Database
from sqlalchemy import event
from sqlalchemy.orm import sessionmaker

from evals_orm import (
    Checkpoint,
    CheckpointId,
    CheckpointRecorded,
    CredentialsError,
    DatabaseError,
    EvalsError,
    EvalStorage,
    PeriodType,
    SchemaMissingError,
    SqlEvalProjection,
    SqlEvalStorage,
    SqlEventLog,
    StoredEvalEvent,
    Study,
    StudyConfig,
    StudyCreated,
    StudyId,
    StudyStatus,
    UnreachableError,
    create_engine,
    uuid7,
)

from support import T0, UTC, checkpoint_row, metrics, seed, study_row

CEST = timezone(timedelta(hours=2))


def _ids(n: int) -> list[UUID]:
    """Return ``n`` UUIDs in ascending order."""
    return [UUID(int=(i + 1) << 64 | 0x8000_0000_0000_0000) for i in range(n)]


@pytest.fixture(params=["engine", "sessionmaker"])
def storage(request: pytest.FixtureRequest, migrated: sa.Engine) -> SqlEvalStorage:
    """A SqlEvalStorage over the migrated database, bound by Engine or by sessionmaker."""
    if request.param == "engine":
        return SqlEvalStorage(migrated)
    return SqlEvalStorage(sessionmaker(migrated))


def _engine(storage: SqlEvalStorage) -> sa.Engine:
    bind = storage.bind
    if isinstance(bind, sa.Engine):
        return bind
    assert isinstance(bind, sessionmaker)
    engine: sa.Engine = bind.kw["bind"]
    return engine


def test_sql_storage_is_an_eval_storage(storage: SqlEvalStorage) -> None:
    """SqlEvalStorage satisfies the EvalStorage protocol."""
    assert isinstance(storage, EvalStorage)


def test_every_study_field_round_trips(storage: SqlEvalStorage) -> None:
    """A study comes back equal field by field, with UTC-aware datetimes."""
    config = StudyConfig("Ünïcode ✓ 研究", ("β", "a"), {"zeta": "ζ", "alpha": "1"})
    row = study_row(
        name="naïve 🧪 study",
        status=StudyStatus.STOPPED,
        period_type=PeriodType.MONTHLY,
        period_value=2**32 - 1,
        config=config,
        created_at=datetime(2024, 1, 1, 2, 0, 0, 1, tzinfo=CEST),
        started_at=T0,
        stopped_at=T0 + timedelta(days=1, microseconds=999999),
    )
    seed(_engine(storage), [row])

    expected = Study(
        StudyId(row.id),
        "naïve 🧪 study",
        StudyStatus.STOPPED,
        PeriodType.MONTHLY,
        2**32 - 1,
        config,
        datetime(2024, 1, 1, 0, 0, 0, 1, tzinfo=UTC),
        T0,
        T0 + timedelta(days=1, microseconds=999999),
    )
    actual = storage.get_study(StudyId(row.id))
    assert expected == actual
    assert actual is not None
    instants = (actual.created_at, actual.started_at, actual.stopped_at)
    assert [UTC, UTC, UTC] == [value and value.tzinfo for value in instants]
    if _engine(storage).dialect.name != "postgresql":
        # jsonb stores object keys sorted, so only text columns keep the wire order.
        assert ["zeta", "alpha"] == list(actual.config.metadata)


def test_every_checkpoint_field_round_trips(storage: SqlEvalStorage) -> None:
    """A checkpoint comes back equal: metrics floats, durations, u64s and sessions intact."""
    study_id = uuid7()
    row = checkpoint_row(
        study_id,
        datetime(2024, 3, 1, 14, 0, tzinfo=CEST),
        events_analyzed=2**64 - 1,
        sessions_included=("sess-ü", "s\n2", ""),
        metrics_value=metrics(),
    )
    seed(_engine(storage), [row])

    expected = Checkpoint(
        CheckpointId(row.id),
        StudyId(study_id),
        T0,
        metrics(),
        2**64 - 1,
        ("sess-ü", "s\n2", ""),
    )
    assert [expected] == storage.get_checkpoints(StudyId(study_id))
    assert expected == storage.get_latest_checkpoint(StudyId(study_id))


def test_studies_are_newest_first_with_ties_by_id_desc(storage: SqlEvalStorage) -> None:
    """list_studies orders by (created_at DESC, id DESC), status filters keep that order."""
    a, b, c, d = _ids(4)
    rows = [
        study_row(id=b, created_at=T0, status=StudyStatus.RUNNING),
        study_row(id=a, created_at=T0 + timedelta(microseconds=1), status=StudyStatus.PENDING),
        study_row(id=d, created_at=T0, status=StudyStatus.RUNNING),
        study_row(id=c, created_at=T0 - timedelta(days=1), status=StudyStatus.RUNNING),
    ]
    seed(_engine(storage), rows)

    assert [a, d, b, c] == [study.id for study in storage.list_studies()]
    running = storage.list_studies_by_status(StudyStatus.RUNNING)
    assert [d, b, c] == [study.id for study in running]
    assert [a] == [study.id for study in storage.list_studies_by_status(StudyStatus.PENDING)]
    assert [] == storage.list_studies_by_status(StudyStatus.STOPPED)


def test_checkpoints_are_oldest_first_with_ties_by_id(storage: SqlEvalStorage) -> None:
    """get_checkpoints orders by (timestamp ASC, id ASC); the latest is the last of them."""
    study_id = uuid7()
    a, b, c, d = _ids(4)
    rows = [
        checkpoint_row(study_id, T0 + timedelta(hours=1), id=c),
        checkpoint_row(study_id, T0 + timedelta(hours=1), id=a),
        checkpoint_row(study_id, T0, id=d),
        checkpoint_row(study_id, T0 + timedelta(hours=1), id=b),
        checkpoint_row(uuid7(), T0 + timedelta(days=1)),
    ]
    seed(_engine(storage), rows)

    found = storage.get_checkpoints(StudyId(study_id))
    assert [d, a, b, c] == [checkpoint.id for checkpoint in found]
    latest = storage.get_latest_checkpoint(StudyId(study_id))
    assert found[-1] == latest


def test_range_is_half_open(storage: SqlEvalStorage) -> None:
    """get_checkpoints_in_range includes start, excludes end, and keeps checkpoint order."""
    study_id = uuid7()
    instants = [T0 + timedelta(microseconds=offset) for offset in (-1, 0, 1, 999, 1000, 1001)]
    seed(_engine(storage), [checkpoint_row(study_id, instant) for instant in instants])

    found = storage.get_checkpoints_in_range(
        StudyId(study_id), T0, T0 + timedelta(microseconds=1000)
    )
    assert instants[1:4] == [checkpoint.timestamp for checkpoint in found]
    empty = storage.get_checkpoints_in_range(StudyId(study_id), T0, T0)
    assert [] == empty


def test_range_bounds_in_other_offsets_are_converted(storage: SqlEvalStorage) -> None:
    """Aware non-UTC bounds select the same instants as their UTC equivalents."""
    study_id = uuid7()
    instants = [T0 + timedelta(hours=hours) for hours in range(4)]
    seed(_engine(storage), [checkpoint_row(study_id, instant) for instant in instants])

    start = (T0 + timedelta(hours=1)).astimezone(CEST)
    end = (T0 + timedelta(hours=3)).astimezone(timezone(timedelta(hours=-7)))
    found = storage.get_checkpoints_in_range(StudyId(study_id), start, end)
    assert instants[1:3] == [checkpoint.timestamp for checkpoint in found]


@pytest.mark.parametrize("bound", ["start", "end"])
def test_naive_range_bounds_are_rejected(storage: SqlEvalStorage, bound: str) -> None:
    """A naive start or end raises ValueError naming that argument."""
    bounds = {"start": T0, "end": T0 + timedelta(days=1)}
    bounds[bound] = bounds[bound].replace(tzinfo=None)
    with pytest.raises(ValueError, match=f"^{bound} must be a timezone-aware"):
        storage.get_checkpoints_in_range(StudyId(uuid7()), **bounds)


def test_unknown_study_reads_as_nothing(storage: SqlEvalStorage) -> None:
    """An unknown id gives None or an empty list from every query."""
    seed(_engine(storage), [study_row(), checkpoint_row(uuid7())])
    unknown = StudyId(uuid7())
    actual = (
        storage.get_study(unknown),
        storage.get_checkpoints(unknown),
        storage.get_latest_checkpoint(unknown),
        storage.get_checkpoints_in_range(unknown, T0 - timedelta(days=1), T0 + timedelta(days=1)),
    )
    assert (None, [], None, []) == actual


def test_never_migrated_database_says_to_upgrade(engine: sa.Engine) -> None:
    """Querying a database without the tables raises DatabaseError telling to run the upgrade."""
    for bind in (engine, sessionmaker(engine)):
        with pytest.raises(DatabaseError, match="run `evals-orm db upgrade`") as raised:
            SqlEvalStorage(bind).list_studies()
        assert isinstance(raised.value, SchemaMissingError)
        assert isinstance(raised.value, EvalsError)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://postgres@127.0.0.1:{port}/x",
        "mysql://root@127.0.0.1:{port}/x",
        "http://127.0.0.1:{port}",
        "libsql://127.0.0.1:{port}?tls=0",
    ],
)
def test_unreachable_database_raises_a_helpful_error(url: str) -> None:
    """A closed port raises DatabaseError saying the database is unreachable, without the token."""
    token = None if url.startswith(("postgresql", "mysql")) else "very-secret-token-123"
    engine = create_engine(url.format(port=_closed_port()), auth_token=token)
    with pytest.raises(UnreachableError, match="cannot reach the database") as raised:
        SqlEvalStorage(engine).get_study(StudyId(uuid7()))
    assert "check the URL" in str(raised.value)
    assert token is None or token not in str(raised.value)


def test_range_query_uses_the_study_time_index(migrated: sa.Engine) -> None:
    """The SQL that get_checkpoints_in_range runs searches idx_checkpoints_study_time."""
    study_id = StudyId(uuid7())
    seed(migrated, [checkpoint_row(study_id, T0 + timedelta(hours=h)) for h in range(20)])
    captured: list[tuple[str, Any]] = []

    def capture(*args: Any) -> None:
        captured.append((args[2], args[3]))

    event.listen(migrated, "before_cursor_execute", capture)
    try:
        found = SqlEvalStorage(migrated).get_checkpoints_in_range(
            study_id, T0, T0 + timedelta(hours=5)
        )
    finally:
        event.remove(migrated, "before_cursor_execute", capture)
    assert 5 == len(found)
    (sql, params) = next((sql, p) for sql, p in captured if "FROM checkpoints" in sql)

    explain = "EXPLAIN QUERY PLAN" if migrated.dialect.name == "sqlite" else "EXPLAIN"
    with migrated.connect() as connection:
        if migrated.dialect.name == "postgresql":
            # 20 rows would be read by a sequential scan; the index must still be usable.
            connection.exec_driver_sql("SET enable_seqscan = off")
        plan = connection.exec_driver_sql(f"{explain} {sql}", params).all()
    assert "idx_checkpoints_study_time" in " ".join(str(value) for row in plan for value in row)


def test_checkpoint_counts_counts_each_studys_checkpoints(migrated: sa.Engine) -> None:
    """checkpoint_counts maps every study with checkpoints to how many it has."""
    first, second, empty = study_row(), study_row(), study_row()
    seed(
        migrated,
        [
            first,
            second,
            empty,
            *(checkpoint_row(first.id, T0 + timedelta(hours=h)) for h in range(3)),
            checkpoint_row(second.id),
        ],
    )
    assert {first.id: 3, second.id: 1} == SqlEvalStorage(migrated).checkpoint_counts()


# Four-byte UTF-8 (emoji, a musical symbol, a CJK extension B ideograph), which
# MySQL's three-byte "utf8" cannot hold, next to two- and three-byte characters.
ASTRAL = "study 😀 𝄞 𠀋 é ✓"


def test_four_byte_unicode_round_trips_through_log_projection_and_reads(
    migrated: sa.Engine,
) -> None:
    """Strings with 4-byte characters come back unchanged from the log and from every read."""
    study_id, checkpoint_id = StudyId(uuid7()), CheckpointId(uuid7())
    config = StudyConfig(ASTRAL, (ASTRAL, "🧪"), {"🔑": ASTRAL})
    stream = [
        StoredEvalEvent.new(StudyCreated(study_id, ASTRAL, PeriodType.DAILY, None, config)),
        StoredEvalEvent.new(
            CheckpointRecorded(checkpoint_id, study_id, T0, metrics(), 1, ("s-😀", ASTRAL))
        ),
    ]
    log = SqlEventLog(migrated)
    assert 2 == log.append(stream, projection=SqlEvalProjection(migrated))

    assert stream == list(log.read())
    study = SqlEvalStorage(migrated).get_study(study_id)
    assert study is not None
    assert (ASTRAL, config) == (study.name, study.config)
    [checkpoint] = SqlEvalStorage(migrated).get_checkpoints(study_id)
    assert ("s-😀", ASTRAL) == tuple(checkpoint.sessions_included)


def test_any_128_bit_id_is_stored_and_sorts_like_uuid(migrated: sa.Engine) -> None:
    """Ids of every version and variant (not only RFC 9562 ones) round-trip, in UUID order.

    MariaDB's own UUID type would reject the NCS-variant ids with a high
    version nibble and sort differently; the stored order must be Python's.
    """
    ids = [
        UUID(int=0),
        UUID(int=2**128 - 1),
        UUID("ffffffff-ffff-8fff-0fff-ffffffffffff"),  # version nibble 8, NCS variant
        UUID("00000000-0000-f000-7000-000000000001"),
        UUID("80000000-0000-0000-0000-000000000000"),
        UUID("7fffffff-ffff-ffff-ffff-ffffffffffff"),
        UUID("0192d5e0-8c40-7000-8000-000000000001"),
    ]
    seed(migrated, [study_row(id=value, created_at=T0) for value in ids])

    listed = [study.id for study in SqlEvalStorage(migrated).list_studies()]
    assert sorted(ids, reverse=True) == listed


def test_mariadb_wrong_password_and_missing_database_say_what_to_do(database: Database) -> None:
    """A refused password (never shown) and a missing database are one-sentence DatabaseErrors."""
    if database.backend != "mariadb":
        pytest.skip("the password and database name of a MariaDB server")
    url = sa.make_url(database.url)
    wrong = create_engine(url.set(password="not-the-password-42"))
    with pytest.raises(CredentialsError, match="refused the credentials") as refused:
        SqlEvalStorage(wrong).list_studies()
    assert "not-the-password-42" not in str(refused.value)
    missing = create_engine(url.set(database=f"{url.database}_missing"))
    with pytest.raises(DatabaseError, match=f"'{url.database}_missing' does not exist") as absent:
        SqlEvalStorage(missing).list_studies()
    assert [1, 1] == [len(str(error.value).splitlines()) for error in (refused, absent)]
