"""Faults and abuse: every failure is one sentence, and every backend treats an event alike."""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
import sqlalchemy as sa
from projection_worker import long_stream
from test_cli import finish, run, start

from evals_orm import (
    CheckpointRecorded,
    DatabaseError,
    InvalidEventError,
    PeriodType,
    ProjectionError,
    SqlEvalProjection,
    SqlEvalStorage,
    SqlEventLog,
    StoredEvalEvent,
    StudyConfig,
    StudyCreated,
    StudyPaused,
    StudyStarted,
    StudyStopped,
    _locks,
    _revision,
    dumps,
    ingest,
    migrations,
    uuid7_at,
)
from evals_orm._sqld import SqldServer, SqldStartupError, SqldUnavailable, running_sqld
from evals_orm.domain import CheckpointId, StudyId
from evals_orm.models import CheckpointRow, EventRow, StudyRow
from evals_orm.projection import PROJECTION
from evals_orm.testing import Database

from support import T0, metrics

UTC = timezone.utc
NUL_REASON = "contains U+0000, which PostgreSQL and libSQL cannot store"


def _study(number: int) -> StudyId:
    return StudyId(uuid7_at(T0, number))


def _created(study: int, at: datetime = T0, **changes: Any) -> StoredEvalEvent:
    fields: dict[str, Any] = {"name": f"study-{study}", "period_type": PeriodType.DAILY}
    fields.update(changes)
    return StoredEvalEvent(uuid7_at(at, study), StudyCreated(_study(study), **fields))


def _checkpoint(study: int, at: datetime, sessions: tuple[str, ...] = ("s",)) -> StoredEvalEvent:
    return StoredEvalEvent(
        uuid7_at(at, study),
        CheckpointRecorded(
            CheckpointId(uuid.uuid5(_study(study), at.isoformat())),
            _study(study),
            at,
            metrics(),
            7,
            sessions,
        ),
    )


def _lines(events: list[StoredEvalEvent]) -> str:
    return "".join(f"{dumps(stored)}\n" for stored in events)


def _counts(engine: sa.Engine) -> tuple[int, int, int]:
    """Rows of the log, the studies and the checkpoints, read with plain SQL."""
    with engine.connect() as connection:
        log, studies, checkpoints = (
            connection.execute(sa.select(sa.func.count()).select_from(table)).scalar_one()
            for table in (EventRow, StudyRow, CheckpointRow)
        )
    return log, studies, checkpoints


def _one_sentence(stderr: str, *fragments: str) -> None:
    """The CLI's stderr is one `evals-orm: ...` line holding each fragment."""
    lines = stderr.splitlines()
    assert 1 == len(lines), stderr
    assert lines[0].startswith("evals-orm: "), stderr
    for fragment in fragments:
        assert fragment in lines[0]


# --- U+0000 --------------------------------------------------------------------

NUL_EVENTS = {
    "event.name": _created(1, name="nul\x00name"),
    "event.config.description": _created(1, config=StudyConfig(description="a\x00b")),
    "event.config.tags[1]": _created(1, config=StudyConfig(tags=("ok", "\x00"))),
    "event.config.metadata key": _created(1, config=StudyConfig(metadata={"k\x00": "v"})),
    "event.config.metadata.k": _created(1, config=StudyConfig(metadata={"k": "v\x00"})),
    "event.sessions_included[0]": _checkpoint(0, T0 + timedelta(hours=1), ("s\x00",)),
}


@pytest.mark.parametrize("field", sorted(NUL_EVENTS))
def test_a_string_holding_nul_is_refused_alike_on_every_backend(
    migrated: sa.Engine, field: str
) -> None:
    """The log and the projection refuse U+0000 in any string, naming the field; write nothing."""
    log, projection = SqlEventLog(migrated), SqlEvalProjection(migrated)
    log.append(_created(0), projection=projection)
    stored = NUL_EVENTS[field]
    with pytest.raises(InvalidEventError) as refused:
        log.append([_checkpoint(0, T0 + timedelta(minutes=1)), stored], projection=projection)
    assert f"event {stored.event_id} is refused: its {field} {NUL_REASON}" == str(refused.value)
    with pytest.raises(ProjectionError) as unprojected:
        projection.apply_many([_checkpoint(0, T0 + timedelta(minutes=1)), stored])
    assert f"its {field} {NUL_REASON}" == unprojected.value.reason
    assert (1, 1, 0) == _counts(migrated)


