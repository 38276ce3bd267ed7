"""Inside a host application: its own models, its Session or Connection, its transaction."""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
import textwrap
import threading
import time
import types
from datetime import datetime, timezone
from pathlib import Path
from uuid import UUID

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    mapped_column,
    relationship,
    sessionmaker,
)

from evals_orm import (
    CheckpointRecorded,
    DatabaseError,
    EventOrderError,
    LongitudinalMetrics,
    PeriodType,
    ProjectionError,
    SchemaMissingError,
    SqlEvalProjection,
    SqlEvalStorage,
    SqlEventLog,
    StoredEvalEvent,
    StudyCreated,
    StudyStarted,
    StudyStatus,
    uuid7,
)
from evals_orm.models import CheckpointRow, StudyRow
from evals_orm.types import GUID

REPO = Path(__file__).resolve().parent.parent
T0 = datetime(2025, 1, 1, tzinfo=timezone.utc)


class HostBase(DeclarativeBase):
    """A host application's own declarative base, on its own MetaData."""


class Team(HostBase):
    """A host table with an ordinary foreign key to ``studies.id``."""

    __tablename__ = "host_teams"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(100))
    study_id: Mapped[UUID | None] = mapped_column(GUID(), sa.ForeignKey(StudyRow.id))
    study: Mapped[StudyRow | None] = relationship(StudyRow)


class Note(HostBase):
    """A host table without any reference to the package's tables."""

    __tablename__ = "host_notes"

    id: Mapped[int] = mapped_column(primary_key=True)
    text: Mapped[str] = mapped_column(sa.String(100))


@pytest.fixture
def host(migrated: sa.Engine) -> sa.Engine:
    """The migrated database with the host's own tables created next to the package's."""
    HostBase.metadata.create_all(migrated)
    return migrated


def _study(name: str = "study") -> tuple[UUID, list[StoredEvalEvent]]:
    """Return a new study's id and its events: created, started, one checkpoint."""
    study_id = uuid7()
    return study_id, [
        StoredEvalEvent.new(StudyCreated(study_id, name, PeriodType.WEEKLY, 1)),
        StoredEvalEvent.new(StudyStarted(study_id)),
        _checkpoint(study_id),
    ]


def _checkpoint(study_id: UUID) -> StoredEvalEvent:
    return StoredEvalEvent.new(
        CheckpointRecorded(uuid7(), study_id, T0, LongitudinalMetrics(sessions_completed=3), 7, ())
    )


def _teams(engine: sa.Engine) -> list[str]:
    with Session(engine) as session:
        return list(session.scalars(sa.select(Team.name).order_by(Team.name)))


def _log_count(engine: sa.Engine) -> int:
    return SqlEventLog(engine).count()


@pytest.mark.parametrize("commit", [True, False], ids=["commit", "rollback"])
def test_host_session_commits_or_rolls_back_everything_together(
    host: sa.Engine, commit: bool
) -> None:
    """Host rows, appended + projected events, apply_many and reads share the Session's fate."""
    study_id, events = _study()
    other_id, other_events = _study("other")
    with Session(host) as session:
        session.add(Team(name="red", study_id=None))
        log, projection = SqlEventLog(session), SqlEvalProjection(session)
        assert 3 == log.append(events, projection=projection)
        assert 3 == projection.apply_many(other_events)
        storage = SqlEvalStorage(session)
        assert StudyStatus.RUNNING == storage.get_study(study_id).status  # type: ignore[union-attr]
        assert 1 == len(storage.get_checkpoints(other_id))
        session.add(Team(name="blue", study_id=study_id))
        if commit:
            session.commit()
        else:
            session.rollback()
    storage = SqlEvalStorage(host)
    if commit:
        assert ["blue", "red"] == _teams(host)
        assert 3 == _log_count(host)
        assert {study_id, other_id} == {study.id for study in storage.list_studies()}
    else:
        assert [] == _teams(host)
        assert 0 == _log_count(host)
        assert [] == storage.list_studies()


