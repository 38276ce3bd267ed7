"""Embedded replicas of a real sqld primary: sync visibility, no torn reads, refused writes, CLI.

Each test starts its own ``sqld`` (``evals_orm._sqld.running_sqld``); the
replicas are libSQL files made by ``create_engine(..., sync_url=...)``.
"""

from __future__ import annotations

import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from test_cli import run

from evals_orm import (
    CheckpointId,
    CheckpointRecorded,
    ConfigurationError,
    DatabaseError,
    PeriodType,
    SchemaMissingError,
    SqlEvalProjection,
    SqlEvalStorage,
    SqlEventLog,
    StoredEvalEvent,
    StudyCreated,
    StudyId,
    StudyStarted,
    create_engine,
    migrations,
    sync,
    uuid7,
)
from evals_orm._demo import FEATURED_STUDY
from evals_orm._sqld import SqldServer, running_sqld

# Checkpoints each batch records for its one new study: a torn batch would
# show a study with fewer.
CHECKPOINTS = 5
T0 = datetime(2025, 1, 6, 9, 0, tzinfo=timezone.utc)
_KEY = "replica-test-encryption-key-0123"
_CANARY = "canary-study-name-in-plaintext"
_REFUSED = "does not write through an embedded replica"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[SqldServer]:
    """A running sqld primary of its own."""
    with running_sqld(tmp_path / "sqld") as running:
        yield running


@pytest.fixture
def primary(server: SqldServer) -> Iterator[sa.Engine]:
    """An Engine on the primary, migrated."""
    engine = create_engine(server.url, auth_token=server.auth_token)
    migrations.upgrade(engine)
    yield engine
    engine.dispose()


def _replica(server: SqldServer, path: Path) -> sa.Engine:
    return create_engine(
        f"sqlite+libsql:///{path}", sync_url=server.url, auth_token=server.auth_token
    )


@pytest.fixture
def replicas(server: SqldServer, primary: sa.Engine, tmp_path: Path) -> Iterator[list[sa.Engine]]:
    """Two embedded replicas of the migrated primary, synced once."""
    engines = [_replica(server, tmp_path / f"replica{n}.db") for n in (1, 2)]
    for engine in engines:
        sync(engine)
    yield engines
    for engine in engines:
        engine.dispose()


def _batch(name: str) -> list[StoredEvalEvent]:
    """A new running study and its ``CHECKPOINTS`` checkpoints, in stream order."""
    study = StudyId(uuid7())
    events = [
        StoredEvalEvent.new(StudyCreated(study, name, PeriodType.DAILY, 1)),
        StoredEvalEvent.new(StudyStarted(study)),
    ]
    events += [
        StoredEvalEvent.new(
            CheckpointRecorded(CheckpointId(uuid7()), study, T0 + timedelta(days=day))
        )
        for day in range(CHECKPOINTS)
    ]
    return events


def _append(engine: sa.Engine, events: list[StoredEvalEvent]) -> None:
    SqlEventLog(engine).append(events, projection=SqlEvalProjection(engine))


def _state(engine: sa.Engine) -> tuple[list[str], dict[StudyId, int]]:
    """The study names and checkpoint counts ``engine`` reads, in one read each."""
    storage = SqlEvalStorage(engine)
    return sorted(study.name for study in storage.list_studies()), storage.checkpoint_counts()


def test_replicas_see_a_batch_after_sync_only_and_all_of_it(
    primary: sa.Engine, replicas: list[sa.Engine]
) -> None:
    """Two replicas read nothing of a batch before ``sync`` and the whole batch after."""
    _append(primary, _batch("first"))
    before = [_state(replica) for replica in replicas]
    for replica in replicas:
        sync(replica)
    after = [_state(replica) for replica in replicas]
    _append(primary, _batch("second"))
    for replica in replicas:
        sync(replica)
    final = [_state(replica) for replica in replicas]
    assert [([], {})] * 2 == before
    assert [_state(primary)] * 2 == final
    for names, counts in after:
        assert (["first"], [CHECKPOINTS]) == (names, list(counts.values()))
    assert ["first", "second"] == final[0][0]