def test_ingest_reports_a_nul_line_and_ingests_the_lines_after_it(migrated: sa.Engine) -> None:
    """A U+0000 line is a bad line on every backend; the lines around it are ingested."""
    good = [_created(0), *(_checkpoint(0, T0 + timedelta(minutes=n)) for n in range(1, 4))]
    lines = _lines([good[0], good[1], NUL_EVENTS["event.name"], good[2], good[3]])
    log = SqlEventLog(migrated)
    report = ingest(io.BytesIO(lines.encode()), log, SqlEvalProjection(migrated), source="f")
    assert ["f:3"] == [f"{bad.source}:{bad.line}" for bad in report.invalid]
    assert NUL_REASON in report.invalid[0].reason
    assert (4, 4) == (report.read - 1, report.new)
    assert (4, 1, 3) == _counts(migrated)


def test_cli_ingest_reports_a_nul_line_and_goes_on(
    database: Database, migrated: sa.Engine, tmp_path: Path
) -> None:
    """`ingest` names FILE:LINE of a U+0000 line, exits 1, and ingests every other line."""
    source = tmp_path / "nul.jsonl"
    source.write_text(
        _lines([_created(0), NUL_EVENTS["event.config.metadata.k"], _created(2)]),
        encoding="utf-8",
    )
    result = run("ingest", str(source), database=database)
    assert 1 == result.code
    assert f"{source}:2: event " in result.stderr
    assert f"event.config.metadata.k {NUL_REASON}" in result.stderr
    assert "3 events read, 2 new, 0 already logged, 1 bad" in result.stdout
    assert (2, 2, 0) == _counts(migrated)


# --- event ids from the future --------------------------------------------------


def _ahead(by: timedelta, study: int = 0) -> datetime:
    return datetime.now(UTC) + by


FUTURE_EVENTS = {
    "study_created": lambda at: StoredEvalEvent(
        uuid7_at(at, 1), StudyCreated(_study(1), "later", PeriodType.DAILY)
    ),
    "study_started": lambda at: StoredEvalEvent(uuid7_at(at, 2), StudyStarted(_study(0))),
    "study_paused": lambda at: StoredEvalEvent(uuid7_at(at, 3), StudyPaused(_study(0))),
    "study_stopped": lambda at: StoredEvalEvent(uuid7_at(at, 4), StudyStopped(_study(0))),
    "checkpoint_recorded": lambda at: _checkpoint(0, at),
}


@pytest.mark.parametrize("kind", sorted(FUTURE_EVENTS))
def test_an_event_id_dated_ahead_of_the_clock_is_refused_for_every_event_type(
    migrated: sa.Engine, kind: str
) -> None:
    """Beyond the clock-skew allowance any event is refused; within it, accepted."""
    log, projection = SqlEventLog(migrated), SqlEvalProjection(migrated)
    log.append(_created(0), projection=projection)
    future = FUTURE_EVENTS[kind](_ahead(timedelta(hours=1)))
    with pytest.raises(InvalidEventError) as refused:
        log.append(future, projection=projection)
    assert re.fullmatch(
        f"event {future.event_id} is dated (0:59:59|1:00:00) ahead of this clock, more than "
        "the allowed 0:05:00; stamp it again on a host whose clock is right",
        str(refused.value),
    )
    assert (1, 1, 0) == _counts(migrated)
    assert 1 == log.append(FUTURE_EVENTS[kind](_ahead(timedelta(minutes=1))))


