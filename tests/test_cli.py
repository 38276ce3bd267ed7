"""The ``evals-orm`` command line, run as installed: a subprocess of the console script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from uuid import UUID

import attrs
import pytest
import sqlalchemy as sa
from conftest import Database

from evals_orm import (
    CheckpointId,
    CheckpointRecorded,
    LongitudinalMetrics,
    PeriodType,
    SqlEvalProjection,
    SqlEvalStorage,
    SqlEventLog,
    StoredEvalEvent,
    StudyConfig,
    StudyCreated,
    StudyId,
    StudyStarted,
    StudyStatus,
    TimePeriod,
    dumps,
    migrations,
    uuid7_at,
)

T0 = datetime(2025, 1, 6, 9, 0, tzinfo=timezone.utc)
STUDY_A = StudyId(UUID("0194398e-9e00-7000-8000-00000000000a"))
STUDY_B = StudyId(UUID("0194398e-9e00-7000-8000-00000000000b"))
UNKNOWN_STUDY = UUID("0194398e-9e00-7000-8000-0000000000ff")


def _command() -> list[str]:
    """The installed console script next to this interpreter, else ``python -m evals_orm``."""
    script = Path(sys.executable).with_name("evals-orm")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "evals_orm"]


@attrs.frozen
class Result:
    code: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)


def start(
    *args: str,
    database: Database | None = None,
    stdin: str | None = None,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
) -> tuple[subprocess.Popen[str], str | None]:
    """Start ``evals-orm ARGS`` (pointed at ``database`` with --url/--auth-token)."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("EVALS_ORM_")}
    environment["PYTHONIOENCODING"] = "utf-8"
    environment.update(env or {})
    options: list[str] = []
    if database is not None:
        options = ["--url", database.url]
        if database.auth_token:
            options += ["--auth-token", database.auth_token]
    process = subprocess.Popen(
        [*_command(), *options, *args],
        stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        encoding="utf-8",
        cwd=cwd,
        env=environment,
    )
    return process, stdin


def finish(started: tuple[subprocess.Popen[str], str | None]) -> Result:
    """Wait for a started command; no traceback may ever reach its stderr."""
    process, stdin = started
    stdout, stderr = process.communicate(stdin, timeout=120)
    assert "Traceback" not in stderr
    return Result(process.returncode, stdout, stderr)


def run(
    *args: str,
    database: Database | None = None,
    stdin: str | None = None,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
) -> Result:
    """Run ``evals-orm ARGS`` to the end."""
    return finish(start(*args, database=database, stdin=stdin, cwd=cwd, env=env))


def _checkpoint(study: StudyId, number: int, success: float) -> StoredEvalEvent:
    end = T0 + timedelta(days=number)
    metrics = LongitudinalMetrics(
        sessions_completed=10 + number,
        session_success_rate=success,
        tasks_completed=40 + number,
        tool_success_rate=0.9,
        total_tokens=100_000 * number,
        total_cost=2.5 * number,
        period=TimePeriod(end - timedelta(days=1), end),
    )
    return StoredEvalEvent(
        uuid7_at(end + timedelta(minutes=1), 1),
        CheckpointRecorded(
            CheckpointId(UUID(int=number)),
            study,
            end,
            metrics,
            events_analyzed=100 * number,
            sessions_included=tuple(f"s{number}-{k}" for k in range(3)),
        ),
    )


def _stream() -> list[StoredEvalEvent]:
    """Study A running with three daily checkpoints; study B pending, created later."""
    return [
        StoredEvalEvent(
            uuid7_at(T0, 1),
            StudyCreated(STUDY_A, "alpha", PeriodType.DAILY, 1, StudyConfig("first", ("x",))),
        ),
        StoredEvalEvent(uuid7_at(T0 + timedelta(hours=1), 1), StudyStarted(STUDY_A)),
        _checkpoint(STUDY_A, 1, 0.5),
        _checkpoint(STUDY_A, 2, 0.625),
        _checkpoint(STUDY_A, 3, 0.75),
        StoredEvalEvent(
            uuid7_at(T0 + timedelta(days=5), 1), StudyCreated(STUDY_B, "beta", PeriodType.WEEKLY)
        ),
    ]


def _jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    return path


def test_db_commands_migrate_and_an_unmigrated_schema_says_what_to_run(database: Database) -> None:
    """`db upgrade/downgrade` report the revision; a query before them says what to run."""
    failed = run("studies", database=database)
    assert (1, "") == (failed.code, failed.stdout)
    assert 1 == len(failed.stderr.splitlines())
    assert "run `evals-orm db upgrade`" in failed.stderr

    upgraded = run("db", "upgrade", database=database)
    assert (0, "upgraded the database to revision evals_orm_0002\n") == (
        upgraded.code,
        upgraded.stdout,
    )
    assert "evals_orm_0002" == migrations.current(database.url, auth_token=database.auth_token)
    # `db current` into a pipe whose reader is gone (`| head`) ends quietly.
    piped, _ = start("db", "current", database=database)
    assert piped.stdout is not None
    piped.stdout.close()
    piped_stderr = piped.stderr.read() if piped.stderr is not None else ""
    assert (141, "") == (piped.wait(timeout=120), piped_stderr)

    downgraded = run("db", "downgrade", "base", "--json", database=database)
    assert (0, {"revision": None}) == (downgraded.code, downgraded.json())
    assert None is migrations.current(database.url, auth_token=database.auth_token)