def test_a_reader_on_a_replica_never_sees_a_torn_batch(
    primary: sa.Engine, replicas: list[sa.Engine]
) -> None:
    """While the primary takes batch after batch, a replica synced in a loop reads whole batches.

    Every batch creates one study with ``CHECKPOINTS`` checkpoints in one
    transaction: each read must show every study with all of them, and the
    checkpoint total a multiple of the batch.
    """
    batches = 12
    done = threading.Event()
    failures: list[BaseException] = []

    def write() -> None:
        try:
            for number in range(batches):
                _append(primary, _batch(f"study-{number:02}"))
        except BaseException as error:  # reported by the reader's thread
            failures.append(error)
        finally:
            done.set()

    writer = threading.Thread(target=write)
    writer.start()
    seen: Counter[int] = Counter()
    torn: list[dict[StudyId, int]] = []
    while not done.is_set():
        sync(replicas[0])
        names, counts = _state(replicas[0])
        seen[len(names)] += 1
        if set(counts.values()) - {CHECKPOINTS} or len(counts) != len(names):
            torn.append(counts)
    writer.join()
    sync(replicas[0])
    names, counts = _state(replicas[0])
    assert [] == failures
    assert [] == torn
    assert [f"study-{number:02}" for number in range(batches)] == names
    assert {CHECKPOINTS} == set(counts.values())
    # The loop did read while the primary was being written.
    assert len(seen) > 1


def test_a_replica_with_a_sync_interval_catches_up_by_itself(
    server: SqldServer, primary: sa.Engine, tmp_path: Path
) -> None:
    """With ``sync_interval`` the driver pulls in the background: whole batches, no ``sync``."""
    replica = create_engine(
        f"sqlite+libsql:///{tmp_path / 'replica.db'}",
        sync_url=server.url,
        auth_token=server.auth_token,
        sync_interval=0.1,
    )
    states = [_state(replica)]
    for number in range(3):
        _append(primary, _batch(f"study-{number}"))
    deadline = time.monotonic() + 10
    while states[-1] != _state(primary) and time.monotonic() < deadline:
        time.sleep(0.02)
        states.append(_state(replica))
    replica.dispose()
    assert ([], {}) == states[0]
    assert _state(primary) == states[-1]
    assert [] == [counts for _, counts in states if set(counts.values()) - {CHECKPOINTS}]


def test_a_replica_outlives_its_primary_and_catches_up_when_it_is_back(
    server: SqldServer, primary: sa.Engine, replicas: list[sa.Engine]
) -> None:
    """The primary stopped: reads served, ``sync`` says why; restarted: ``sync`` catches up.

    The primary comes back on the same port, data and key; the batch written
    after it is back reaches the replica whole with the next ``sync``.
    """
    replica = replicas[0]
    _append(primary, _batch("before"))
    sync(replica)
    primary.dispose()
    server.stop()
    while_down = _state(replica)
    with pytest.raises(DatabaseError) as raised:
        sync(replica)
    server.start()
    _append(primary, _batch("after"))
    before_sync = _state(replica)
    sync(replica)
    names, counts = _state(replica)
    message = str(raised.value)
    assert (["before"], [CHECKPOINTS]) == (while_down[0], list(while_down[1].values()))
    assert while_down == before_sync
    assert message.startswith("cannot sync the embedded replica with its primary (")
    assert "\n" not in message
    assert server.auth_token not in message
    assert _state(primary) == (names, counts)
    assert (["after", "before"], {CHECKPOINTS}) == (names, set(counts.values()))


def test_sync_gives_up_on_a_primary_that_does_not_answer(
    server: SqldServer, primary: sa.Engine, replicas: list[sa.Engine], tmp_path: Path
) -> None:
    """A frozen primary (SIGSTOP: it accepts TCP, never answers) fails ``sync`` after its timeout.

    The replica keeps serving reads, a fresh replica engine of the same file
    too (it reads the local file and refuses writes); once the primary runs
    again, ``sync`` pulls the batch written meanwhile, whole.
    """
    replica = replicas[0]
    _append(primary, _batch("before"))
    sync(replica)
    with server.paused():
        with pytest.raises(DatabaseError) as raised:
            sync(replica, timeout=1)
        while_frozen = _state(replica)
        reopened = _replica(server, tmp_path / "replica1.db")
        reopened_state = _state(reopened)
        with reopened.connect() as connection, pytest.raises(sa.exc.OperationalError) as write:
            connection.exec_driver_sql("CREATE TABLE local_only (value TEXT)")
        with pytest.raises(DatabaseError) as reopened_sync:
            sync(reopened, timeout=1)
    _append(primary, _batch("after"))
    sync(replica)
    sync(reopened)
    message = str(raised.value)
    assert (["before"], [CHECKPOINTS]) == (while_frozen[0], list(while_frozen[1].values()))
    assert while_frozen == reopened_state
    assert "readonly" in str(write.value)
    assert message == str(reopened_sync.value)
    assert message.startswith(
        "cannot sync the embedded replica with its primary (the primary did not answer within 1 s)"
    )
    assert _state(primary) == _state(replica) == _state(reopened)
    assert ["after", "before"] == _state(replica)[0]
    reopened.dispose()