def test_an_event_id_of_the_year_10889_is_refused_in_one_sentence(migrated: sa.Engine) -> None:
    """The largest time a UUIDv7 carries is refused like any other future id."""
    event_id = UUID("ffffffff-ffff-7000-8000-000000000000")
    with pytest.raises(InvalidEventError, match=r"is dated \d+ days ahead of this clock"):
        SqlEventLog(migrated).append(StoredEvalEvent(event_id, StudyPaused(_study(0))))
    assert (0, 0, 0) == _counts(migrated)


def test_the_clock_skew_allowance_is_configurable(migrated: sa.Engine) -> None:
    """`max_clock_skew` widens or narrows the allowance; a negative one is a ValueError."""
    soon = StoredEvalEvent(uuid7_at(_ahead(timedelta(seconds=30)), 0), StudyPaused(_study(0)))
    with pytest.raises(InvalidEventError, match="more than the allowed 0:00:00;"):
        SqlEventLog(migrated, max_clock_skew=timedelta(0)).append(soon)
    later = StoredEvalEvent(uuid7_at(_ahead(timedelta(days=2)), 1), StudyPaused(_study(1)))
    assert 1 == SqlEventLog(migrated, max_clock_skew=timedelta(days=3)).append(later)
    with pytest.raises(ValueError, match="must not be negative"):
        SqlEventLog(migrated, max_clock_skew=timedelta(seconds=-1))


def test_ingest_reports_a_future_id_and_the_study_goes_on(migrated: sa.Engine) -> None:
    """A future id is a bad line, so the study's later (present-day) events still go in."""
    future = StoredEvalEvent(uuid7_at(_ahead(timedelta(days=1)), 0), StudyPaused(_study(0)))
    after = StoredEvalEvent(uuid7_at(T0 + timedelta(hours=1), 0), StudyStopped(_study(0)))
    lines = _lines([_created(0), future, after])
    report = ingest(lines.splitlines(), SqlEventLog(migrated), SqlEvalProjection(migrated))
    assert [2] == [bad.line for bad in report.invalid]
    assert "1 day ahead of this clock" in report.invalid[0].reason
    assert 2 == report.new
    study = SqlEvalStorage(migrated).get_study(_study(0))
    assert study is not None
    assert "stopped" == study.status.value


# --- the position a rebuild records -------------------------------------------