def test_ingest_reports_bad_lines_and_writes_only_the_good_ones(
    database: Database, migrated: sa.Engine, tmp_path: Path
) -> None:
    """Bad lines are reported as FILE:LINE: reason, nothing of them is written, exit 1."""
    created, started, checkpoint = _stream()[:3]
    good = [dumps(created), dumps(started), dumps(checkpoint)]
    naive = dumps(checkpoint).replace(
        '"timestamp":"2025-01-07T09:00:00Z"', '"timestamp":"2025-01-07T09:00:00"'
    )
    orphan = _checkpoint(StudyId(UNKNOWN_STUDY), 4, 0.5)
    conflict = StoredEvalEvent(
        created.event_id, StudyCreated(STUDY_A, "renamed", PeriodType.DAILY, 1)
    )
    path = _jsonl(
        tmp_path / "events.jsonl",
        [
            good[0],
            good[1],
            "{not json",
            dumps(started).replace("study_started", "study_exploded"),
            "",
            naive,
            dumps(started).replace(str(started.event_id), "4f9d1c4e-0d3a-4d53-9c1e-5b8c2f0a7e61"),
            dumps(orphan),
            good[2],
            dumps(conflict),
        ],
    )

    first = run("ingest", str(path), "--json", database=database)

    assert 1 == first.code
    bad_lines = [3, 4, 6, 7, 8, 10]
    assert [f"{path}:{line}:" for line in bad_lines] == [
        report.split(" ", 1)[0] for report in first.stderr.splitlines()
    ]
    assert "study_exploded" in first.stderr.splitlines()[1]
    assert "timestamp" in first.stderr.splitlines()[2]
    assert "version 7" in first.stderr.splitlines()[3]
    assert f"study {UNKNOWN_STUDY} does not exist" in first.stderr.splitlines()[4]
    assert "already logged with another payload" in first.stderr.splitlines()[5]
    summary = first.json()
    assert {"read": 9, "new": 3, "already_logged": 0, "bad": 6} == {
        key: summary[key] for key in ("read", "new", "already_logged", "bad")
    }
    assert [{"source": str(path), "line": line} for line in bad_lines] == [
        {"source": bad["source"], "line": bad["line"]} for bad in summary["invalid_lines"]
    ]
    assert 3 == SqlEventLog(migrated).count()
    storage = SqlEvalStorage(migrated)
    assert [(STUDY_A, StudyStatus.RUNNING)] == [(s.id, s.status) for s in storage.list_studies()]
    assert [checkpoint.event.to_checkpoint()] == storage.get_checkpoints(STUDY_A)  # type: ignore[union-attr]

    again = run("ingest", "-", stdin=path.read_text(encoding="utf-8"), env=database.env())
    assert 1 == again.code
    assert "9 events read, 0 new, 3 already logged, 6 bad\n" == again.stdout
    assert "<stdin>:3:" == again.stderr.split(" ", 1)[0]
    assert 3 == SqlEventLog(migrated).count()


def test_rebuild_and_queries_show_the_projection(database: Database, migrated: sa.Engine) -> None:
    """`rebuild` projects the log; `studies` and `checkpoints` print tables and JSON."""
    SqlEventLog(migrated).append(_stream())

    rebuilt = run("rebuild", "--json", database=database)
    assert (0, {"events": 6}) == (rebuilt.code, rebuilt.json())
    assert 2 == len(SqlEvalStorage(migrated).list_studies())

    # The reads are independent: run them side by side.
    started = [
        start("studies", database=database),
        start("--json", "studies", "--status", "running", database=database),
        start("checkpoints", str(STUDY_A), database=database),
        start(
            "checkpoints",
            str(STUDY_A),
            "--from",
            "2025-01-08T10:00:00+01:00",
            "--to",
            "2025-01-09T09:00:00Z",
            "--json",
            database=database,
        ),
        start("checkpoints", str(STUDY_A), "--latest", "--json", database=database),
        start("checkpoints", str(UNKNOWN_STUDY), database=database),
    ]
    table, running, listed, ranged, latest, unknown = [finish(one) for one in started]

    assert 0 == table.code
    header, rule, *rows = table.stdout.splitlines()
    assert [
        "id",
        "name",
        "status",
        "period",
        "created",
        "(UTC)",
        "started",
        "(UTC)",
        "stopped",
        "(UTC)",
        "checkpoints",
    ] == header.split()
    assert [
        [str(STUDY_B), "beta", "pending", "weekly", "2025-01-11", "09:00", "-", "-", "0"],
        [
            str(STUDY_A),
            "alpha",
            "running",
            "daily",
            "(1)",
            "2025-01-06",
            "09:00",
            "2025-01-06",
            "10:00",
            "-",
            "3",
        ],
    ] == [row.split() for row in rows]
    assert len(header) == len(rule)

    assert 0 == running.code
    assert [
        {
            "id": str(STUDY_A),
            "name": "alpha",
            "status": "running",
            "period_type": "daily",
            "period_value": 1,
            "config": {"description": "first", "tags": ["x"]},
            "created_at": "2025-01-06T09:00:00Z",
            "started_at": "2025-01-06T10:00:00Z",
            "stopped_at": None,
            "checkpoints": 3,
        }
    ] == running.json()

    assert 0 == listed.code
    lines = listed.stdout.splitlines()
    assert ["timestamp", "(UTC)", "events", "sessions", "success"] == lines[0].split()[:5]
    assert [
        ["2025-01-07", "09:00:00", "100", "3", "50.0%"],
        ["2025-01-08", "09:00:00", "200", "3", "62.5%"],
        ["2025-01-09", "09:00:00", "300", "3", "75.0%"],
    ] == [line.split()[:5] for line in lines[2:]]

    assert 0 == ranged.code
    assert [json.loads(dumps(_stream()[3].event.to_checkpoint()))] == ranged.json()  # type: ignore[union-attr]

    assert (0, ["2025-01-09T09:00:00Z"]) == (
        latest.code,
        [checkpoint["timestamp"] for checkpoint in latest.json()],
    )

    assert (1, "", f"evals-orm: no study {UNKNOWN_STUDY}\n") == (
        unknown.code,
        unknown.stdout,
        unknown.stderr,
    )