@pytest.mark.parametrize("commit", [True, False], ids=["commit", "rollback"])
def test_host_connection_block_commits_or_rolls_back_everything_together(
    host: sa.Engine, commit: bool
) -> None:
    """An ``engine.begin()`` block: the package works in it and never ends it."""

    class Rollback(Exception):
        """Makes the block roll back."""

    study_id, events = _study()
    with (
        pytest.raises(Rollback) if not commit else contextlib.nullcontext(),
        host.begin() as connection,
    ):
        connection.execute(sa.insert(Team).values(name="red", study_id=None))
        log, projection = SqlEventLog(connection), SqlEvalProjection(connection)
        assert 3 == log.append(events, projection=projection)
        assert 0 == projection.apply_many(events)
        assert connection.in_transaction()
        assert 1 == len(SqlEvalStorage(connection).get_checkpoints(study_id))
        connection.execute(sa.insert(Team).values(name="blue", study_id=study_id))
        if not commit:
            raise Rollback
    assert (["blue", "red"] if commit else []) == _teams(host)
    assert (3 if commit else 0) == _log_count(host)
    assert (1 if commit else 0) == len(SqlEvalStorage(host).list_studies())


def test_an_invalid_event_undoes_only_its_own_savepoint(host: sa.Engine) -> None:
    """A ProjectionError leaves the caller's transaction usable; the rest can be committed."""
    study_id, events = _study()
    with Session(host) as session:
        session.add(Team(name="red", study_id=None))
        log, projection = SqlEventLog(session), SqlEvalProjection(session)
        assert 3 == log.append(events, projection=projection)
        unknown = StoredEvalEvent.new(StudyStarted(uuid7()))
        with pytest.raises(ProjectionError):
            log.append(unknown, projection=projection)
        with pytest.raises(ProjectionError):
            projection.apply(unknown)
        session.add(Team(name="blue", study_id=study_id))
        session.commit()
    assert ["blue", "red"] == _teams(host)
    assert 3 == _log_count(host)
    assert 1 == len(SqlEvalStorage(host).get_checkpoints(study_id))


def test_reads_see_the_callers_uncommitted_writes_and_others_do_not(host: sa.Engine) -> None:
    """Storage on the caller's Session reads its own writes; an Engine reader sees none yet."""
    study_id, events = _study()
    with Session(host) as session:
        SqlEventLog(session).append(events, projection=SqlEvalProjection(session))
        assert study_id == SqlEvalStorage(session).get_study(study_id).id  # type: ignore[union-attr]
        assert 3 == SqlEventLog(session).count()
        assert SqlEvalStorage(host).get_study(study_id) is None
        session.commit()
    assert SqlEvalStorage(host).get_study(study_id) is not None


def test_a_write_waiting_for_its_own_thread_fails_at_once(host: sa.Engine, backend: str) -> None:
    """Host Session flushed, then an Engine-bound append in the same thread: no 30 s wait.

    On the one-writer backends it fails at once saying what to do, and the
    host can still commit; PostgreSQL and MariaDB have row locks and simply append.
    """
    _, events = _study()
    one_writer = backend not in ("postgresql", "mariadb")
    with Session(host) as session:
        session.add(Team(name="red", study_id=None))
        session.flush()
        started = time.monotonic()
        with (
            pytest.raises(DatabaseError, match="pass that Session or Connection to evals_orm")
            if one_writer
            else contextlib.nullcontext()
        ):
            SqlEventLog(host).append(events)
        assert time.monotonic() - started < 1.0
        session.commit()
    assert ["red"] == _teams(host)
    assert (0 if one_writer else 3) == _log_count(host)


def test_host_foreign_keys_survive_a_rebuild(host: sa.Engine) -> None:
    """A host row referencing a study keeps working through rebuild(log); clear() refuses."""
    study_id, events = _study()
    log, projection = SqlEventLog(host), SqlEvalProjection(host)
    log.append(events, projection=projection)
    with Session(host) as session:
        session.add(Team(name="red", study_id=study_id))
        session.commit()
    assert 3 == projection.rebuild(log)
    assert 0 == projection.catch_up(log)
    with Session(host) as session:
        team = session.scalars(sa.select(Team)).one()
        assert team.study is not None
        assert "study" == team.study.name
    with pytest.raises(DatabaseError, match="reference"):
        projection.clear()
    assert 1 == len(SqlEvalStorage(host).list_studies())