def test_the_first_append_after_a_rebuild_reads_no_logged_event(
    migrated: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`rebuild(log)` records the log's position: the next inline append replays nothing."""
    log, projection = SqlEventLog(migrated), SqlEvalProjection(migrated)
    events = list(long_stream(3000))
    log.append(events[:-1])
    assert 2999 == projection.rebuild(log)
    with migrated.connect() as connection:
        position = _locks.lock(connection, PROJECTION)
        last = connection.execute(sa.select(sa.func.max(EventRow.position))).scalar_one()
    assert last == position
    fetched: list[int] = []
    fetch = SqlEventLog.fetch

    def counting(self: SqlEventLog, after: int, limit: int) -> list[Any]:
        rows = fetch(self, after, limit)
        fetched.append(len(rows))
        return rows

    monkeypatch.setattr(SqlEventLog, "fetch", counting)
    assert 1 == log.append(events[-1], projection=projection)
    assert 0 == projection.catch_up(log)
    assert 0 == sum(fetched)


# --- unknown schema revisions --------------------------------------------------


def _stamp(engine: sa.Engine, revision: str) -> None:
    with engine.begin() as connection:
        connection.execute(
            sa.text(f"UPDATE {migrations.VERSION_TABLE} SET version_num = :revision"),
            {"revision": revision},
        )


def test_every_service_refuses_a_database_of_a_newer_release(
    database: Database, migrated: sa.Engine
) -> None:
    """A revision the package does not know stops every service and command; nothing is written."""
    _stamp(migrated, "zzzz")
    newer = "the database was migrated by a newer evals_orm (revision zzzz); upgrade the package"
    calls: dict[str, Callable[[sa.Engine], object]] = {
        "append": lambda engine: SqlEventLog(engine).append(_created(0)),
        "count": lambda engine: SqlEventLog(engine).count(),
        "rebuild": lambda engine: SqlEvalProjection(engine).rebuild([_created(0)]),
        "catch_up": lambda engine: SqlEvalProjection(engine).catch_up(SqlEventLog(engine)),
        "list_studies": lambda engine: SqlEvalStorage(engine).list_studies(),
    }
    for name, call in calls.items():
        engine = database.engine()  # the check is cached per Engine
        try:
            with pytest.raises(DatabaseError) as refused:
                call(engine)
            assert newer == str(refused.value), name
        finally:
            engine.dispose()
    for command in (["studies"], ["rebuild"], ["ingest", "-"]):
        result = run(*command, database=database, stdin=_lines([_created(0)]))
        assert 1 == result.code
        _one_sentence(result.stderr, newer)
    assert (0, 0, 0) == _counts(migrated)


def test_a_known_revision_passes_the_check(database: Database, migrated: sa.Engine) -> None:
    """The head revision and ids of released revisions renamed since are known."""
    assert _revision.known() == {script.revision for script in _script_directory().walk_revisions()}
    for revision in ("0001", "evals_orm_0001"):
        _stamp(migrated, revision)
        engine = database.engine()
        try:
            assert [] == SqlEvalStorage(engine).list_studies()
        finally:
            engine.dispose()


def _script_directory() -> Any:
    from alembic.script import ScriptDirectory  # noqa: PLC0415 - only this test needs it

    return ScriptDirectory(str(migrations.script_location()))


# --- file databases: missing, read-only, full, damaged -------------------------

FILE_URLS = {"sqlite": "sqlite:///{}", "libsql": "sqlite+libsql:///{}"}


@pytest.mark.parametrize("backend_name", sorted(FILE_URLS))
def test_commands_on_a_missing_file_say_so_and_create_nothing(
    backend_name: str, tmp_path: Path
) -> None:
    """Read commands, `rebuild` and `ingest` on a missing file say so and create nothing."""
    path = tmp_path / "mistyped.db"
    url = FILE_URLS[backend_name].format(path)
    commands = [
        ["studies"],
        ["checkpoints", str(_study(0))],
        ["db", "current"],
        ["rebuild"],
        ["ingest", "-"],
    ]
    for command in commands:
        result = run("--url", url, *command, stdin="")
        assert 1 == result.code, command
        _one_sentence(result.stderr, f"there is no database at {path};")
    assert [] == list(tmp_path.iterdir())


@pytest.fixture
def mount(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs of its own, unmounted after the test (root only)."""
    point = tmp_path / "mount"
    point.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    command = ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(point)]
    if subprocess.run(command, check=False).returncode:
        pytest.skip("this machine does not allow mounting a tmpfs")
    try:
        yield point
    finally:
        subprocess.run(["umount", "-l", str(point)], check=False)


@pytest.mark.parametrize("backend_name", sorted(FILE_URLS))
def test_a_read_only_location_is_named(backend_name: str, mount: Path) -> None:
    """On a read-only mount every command names the read-only location, in one sentence."""
    path = mount / "evals.db"
    url = FILE_URLS[backend_name].format(path)
    assert 0 == run("--url", url, "db", "upgrade").code
    subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
    for command in (["studies"], ["db", "current"], ["rebuild"], ["ingest", "-"]):
        result = run("--url", url, *command, stdin=_lines([_created(0)]))
        assert 1 == result.code, command
        _one_sentence(result.stderr, f"cannot open the database {path}: its location is read-only")


@pytest.mark.parametrize("backend_name", sorted(FILE_URLS))
def test_a_full_disk_is_one_sentence_and_the_database_stays_readable(
    backend_name: str, mount: Path, tmp_path: Path
) -> None:
    """Ingest onto a full tmpfs fails in one sentence; what was committed stays readable."""
    path = mount / "evals.db"
    url = FILE_URLS[backend_name].format(path)
    assert 0 == run("--url", url, "db", "upgrade").code
    source = tmp_path / "many.jsonl"
    source.write_text(_lines(list(long_stream(20_000))), encoding="utf-8")
    result = run("--url", url, "ingest", str(source))
    assert 1 == result.code
    _one_sentence(result.stderr, "the database's disk is full (")
    assert 0 == run("--url", url, "studies").code


@pytest.mark.parametrize("backend_name", sorted(FILE_URLS))
@pytest.mark.parametrize("damage", ["header", "pages"])
def test_a_damaged_file_is_one_sentence(backend_name: str, damage: str, tmp_path: Path) -> None:
    """A file whose header or pages are overwritten fails every command in one sentence."""
    path = tmp_path / "evals.db"
    url = FILE_URLS[backend_name].format(path)
    assert 0 == run("--url", url, "db", "upgrade").code
    assert 0 == run("--url", url, "ingest", "-", stdin=_lines(list(long_stream(500)))).code
    data = bytearray(path.read_bytes())
    start_at = 0 if damage == "header" else 4096
    data[start_at : start_at + 8192] = b"\xff\xfe garbage " * (8192 // 11) + b"\xff" * (8192 % 11)
    path.write_bytes(bytes(data))
    for command in (["studies"], ["rebuild"], ["db", "upgrade"]):
        result = run("--url", url, *command)
        assert 1 == result.code, (command, result)
        assert 1 == len(result.stderr.splitlines()), result.stderr
        assert "garbage" not in result.stderr


# --- over-long lines ----------------------------------------------------------------


def test_an_over_long_line_is_a_bad_line_and_the_next_ones_go_in(migrated: sa.Engine) -> None:
    """A line over `max_line_bytes` is reported with the limit; the lines after it are ingested."""
    long_name = _created(1, name="x" * 500)
    lines = _lines([_created(0), long_name, _created(2)]).encode()
    for source in (io.BytesIO(lines), lines.splitlines(keepends=True)):
        report = ingest(source, SqlEventLog(migrated), max_line_bytes=400)
        assert [(2, "line longer than 400 bytes")] == [
            (bad.line, bad.reason) for bad in report.invalid
        ]
    assert 2 == _counts(migrated)[0]
    with pytest.raises(ValueError, match="max_line_bytes must be at least 1"):
        ingest([], SqlEventLog(migrated), max_line_bytes=0)


def test_cli_ingest_of_an_endless_line_holds_little_memory(
    database: Database, migrated: sa.Engine
) -> None:
    """`ingest /dev/zero` reads on in bounded memory; SIGINT stops it cleanly, no traceback."""
    process, _ = start("ingest", "/dev/zero", "--max-line-bytes", "1000000", database=database)
    try:
        # Once /dev/zero is open, the command is past its imports and reading.
        deadline = time.monotonic() + 60
        while "/dev/zero" not in _open_files(process.pid):
            assert time.monotonic() < deadline, "the command never opened /dev/zero"
            time.sleep(0.05)
        time.sleep(2)
        assert process.poll() is None
        status = Path(f"/proc/{process.pid}/status").read_text()
        peak_kib = int(
            next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1]
        )
    finally:
        process.send_signal(signal.SIGINT)
    result = finish((process, None))
    assert peak_kib < 200 * 1024
    # SIGINT finishes the work in hand; the endless line never ended, so it is not a line.
    assert (0, "") == (result.code, result.stderr)


def _open_files(pid: int) -> set[str]:
    files = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(FileNotFoundError):  # closed since the listing
            files.add(os.readlink(fd))
    return files


def test_cli_reports_an_over_long_line_with_its_place(
    database: Database, migrated: sa.Engine, tmp_path: Path
) -> None:
    """`ingest --max-line-bytes N` reports FILE:LINE: line longer than N bytes."""
    source = tmp_path / "long.jsonl"
    source.write_text(_lines([_created(0), _created(1, name="y" * 300)]), encoding="utf-8")
    result = run("ingest", "--max-line-bytes", "200", str(source), database=database)
    assert 1 == result.code
    assert f"{source}:2: line longer than 200 bytes\n" == result.stderr
    assert 1 == _counts(migrated)[0]


# --- a libSQL server killed during a long command ---------------------------------


@pytest.fixture
def sqld(tmp_path: Path) -> Iterator[SqldServer]:
    """A libSQL server of this test alone, so the test can kill it."""
    with contextlib.ExitStack() as stack:
        try:
            server = stack.enter_context(running_sqld(tmp_path / "sqld"))
        except (SqldUnavailable, SqldStartupError) as error:
            pytest.skip(f"no libSQL server: {error}")
        yield server


def _remote(server: SqldServer) -> Database:
    return Database("libsql-remote", server.sqlalchemy_url, server.auth_token)


# A host with logging configured; SQLAlchemy's pool logs (with a traceback)
# the failed reset of a connection to a dead server, which is no error of ours.
CATCH_UP = """
import logging
import sys
from evals_orm import EvalsError, SqlEvalProjection, SqlEventLog, create_engine
logging.getLogger().addHandler(logging.NullHandler())
engine = create_engine(sys.argv[1], auth_token=sys.argv[2])
try:
    SqlEvalProjection(engine).catch_up(SqlEventLog(engine))
except EvalsError as error:
    print(f"{type(error).__name__}: {error}", file=sys.stderr)
    sys.exit(1)
"""


@pytest.mark.parametrize("command", ["ingest", "rebuild", "catch_up"])
def test_a_libsql_server_killed_during_a_long_command_is_one_sentence(
    sqld: SqldServer, command: str, tmp_path: Path
) -> None:
    """Killing sqld mid-`ingest`, `rebuild` or `catch_up` ends it in one sentence, exit 1."""
    database = _remote(sqld)
    engine = database.engine()
    try:
        migrations.upgrade(engine)
        events = list(long_stream(30_000))
        if command != "ingest":
            SqlEventLog(engine).append(events)
    finally:
        engine.dispose()
    source = tmp_path / "events.jsonl"
    source.write_text(_lines(events), encoding="utf-8")
    if command == "catch_up":
        process = subprocess.Popen(
            [sys.executable, "-c", CATCH_UP, database.url, sqld.auth_token],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        started: tuple[subprocess.Popen[str], str | None] = (process, None)
    else:
        started = start(
            *([command, str(source)] if command == "ingest" else [command]), database=database
        )
    time.sleep(1.5)
    assert started[0].poll() is None, "the command ended before the server was killed"
    os.kill(sqld.pid, signal.SIGKILL)
    result = finish(started)
    assert 1 == result.code
    assert 1 == len(result.stderr.splitlines()), result.stderr
    # The CLI's line, or the name of the EvalsError the library raised.
    assert re.match(r"(evals-orm|\w+Error): ", result.stderr), result.stderr
    assert sqld.auth_token not in result.stderr


# --- writers during rebuilds --------------------------------------------------------

LOAD_WORKER = Path(__file__).with_name("reliability_worker.py")
LOAD_SECONDS = 8


@pytest.mark.slow
def test_writers_a_rebuild_loop_and_a_reader_lose_nothing(
    database: Database, migrated: sa.Engine
) -> None:
    """Three writers, a rebuild loop and a reader: every append lands, none waits for long."""
    SqlEventLog(migrated).append(long_stream(3000))
    environment = {**os.environ, **database.env()}
    roles = ["writer", "writer", "writer", "rebuild", "reader"]
    workers = [
        subprocess.Popen(
            [sys.executable, str(LOAD_WORKER), role, database.url, str(LOAD_SECONDS)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=environment,
        )
        for role in roles
    ]
    outputs = [worker.communicate(timeout=LOAD_SECONDS + 120) for worker in workers]
    assert [0] * len(roles) == [worker.returncode for worker in workers], outputs
    lines = [stdout.split() for stdout, _ in outputs]
    appended = sum(int(line[1]) for line in lines[:3])
    worst = max(float(line[3]) for line in lines[:3])
    assert 0 < int(lines[3][1])
    assert "0" == lines[4][3], "a reader saw a half-built projection"
    log, projection = SqlEventLog(migrated), SqlEvalProjection(migrated)
    assert 3000 + appended == log.count()
    assert 0 == projection.catch_up(log)
    live = _snapshot(migrated)
    projection.rebuild(log)
    assert live == _snapshot(migrated)
    # An append waits at most for a rebuild's step (a batch, or the final
    # replacement) and the writers queued before it, never for a whole
    # rebuild (README "Rebuilds and writers"; measured by
    # benchmarks/rebuild_wait.py). A loose bound, for a loaded machine.
    longest_rebuild = float(lines[3][3])
    assert worst < longest_rebuild + 3, f"an append waited {worst:.2f} s"


def _snapshot(engine: sa.Engine) -> tuple[list[Any], int]:
    storage = SqlEvalStorage(engine)
    studies = storage.list_studies()
    return studies, sum(storage.checkpoint_counts().values())


@pytest.mark.parametrize("command", ["ingest", "rebuild"])
def test_a_postgresql_connection_killed_during_a_long_command_is_one_sentence(
    backend: str, database: Database, migrated: sa.Engine, command: str, tmp_path: Path
) -> None:
    """A server-side kill of the command's session ends it in one sentence, exit 1."""
    if backend != "postgresql":
        pytest.skip("pg_terminate_backend is PostgreSQL's")
    events = list(long_stream(60_000))
    if command == "rebuild":
        SqlEventLog(migrated).append(events)
    source = tmp_path / "events.jsonl"
    source.write_text(_lines(events), encoding="utf-8")
    started = start(
        *([command, str(source)] if command == "ingest" else [command]), database=database
    )
    others = "FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
    with migrated.connect() as connection:
        deadline = time.monotonic() + 30
        while not connection.execute(sa.text(f"SELECT count(*) {others}")).scalar_one():
            assert time.monotonic() < deadline, "the command never connected"
            # pg_stat_activity is a snapshot per transaction.
            connection.rollback()
            time.sleep(0.05)
        connection.rollback()
        # Killed as soon as it is seen: on a quiet machine the whole command
        # can take less than a second. Between two of its transactions it may
        # hold no session for a moment: kill again until one was there to kill.
        killed = 0
        while not killed:
            assert started[0].poll() is None, "the command ended before its session was killed"
            killed = connection.execute(
                sa.text(f"SELECT count(pg_terminate_backend(pid)) {others}")
            ).scalar_one()
            connection.rollback()
            time.sleep(0.02)
    result = finish(started)
    assert 1 == result.code
    _one_sentence(result.stderr)


# --- the first use of a lock row -------------------------------------------------


def test_writers_racing_to_create_a_lock_row_all_get_it(migrated: sa.Engine) -> None:
    """Writers that queue behind an uncommitted first use of a lock row all take it in turn.

    On InnoDB the first writer's rollback leaves the two waiting upserts of
    the new row in a deadlock, and the server cancels one of them (error
    1213): the lock statement opened its transaction, so it is sent again.
    """
    first = migrated.connect()
    first.begin()
    _locks.lock(first, "race")
    outcomes: list[object] = []

    def take() -> None:
        try:
            with migrated.begin() as connection:
                outcomes.append(_locks.lock(connection, "race"))
        except Exception as error:  # the outcome is what the test asserts
            outcomes.append(error)

    waiters = [threading.Thread(target=take) for _ in range(2)]
    for waiter in waiters:
        waiter.start()
    time.sleep(0.5)  # both are waiting on the first one's row
    first.rollback()
    first.close()
    for waiter in waiters:
        waiter.join(60)
    assert [0, 0] == outcomes