def test_demo_loads_a_sample_stream_once_and_charts_it(database: Database) -> None:
    """`demo` migrates, ingests a deterministic stream (idempotently) and draws sparklines."""
    first = run("demo", database=database)
    assert (0, "") == (first.code, first.stderr)
    assert "42 sample events, 42 new" in first.stdout
    assert any(spark in first.stdout for spark in "▁▂▃▄▅▆▇█")
    for name in ("baseline-agent", "swarm-coordination", "learning-transfer", "cost-reduction-q2"):
        assert name in first.stdout

    second = run("demo", "--json", database=database)
    assert 0 == second.code
    result = second.json()
    assert (42, 0) == (result["read"], result["new"])
    assert {
        "baseline-agent": ("stopped", 8),
        "swarm-coordination": ("running", 20),
        "learning-transfer": ("paused", 3),
        "cost-reduction-q2": ("pending", 0),
    } == {study["name"]: (study["status"], study["checkpoints"]) for study in result["studies"]}
    engine = database.engine()
    try:
        assert 0 == SqlEvalProjection(engine).catch_up(SqlEventLog(engine))
    finally:
        engine.dispose()


USAGE_ERRORS = [
    (["studies", "--status", "bogus"], "argument --status: invalid choice: 'bogus'"),
    (["checkpoints", "not-a-uuid"], "'not-a-uuid' is not a study id"),
    (
        ["checkpoints", str(UNKNOWN_STUDY), "--from", "2025-01-01T00:00:00"],
        "'2025-01-01T00:00:00' is not an RFC 3339 time with an offset",
    ),
    (
        ["checkpoints", str(UNKNOWN_STUDY), "--to", "yesterday"],
        "'yesterday' is not an RFC 3339 time with an offset",
    ),
    (
        [
            "checkpoints",
            str(UNKNOWN_STUDY),
            "--from",
            "2025-02-01T00:00:00Z",
            "--to",
            "2025-01-01T00:00:00Z",
        ],
        "--from must not be later than --to",
    ),
    (["ingest", "missing.jsonl"], "cannot read missing.jsonl: No such file or directory"),
    (["--url", "oracle://localhost/x", "studies"], "unsupported database URL scheme"),
    (["db", "downgrade"], "the following arguments are required: REV"),
]


def test_usage_errors_exit_2_with_one_sentence(tmp_path: Path) -> None:
    """A bad option, id, time, file or URL exits 2 with one line on stderr, writing nothing."""
    started = [start(*args, cwd=tmp_path) for args, _ in USAGE_ERRORS]
    results = [finish(one) for one in started]
    assert [(2, "", 1, True) for _ in USAGE_ERRORS] == [
        (result.code, result.stdout, len(result.stderr.splitlines()), expected in result.stderr)
        for result, (_, expected) in zip(results, USAGE_ERRORS, strict=True)
    ], [result.stderr for result in results]
    assert [] == list(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("sqlite:///{tmp}/no/such/directory/evals.db", "evals-orm: there is no database at"),
        ("postgresql://postgres@127.0.0.1:1/evals", "evals-orm: cannot reach the database"),
        ("mysql://root@127.0.0.1:1/evals", "evals-orm: cannot reach the database"),
    ],
)
def test_an_unreachable_database_exits_1_with_one_sentence(
    url: str, expected: str, tmp_path: Path
) -> None:
    """A database that cannot be reached is reported in one sentence, exit 1."""
    result = run("studies", "--url", url.format(tmp=tmp_path))
    assert (1, "") == (result.code, result.stdout)
    assert 1 == len(result.stderr.splitlines())
    assert result.stderr.startswith(expected)