def _writes(replica: sa.Engine, events: list[StoredEvalEvent]) -> dict[str, Callable[[], Any]]:
    log, projection = SqlEventLog(replica), SqlEvalProjection(replica)
    return {
        "append": lambda: log.append(events),
        "append inline": lambda: log.append(events, projection=projection),
        "apply_many": lambda: projection.apply_many(events),
        "rebuild": lambda: projection.rebuild(log),
        "catch_up": lambda: projection.catch_up(log),
        "clear": projection.clear,
        "upgrade": lambda: migrations.upgrade(replica),
        "downgrade": lambda: migrations.downgrade(replica, "base"),
        "append on a Connection": lambda: _on_connection(replica, events),
    }


def _on_connection(replica: sa.Engine, events: list[StoredEvalEvent]) -> None:
    with replica.connect() as connection:
        SqlEventLog(connection).append(events)


_WRITES = [
    "append",
    "append inline",
    "apply_many",
    "rebuild",
    "catch_up",
    "clear",
    "upgrade",
    "downgrade",
    "append on a Connection",
]


@pytest.mark.parametrize("write", _WRITES)
def test_every_write_through_a_replica_is_refused_at_once(
    write: str, primary: sa.Engine, replicas: list[sa.Engine]
) -> None:
    """Appends, projection writes and migrations through a replica fail before writing anything.

    The error is one sentence telling to write through the primary; the
    primary's log, projection and lock rows are untouched.
    """
    _append(primary, _batch("kept"))
    before = _rows(primary)
    with pytest.raises(ConfigurationError, match=_REFUSED) as raised:
        _writes(replicas[0], _batch("refused"))[write]()
    assert before == _rows(primary)
    assert "primary" in str(raised.value)
    assert "\n" not in str(raised.value)


def _rows(engine: sa.Engine) -> list[Any]:
    """Every row of the log, the projection and the lock rows, for before/after comparisons."""
    with engine.connect() as connection:
        return [
            connection.exec_driver_sql(f"SELECT * FROM {table} ORDER BY 1").all()
            for table in ("eval_events", "studies", "checkpoints", "eval_tracking")
        ]


def test_a_replica_of_an_unmigrated_primary_says_to_migrate(
    server: SqldServer, tmp_path: Path
) -> None:
    """Reading a replica whose primary was never migrated raises SchemaMissingError."""
    replica = _replica(server, tmp_path / "replica.db")
    sync(replica)
    with pytest.raises(SchemaMissingError, match="upgrade"):
        SqlEvalStorage(replica).list_studies()
    replica.dispose()


# --- the command line -----------------------------------------------------------


