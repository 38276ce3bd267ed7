"""The projection as a running service: ``follow`` and ``evals-orm follow``, and ``ingest -`` live.

Followers and appenders run as real processes (the console script and
``append_worker.py``) on every backend; the projection they leave is compared
with a rebuild from the log.
"""

from __future__ import annotations

import json
import os
import queue
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import pytest
import sqlalchemy as sa
from conftest import Database

from evals_orm import (
    EvalsError,
    PeriodType,
    SqlEvalProjection,
    SqlEvalStorage,
    SqlEventLog,
    StoredEvalEvent,
    StudyCreated,
    StudyId,
    dumps,
    uuid7,
)

from support import raw_rows

WORKER = Path(__file__).with_name("append_worker.py")
# The generous bound on the time from an append's commit to its visibility
# (the benchmark measures the real latency).
VISIBLE_S = 5.0
# How long a process may take to start, append or stop on a loaded machine.
PATIENCE_S = 60.0
# How soon a stopped follower must have exited: the batch in hand is finished
# first, and a remote libSQL server may keep its lock statement waiting 5 s
# (sqld's transaction timeout) before it is served.
STOP_S = 15.0


def _command() -> list[str]:
    script = Path(sys.executable).with_name("evals-orm")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "evals_orm"]


def _environment(database: Database) -> dict[str, str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("EVALS_ORM_")}
    environment.update(database.env())
    return environment


class _Lines:
    """The lines of a process's output, read on a thread so a test can wait with a timeout."""

    def __init__(self, stream: IO[str]) -> None:
        self.seen: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self._queue.put(line)
        self._queue.put(None)

    def until(self, predicate: Callable[[str], bool], timeout: float = PATIENCE_S) -> str:
        """Return the first line from now on that satisfies ``predicate``."""
        deadline = time.monotonic() + timeout
        while True:
            line = self._queue.get(timeout=max(deadline - time.monotonic(), 0.001))
            if line is None:
                raise AssertionError(f"the output ended; it was {self.seen}")
            self.seen.append(line)
            if predicate(line):
                return line

    def rest(self) -> list[str]:
        """Return the lines left once the process has ended."""
        lines = []
        while (line := self._queue.get(timeout=PATIENCE_S)) is not None:
            lines.append(line)
        self.seen.extend(lines)
        return lines