def test_host_rows_join_the_package_tables_in_one_select(host: sa.Engine) -> None:
    """A select joining a host table with StudyRow and CheckpointRow matches rows."""
    study_id, events = _study("joined")
    SqlEventLog(host).append(events, projection=SqlEvalProjection(host))
    with Session(host) as session:
        session.add(Team(name="red", study_id=study_id))
        session.commit()
        rows = session.execute(
            sa.select(Team.name, StudyRow.name, CheckpointRow.events_analyzed)
            .join(StudyRow, Team.study_id == StudyRow.id)
            .join(CheckpointRow, CheckpointRow.study_id == StudyRow.id)
        ).all()
    assert [("red", "joined", 7)] == [tuple(row) for row in rows]


def test_sessionmaker_bound_to_a_connection_is_accepted(host: sa.Engine) -> None:
    """A sessionmaker bound to the caller's Connection runs inside its transaction."""
    _, events = _study()
    with host.connect() as connection:
        connection.begin()
        SqlEventLog(sessionmaker(bind=connection)).append(events)
        assert 3 == SqlEventLog(connection).count()
        connection.rollback()
    assert 0 == _log_count(host)


@pytest.mark.parametrize("bind", [None, "sqlite://", 42])
def test_an_unusable_bind_is_a_type_error_at_construction(bind: object) -> None:
    """Anything but an Engine, sessionmaker, Connection or Session is refused at once."""
    for service in (SqlEventLog, SqlEvalProjection, SqlEvalStorage):
        with pytest.raises(TypeError, match="an Engine, a sessionmaker, a Connection or a Session"):
            service(bind)  # type: ignore[arg-type]


def test_an_unbound_session_or_sessionmaker_is_a_type_error() -> None:
    """A Session or sessionmaker without an Engine or Connection is refused at construction."""
    for bind in (Session(), sessionmaker()):
        with pytest.raises(TypeError, match="must be bound to an Engine or a Connection"):
            SqlEventLog(bind)


def test_threads_with_sessions_and_engines_append_and_project_concurrently(
    host: sa.Engine,
) -> None:
    """Threads with Session transactions and threads with the Engine all finish, exactly once."""
    rounds = 4
    errors: list[BaseException] = []
    expected: list[UUID] = []
    lock = threading.Lock()

    def with_session() -> None:
        for _ in range(rounds):
            study_id, events = _study()
            with Session(host) as session:
                session.add(Team(name=f"team-{study_id}", study_id=None))
                session.flush()
                SqlEventLog(session).append(events, projection=SqlEvalProjection(session))
                session.add(Team(name=f"owner-{study_id}", study_id=study_id))
                session.commit()
            with lock:
                expected.append(study_id)

    def with_engine() -> None:
        for _ in range(rounds):
            study_id, events = _study()
            SqlEventLog(host).append(events[:1], projection=SqlEvalProjection(host))
            SqlEventLog(host).append(events[1:])
            SqlEvalProjection(host).catch_up(SqlEventLog(host))
            with lock:
                expected.append(study_id)

    def run(target: object) -> None:
        try:
            target()  # type: ignore[operator]
        except BaseException as error:
            errors.append(error)

    threads = [
        threading.Thread(target=run, args=(target,))
        for target in (with_session, with_session, with_engine, with_engine)
    ]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads)
    assert [] == errors
    assert time.monotonic() - started < 120
    assert 3 * len(expected) == _log_count(host)
    SqlEvalProjection(host).catch_up(SqlEventLog(host))
    storage = SqlEvalStorage(host)
    assert sorted(expected) == sorted(study.id for study in storage.list_studies())
    assert dict.fromkeys(expected, 1) == storage.checkpoint_counts()
    assert 4 * rounds == len(_teams(host))