@pytest.fixture
def cli_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI runs as a user's would: no RUST_LOG to quiet the driver's log lines."""
    monkeypatch.delenv("RUST_LOG", raising=False)


@pytest.mark.usefixtures("cli_env")
def test_cli_sync_pulls_and_json_output_stays_clean(
    server: SqldServer, primary: sa.Engine, tmp_path: Path
) -> None:
    """``evals-orm sync`` pulls into the replica; --json stdout is JSON alone, reads included.

    The replica's primary and token come from the environment; writes through
    the replica are refused with one sentence and leave the primary as it was.
    """
    url = f"sqlite+libsql:///{tmp_path / 'replica.db'}"
    env = {"EVALS_ORM_SYNC_URL": server.url, "EVALS_ORM_AUTH_TOKEN": server.auth_token}
    _append(primary, _batch("synced"))
    synced = run("--url", url, "sync", "--json", env=env)
    text = run("--url", url, "sync", env=env)
    studies = run("--url", url, "studies", "--json", env=env)
    before = _rows(primary)
    refused = run("--url", url, "rebuild", env=env)
    assert (0, {"synced": True, "replica": url, "driver_report": None}) == (
        synced.code,
        synced.json(),
    )
    assert f"synced {url} from its primary (the driver reported nothing)\n" == text.stdout
    assert ["synced"] == [study["name"] for study in studies.json()]
    assert "" == synced.stderr + studies.stderr
    assert (2, "") == (refused.code, refused.stdout)
    assert _REFUSED in refused.stderr
    assert 1 == len(refused.stderr.splitlines())
    assert before == _rows(primary)


@pytest.mark.usefixtures("cli_env")
def test_cli_sync_with_the_primary_stopped_and_back(
    server: SqldServer, primary: sa.Engine, tmp_path: Path
) -> None:
    """``evals-orm sync`` while the primary is stopped: one sentence, exit 1; back: it catches up.

    The replica's studies stay readable from the command line meanwhile.
    """
    url = f"sqlite+libsql:///{tmp_path / 'replica.db'}"
    env = {"EVALS_ORM_SYNC_URL": server.url, "EVALS_ORM_AUTH_TOKEN": server.auth_token}
    _append(primary, _batch("before"))
    run("--url", url, "sync", env=env)
    primary.dispose()
    server.stop()
    down = run("--url", url, "sync", "--json", env=env)
    read_down = run("--url", url, "studies", "--json", env=env)
    server.start()
    _append(primary, _batch("after"))
    back = run("--url", url, "sync", "--json", env=env)
    read_back = run("--url", url, "studies", "--json", env=env)
    assert (1, "") == (down.code, down.stdout)
    assert "cannot sync the embedded replica with its primary" in down.stderr
    assert 1 == len(down.stderr.splitlines())
    assert (0, ["before"]) == (read_down.code, [study["name"] for study in read_down.json()])
    assert (0, True) == (back.code, back.json()["synced"])
    assert ["after", "before"] == sorted(study["name"] for study in read_back.json())


@pytest.mark.usefixtures("cli_env")
def test_cli_sync_without_a_primary_says_why(tmp_path: Path) -> None:
    """``sync`` without --sync-url is a usage error; with the primary down, one sentence, exit 1."""
    url = f"sqlite+libsql:///{tmp_path / 'replica.db'}"
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{unused.getsockname()[1]}"
    missing = run("--url", url, "sync")
    down = run("--url", url, "--sync-url", closed, "sync", "--json")
    assert (2, "") == (missing.code, missing.stdout)
    assert "pass --sync-url or set $EVALS_ORM_SYNC_URL" in missing.stderr
    assert (1, "") == (down.code, down.stdout)
    assert "cannot sync the embedded replica with its primary" in down.stderr
    assert 1 == len(down.stderr.splitlines())


@pytest.mark.usefixtures("cli_env")
def test_cli_encryption_keeps_the_key_and_the_data_out_of_sight(tmp_path: Path) -> None:
    """A file made with the key holds no plaintext; a wrong or missing key is one sentence.

    The key, from the environment or the command line, appears in no output.
    """
    path = tmp_path / "secret.db"
    url = f"sqlite+libsql:///{path}"
    keyed = {"EVALS_ORM_ENCRYPTION_KEY": _KEY}
    made = run("--url", url, "demo", env=keyed)
    stored = b"".join(file.read_bytes() for file in tmp_path.iterdir())
    read = run("--url", url, "studies", "--json", env=keyed)
    on_command_line = run("--url", url, "--encryption-key", _KEY, "studies", "--json")
    wrong = run("--url", url, "studies", env={"EVALS_ORM_ENCRYPTION_KEY": "a-wrong-key"})
    missing = run("--url", url, "studies")
    results = [made, read, on_command_line, wrong, missing]
    assert [0, 0, 0, 1, 1] == [result.code for result in results]
    assert FEATURED_STUDY.encode() not in stored
    assert FEATURED_STUDY in {study["name"] for study in read.json()}
    assert read.stdout == on_command_line.stdout
    assert "cannot be decrypted with this encryption key" in wrong.stderr
    assert "it is encrypted" in missing.stderr
    assert [1, 1] == [len(result.stderr.splitlines()) for result in (wrong, missing)]
    assert [] == [r for r in results if _KEY in r.stdout + r.stderr or "a-wrong-key" in r.stderr]


def test_cli_help_warns_that_a_key_on_the_command_line_is_visible() -> None:
    """--help points to the environment variable for the key and says why."""
    result = run("--help")
    assert "EVALS_ORM_ENCRYPTION_KEY" in result.stdout
    assert "visible in the process list" in " ".join(result.stdout.split())