class _Follower:
    """``evals-orm follow --json`` in a process of its own."""

    def __init__(self, database: Database, *args: str) -> None:
        self.process = subprocess.Popen(
            [*_command(), "follow", "--json", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**_environment(database), "PYTHONFAULTHANDLER": "1"},
        )
        assert self.process.stdout is not None
        assert self.process.stderr is not None
        self.stdout = _Lines(self.process.stdout)
        self.stderr = _Lines(self.process.stderr)

    def report(self, predicate: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        """Return the first progress report from now on that satisfies ``predicate``."""
        line = self.stdout.until(lambda line: predicate(json.loads(line)))
        report: dict[str, Any] = json.loads(line)
        return report

    def stop(self, signum: int = signal.SIGTERM) -> dict[str, Any]:
        """Send ``signum``; it must exit 0 within a few seconds; return its last report."""
        self.process.send_signal(signum)
        try:
            returncode = self.process.wait(timeout=STOP_S)
        except subprocess.TimeoutExpired:
            # PYTHONFAULTHANDLER: SIGABRT makes it print where each thread is.
            self.process.send_signal(signal.SIGABRT)
            self.process.wait(timeout=PATIENCE_S)
            where = "".join(self.stderr.rest())
            raise AssertionError(f"still running {STOP_S} s after {signum!r}:\n{where}") from None
        assert 0 == returncode
        last: dict[str, Any] = json.loads((self.stdout.rest() or self.stdout.seen)[-1])
        assert last["stopped"] is True
        assert "Traceback" not in "".join(self.stderr.rest())
        return last

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


def _appender(
    database: Database, studies: int, per_study: int, *, chunk: int = 3, pause_ms: int = 5
) -> subprocess.Popen[str]:
    args = [str(WORKER), database.url, str(studies), str(per_study), str(chunk), str(pause_ms)]
    return subprocess.Popen(
        [sys.executable, *args],
        stdout=subprocess.PIPE,
        text=True,
        env=_environment(database),
    )


def _finish(appender: subprocess.Popen[str]) -> None:
    appender.communicate(timeout=PATIENCE_S * 3)
    assert 0 == appender.returncode


_TABLES = (
    "SELECT id, name, status, period_type, period_value, config, created_at, started_at,"
    " stopped_at, last_event_id FROM studies ORDER BY id",
    "SELECT id, study_id, timestamp, metrics, events_analyzed, sessions_included"
    " FROM checkpoints ORDER BY id",
)


def _rows(engine: sa.Engine) -> list[list[tuple[Any, ...]]]:
    return [raw_rows(engine, sql) for sql in _TABLES]


def _position(engine: sa.Engine) -> int:
    rows = raw_rows(engine, "SELECT position FROM eval_tracking WHERE name = 'projection'")
    return int(rows[0][0]) if rows else 0


def _assert_equals_rebuild(engine: sa.Engine, events: int | None = None) -> None:
    """The projection equals a rebuild from the log (its first ``events`` events)."""
    projected = _rows(engine)
    log = SqlEventLog(engine)
    SqlEvalProjection(engine).rebuild(log.read(limit=events))
    assert _rows(engine) == projected


def _caught_up(follower: _Follower, engine: sa.Engine) -> dict[str, Any]:
    """Wait until ``follower`` reports that nothing is left; return that report."""
    count = SqlEventLog(engine).count()
    return follower.report(lambda report: report.get("behind") == 0 and _position(engine) == count)


def test_follower_projects_appends_of_other_processes_exactly_once(
    database: Database, migrated: sa.Engine
) -> None:
    """A follower applies each event appended by two other processes once; equal to a rebuild."""
    follower = _Follower(database)
    try:
        follower.report(lambda report: report.get("behind") == 0)
        appenders = [_appender(database, 3, 12), _appender(database, 2, 15)]
        for appender in appenders:
            _finish(appender)
        assert 3 * 12 + 2 * 15 == SqlEventLog(migrated).count()
        _caught_up(follower, migrated)
        last = follower.stop()
    finally:
        follower.kill()
    assert 3 * 12 + 2 * 15 == last["applied"]
    assert 5 == len(SqlEvalStorage(migrated).list_studies())
    _assert_equals_rebuild(migrated)


def test_an_append_is_visible_within_the_bound(database: Database, migrated: sa.Engine) -> None:
    """An event appended while a follower runs is readable in SqlEvalStorage within 5 s."""
    follower = _Follower(database)
    try:
        follower.report(lambda report: report.get("behind") == 0)
        storage = SqlEvalStorage(migrated)
        for n in range(3):
            study = StudyId(uuid7())
            SqlEventLog(migrated).append(
                StoredEvalEvent.new(StudyCreated(study, f"s{n}", PeriodType.DAILY))
            )
            appended = time.monotonic()
            while storage.get_study(study) is None:
                assert time.monotonic() - appended < VISIBLE_S
                time.sleep(0.01)
        assert 3 == follower.stop()["applied"]
    finally:
        follower.kill()


def test_sigterm_mid_stream_exits_0_with_whole_batches_applied(
    database: Database, migrated: sa.Engine
) -> None:
    """SIGTERM while events stream in: exit 0 soon, and the projection is a prefix of the log."""
    appender = _appender(database, 4, 150, chunk=5, pause_ms=2)
    follower = _Follower(database)
    try:
        follower.report(lambda report: report.get("applied", 0) > 0)
        last = follower.stop()
    finally:
        follower.kill()
        _finish(appender)
    position = _position(migrated)
    assert 0 < position == last["applied"]
    _assert_equals_rebuild(migrated, position)


def test_a_killed_follower_restarted_converges(database: Database, migrated: sa.Engine) -> None:
    """SIGKILL at any instant then a restart: the projection ends equal to a rebuild."""
    appender = _appender(database, 3, 100, chunk=4, pause_ms=2)
    follower = _Follower(database)
    try:
        follower.report(lambda report: report.get("applied", 0) > 0)
        follower.process.send_signal(signal.SIGKILL)
        assert -signal.SIGKILL == follower.process.wait(timeout=10)
    finally:
        follower.kill()
    restarted = _Follower(database)
    try:
        _finish(appender)
        _caught_up(restarted, migrated)
        restarted.stop()
    finally:
        restarted.kill()
    assert 300 == _position(migrated) == SqlEventLog(migrated).count()
    _assert_equals_rebuild(migrated)


def test_two_followers_never_apply_an_event_twice(database: Database, migrated: sa.Engine) -> None:
    """Two followers of one database at once: together they apply each event exactly once."""
    followers = [_Follower(database), _Follower(database, "--poll-interval", "0.05")]
    try:
        appenders = [_appender(database, 2, 40, chunk=2), _appender(database, 2, 40, chunk=7)]
        for appender in appenders:
            _finish(appender)
        for follower in followers:
            _caught_up(follower, migrated)
        applied = [follower.stop()["applied"] for follower in followers]
    finally:
        for follower in followers:
            follower.kill()
    assert 160 == sum(applied) == SqlEventLog(migrated).count()
    _assert_equals_rebuild(migrated)


def test_follow_once_catches_up_and_exits(database: Database, migrated: sa.Engine) -> None:
    """`follow --once` applies what the log holds, reports it and exits 0."""
    SqlEventLog(migrated).append(
        StoredEvalEvent.new(StudyCreated(StudyId(uuid7()), "s", PeriodType.DAILY))
    )
    follower = _Follower(database, "--once")
    try:
        assert 0 == follower.process.wait(timeout=PATIENCE_S)
        assert [{"applied": 1, "behind": 0}] == [
            {key: json.loads(line)[key] for key in ("applied", "behind")}
            for line in follower.stdout.rest()
        ]
    finally:
        follower.kill()
    assert 1 == len(SqlEvalStorage(migrated).list_studies())


def test_follow_in_process_stops_on_an_event_or_a_callable(migrated: sa.Engine) -> None:
    """``follow`` returns once its stop is set (Event or callable), having applied the log."""
    log = SqlEventLog(migrated)
    projection = SqlEvalProjection(migrated)
    log.append(StoredEvalEvent.new(StudyCreated(StudyId(uuid7()), "a", PeriodType.DAILY)))
    stop = threading.Event()
    lags: list[int] = []

    def seen(lag: Any) -> None:
        lags.append(lag.behind)
        if lag.behind == 0 and lag.applied == 1:
            stop.set()

    assert 1 == projection.follow(log, stop=stop, on_progress=seen)
    assert [1, 0] == lags
    log.append(StoredEvalEvent.new(StudyCreated(StudyId(uuid7()), "b", PeriodType.DAILY)))
    storage = SqlEvalStorage(migrated)
    stop_when_both = lambda: len(storage.list_studies()) == 2  # noqa: E731 - the stop under test
    assert 1 == projection.follow(log, poll_interval=0.01, stop=stop_when_both)


def test_follow_refuses_a_callers_transaction(migrated: sa.Engine) -> None:
    """``follow`` on a Connection bind is an EvalsError: it must commit each batch itself."""
    with migrated.connect() as connection:
        projection = SqlEvalProjection(connection)
        with pytest.raises(EvalsError, match="Engine or a sessionmaker"):
            projection.follow(SqlEventLog(connection))


def test_follower_survives_a_lost_connection(
    backend: str, database: Database, migrated: sa.Engine
) -> None:
    """Its connections killed, a follower reports one line, reconnects and keeps projecting."""
    if backend != "postgresql":
        pytest.skip("only PostgreSQL can cut a client's connections from outside")
    follower = _Follower(database)
    try:
        follower.report(lambda report: report.get("behind") == 0)
        with migrated.connect() as connection:
            connection.execute(
                sa.text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
            )
        assert "retrying" in follower.stdout.until(lambda line: "error" in line)
        study = StudyId(uuid7())
        SqlEventLog(migrated).append(
            StoredEvalEvent.new(StudyCreated(study, "after", PeriodType.DAILY))
        )
        follower.report(lambda report: report.get("applied") == 1)
        follower.process.send_signal(signal.SIGTERM)
        assert 0 == follower.process.wait(timeout=10)
        errors = follower.stderr.rest()
    finally:
        follower.kill()
    assert 1 == len(errors)
    assert "retrying with backoff" in errors[0]
    assert "Traceback" not in errors[0]


# --- ingest - on a pipe that stays open --------------------------------------------------


def _ingest_stdin(database: Database) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [*_command(), "ingest", "-"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_environment(database),
    )


def _send(process: subprocess.Popen[bytes], line: str) -> None:
    assert process.stdin is not None
    process.stdin.write(f"{line}\n".encode())
    process.stdin.flush()


def _visible(storage: SqlEvalStorage, study: StudyId, within: float = VISIBLE_S) -> None:
    deadline = time.monotonic() + within
    while storage.get_study(study) is None:
        assert time.monotonic() < deadline, f"study {study} not visible within {within} s"
        time.sleep(0.01)


def _created(name: str) -> tuple[StudyId, str]:
    study = StudyId(uuid7())
    return study, dumps(StoredEvalEvent.new(StudyCreated(study, name, PeriodType.DAILY)))


def test_ingest_stdin_commits_lines_while_the_pipe_stays_open(
    database: Database, migrated: sa.Engine
) -> None:
    """Lines fed slowly to `ingest -` are visible before the pipe closes; bad ones reported then."""
    storage = SqlEvalStorage(migrated)
    process = _ingest_stdin(database)
    try:
        for n in range(3):
            study, line = _created(f"slow-{n}")
            _send(process, line)
            # The first line also waits for the command to start.
            _visible(storage, study, PATIENCE_S if n == 0 else VISIBLE_S)
        _send(process, "{not json")
        assert process.stderr is not None
        assert select.select([process.stderr], [], [], VISIBLE_S)[0]
        assert process.stderr.readline().decode().startswith("<stdin>:4: ")
        stdout, stderr = process.communicate(timeout=PATIENCE_S)
    finally:
        process.kill()
        process.wait()
    assert (1, b"") == (process.returncode, stderr)
    assert b"4 events read, 3 new, 0 already logged, 1 bad\n" == stdout


def test_ingest_stdin_finishes_its_batch_on_sigterm(
    database: Database, migrated: sa.Engine
) -> None:
    """SIGTERM to `ingest -` on an open pipe: the lines it read are committed, exit 0."""
    process = _ingest_stdin(database)
    studies = []
    try:
        for n in range(5):
            study, line = _created(f"term-{n}")
            studies.append(study)
            _send(process, line)
        _visible(SqlEvalStorage(migrated), studies[0], PATIENCE_S)
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=10)
    finally:
        process.kill()
        process.wait()
    assert (0, b"") == (process.returncode, stderr)
    assert b"5 events read, 5 new, 0 already logged, 0 bad\n" == stdout
    assert set(studies) == {study.id for study in SqlEvalStorage(migrated).list_studies()}


def test_the_readme_service_example_runs(database: Database, migrated: sa.Engine) -> None:
    """The README's "Running the projection as a service" example runs as written."""
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = text.split("## Running the projection as a service", 1)[1]
    example = section.split("```python\n", 1)[1].split("```", 1)[0]
    exec(compile(example, "README.md", "exec"), {"url": database.url_with_token})
    assert ["followed"] == [study.name for study in SqlEvalStorage(migrated).list_studies()]


def test_lag_counts_the_events_not_projected_yet(migrated: sa.Engine) -> None:
    """``lag`` reports the events behind and when the newest projected one occurred."""
    log = SqlEventLog(migrated)
    projection = SqlEvalProjection(migrated)
    first, second = (
        StoredEvalEvent.new(StudyCreated(StudyId(uuid7()), name, PeriodType.DAILY))
        for name in ("a", "b")
    )
    log.append([first, second])
    assert (2, None) == (projection.lag(log).behind, projection.lag(log).newest_applied_at)
    projection.catch_up(log)
    assert (0, second.occurred_at) == (
        projection.lag(log).behind,
        projection.lag(log).newest_applied_at,
    )