def test_migrations_are_an_attribute_without_importing_alembic_first() -> None:
    """A fresh interpreter: ``import evals_orm`` loads no Alembic; the attribute loads it."""
    code = textwrap.dedent(
        """
        import sys
        import evals_orm
        assert "alembic" not in sys.modules
        assert callable(evals_orm.migrations.upgrade)
        assert "alembic" in sys.modules
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


_HOST_MODULE = '''
"""A host module using the public API, type-checked with mypy --strict."""

from uuid import UUID

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

import evals_orm
from evals_orm import (
    SqlEvalProjection,
    SqlEvalStorage,
    SqlEventLog,
    StoredEvalEvent,
    Study,
    StudyCreated,
    PeriodType,
    uuid7,
)
from evals_orm.models import StudyRow
from evals_orm.types import GUID


class Base(DeclarativeBase):
    pass


class Team(Base):
    __tablename__ = "teams"
    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[UUID] = mapped_column(GUID(), sa.ForeignKey(StudyRow.id))
    study: Mapped[StudyRow] = relationship(StudyRow)


def run(engine: sa.Engine) -> Study | None:
    evals_orm.migrations.upgrade(engine)
    study_id = uuid7()
    with Session(engine) as session:
        log = SqlEventLog(session)
        new: int = log.append(
            StoredEvalEvent.new(StudyCreated(study_id, "s", PeriodType.DAILY)),
            projection=SqlEvalProjection(session),
        )
        assert new == 1
        study = SqlEvalStorage(session).get_study(study_id)
        session.commit()
    return study
'''


def test_a_host_module_passes_mypy_strict(tmp_path: Path) -> None:
    """The public API, used as the README shows, type-checks under ``mypy --strict``."""
    module = tmp_path / "host_app.py"
    module.write_text(_HOST_MODULE)
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", str(module)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        check=False,
    )
    assert 0 == result.returncode, result.stdout


def _readme_example() -> str:
    text = (REPO / "README.md").read_text()
    section = text.split("## Inside your application", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match is not None
    return match.group(1)


def test_the_readme_example_runs(migrated: sa.Engine) -> None:
    """The README's "Inside your application" example runs as written."""
    # A real module: SQLAlchemy resolves the models' annotations in it.
    module = types.ModuleType("readme_example")
    sys.modules[module.__name__] = module
    try:
        exec(compile(_readme_example(), "README.md", "exec"), module.__dict__)
        module.main(migrated)
    finally:
        del sys.modules[module.__name__]


def test_a_savepoint_as_the_first_statement_is_undone_by_the_callers_rollback(
    host: sa.Engine,
) -> None:
    """The package's savepoint opens the caller's transaction for real, so rollback undoes it."""
    _, events = _study()
    with host.connect() as connection:
        connection.begin()
        assert 3 == SqlEventLog(connection).append(events)
        connection.rollback()
        assert 0 == SqlEventLog(connection).count()
    assert 0 == _log_count(host)


def test_the_caller_can_keep_going_after_a_rejected_append(host: sa.Engine) -> None:
    """An EventOrderError inside the caller's Connection leaves it usable and uncommitted."""
    study_id, events = _study()
    with host.connect() as connection:
        log = SqlEventLog(connection)
        log.append(events[1:])
        with pytest.raises(EventOrderError):
            log.append(events[0])
        connection.execute(sa.insert(Team).values(name="red", study_id=None))
        assert connection.in_transaction()
        connection.commit()
    assert ["red"] == _teams(host)
    assert 2 == _log_count(host)
    assert study_id == SqlEventLog(host).fetch(0, 1)[0][1].event.study_id


def test_waiting_for_a_lock_row_of_the_same_thread_fails_at_once(host: sa.Engine) -> None:
    """A Session holding the log's lock row, then an Engine-bound append: an error, not a hang."""
    _, first = _study()
    _, second = _study()
    with Session(host) as session:
        SqlEventLog(session).append(first)
        started = time.monotonic()
        with pytest.raises(DatabaseError, match="pass that Session or Connection to evals_orm"):
            SqlEventLog(host).append(second)
        assert time.monotonic() - started < 1.0
        SqlEventLog(session).append(second)
        session.commit()
    assert 6 == _log_count(host)


def test_a_driver_error_leaves_the_callers_transaction_usable(engine: sa.Engine) -> None:
    """Tables missing: SchemaMissingError, and the caller still commits its own row."""
    Note.__table__.create(engine)  # type: ignore[attr-defined]
    _, events = _study()
    with Session(engine) as session:
        session.add(Note(text="kept"))
        session.flush()
        with pytest.raises(SchemaMissingError):
            SqlEventLog(session).append(events)
        session.add(Note(text="also kept"))
        session.commit()
    with Session(engine) as session:
        assert ["also kept", "kept"] == sorted(session.scalars(sa.select(Note.text)))
