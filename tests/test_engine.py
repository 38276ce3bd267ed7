"""create_engine: URL forms, connection settings, pools and keeping the token secret."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import Database
from sqlalchemy.pool import QueuePool, StaticPool

from evals_orm import ConfigurationError, DatabaseError, create_engine, sync
from evals_orm._sqld import running_sqld
from evals_orm.engine import BUSY_TIMEOUT_MS


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def equivalent_urls(database: Database) -> list[str]:
    """Return every URL form of SPEC section 5 that names ``database``."""
    url = sa.make_url(database.url)
    if database.backend == "sqlite":
        return [database.url, database.url.replace("sqlite://", "sqlite+pysqlite://", 1)]
    if database.backend == "libsql":
        return [database.url]
    if database.backend == "libsql-remote":
        host = f"{url.host}:{url.port}"
        return [
            f"http://{host}",
            f"libsql://{host}?tls=0",
            f"sqlite+libsql://{host}",
            f"libsql://{host}?secure=false",
        ]
    rest = database.url.split("://", 1)[1]
    if database.backend == "mariadb":
        return [
            f"mysql://{rest}",
            f"mysql+pymysql://{rest}",
            f"mariadb://{rest}",
            f"mariadb+pymysql://{rest}",
        ]
    return [
        f"postgresql://{rest}",
        f"postgres://{rest}",
        f"postgresql+psycopg://{rest}",
        f"postgresql+psycopg2://{rest}",
        f"postgresql+pg8000://{rest}",
    ]


def test_every_url_form_reaches_the_same_database(database: Database) -> None:
    """Each accepted spelling of the database's URL connects to the same database."""
    with database.engine().begin() as connection:
        connection.exec_driver_sql("CREATE TABLE probe (value INTEGER)")
        connection.exec_driver_sql("INSERT INTO probe VALUES (42)")
    for url in equivalent_urls(database):
        engine = create_engine(url, auth_token=database.auth_token)
        try:
            with engine.connect() as connection:
                assert [(42,)] == connection.exec_driver_sql("SELECT value FROM probe").all()
        finally:
            engine.dispose()


@pytest.mark.parametrize(
    ("url", "expected_url", "expected_pool"),
    [
        ("sqlite:///some.db", "sqlite+pysqlite:///some.db", "QueuePool"),
        ("sqlite://", "sqlite+pysqlite://", "StaticPool"),
        ("sqlite+libsql:///some.db", "sqlite+libsql:///some.db", "QueuePool"),
        ("sqlite+libsql://", "sqlite+libsql://", "StaticPool"),
        ("libsql://db.example.org", "sqlite+libsql://db.example.org?secure=true", "QueuePool"),
        ("libsql://127.0.0.1:8080?tls=0", "sqlite+libsql://127.0.0.1:8080", "QueuePool"),
        ("http://127.0.0.1:8080", "sqlite+libsql://127.0.0.1:8080", "QueuePool"),
        ("sqlite+libsql://127.0.0.1:8080", "sqlite+libsql://127.0.0.1:8080", "QueuePool"),
        ("sqlite+libsql://h?secure=true", "sqlite+libsql://h?secure=true", "QueuePool"),
        ("libsql://h?tls=1", "sqlite+libsql://h?secure=true", "QueuePool"),
        ("https://db.example.org", "sqlite+libsql://db.example.org?secure=true", "QueuePool"),
        (
            "https://db.example.org:8443",
            "sqlite+libsql://db.example.org:8443?secure=true",
            "QueuePool",
        ),
        ("postgresql://u@h/db", "postgresql+psycopg://u@h/db", "QueuePool"),
        ("postgres://u@h/db", "postgresql+psycopg://u@h/db", "QueuePool"),
        ("mysql://u@h/db", "mysql+pymysql://u@h/db?charset=utf8mb4", "QueuePool"),
        ("mariadb://u@h/db", "mariadb+pymysql://u@h/db?charset=utf8mb4", "QueuePool"),
        ("mysql+pymysql://u@h/db", "mysql+pymysql://u@h/db?charset=utf8mb4", "QueuePool"),
        ("mysql://u@h/db?charset=latin1", "mysql+pymysql://u@h/db?charset=latin1", "QueuePool"),
        ("postgresql+psycopg2://u@h/db", "postgresql+psycopg2://u@h/db", "QueuePool"),
        ("postgres+pg8000://u@h/db", "postgresql+pg8000://u@h/db", "QueuePool"),
        ("sqlite+pysqlite:///some.db", "sqlite+pysqlite:///some.db", "QueuePool"),
    ],
)
def test_url_forms_map_to_driver_urls(url: str, expected_url: str, expected_pool: str) -> None:
    """Each URL form becomes the right driver URL and pool, without connecting."""
    engine = create_engine(url)
    actual = (engine.url.render_as_string(hide_password=False), type(engine.pool).__name__)
    assert (expected_url, expected_pool) == actual


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("oracle://u@h/db", "unsupported database URL scheme 'oracle'"),
        ("nonsense", "cannot parse the database URL 'nonsense'"),
        ("libsql://", "needs a host"),
        ("https://", "needs a host"),
        ("http://127.0.0.1:abc", "cannot parse the database URL 'http://127.0.0.1:abc'"),
        ("postgresql://postgres@[::1/x", "cannot parse the database URL"),
        ("sqlite+nosuchdriver:///x.db", "no SQLAlchemy dialect for 'sqlite\\+nosuchdriver'"),
    ],
)
def test_bad_urls_raise_configuration_error(url: str, message: str) -> None:
    """Unsupported or malformed URLs raise ConfigurationError listing the accepted forms."""
    with pytest.raises(ConfigurationError, match=message) as raised:
        create_engine(url)
    assert "sqlite+libsql:///PATH" in str(raised.value)


@pytest.mark.parametrize(
    "url",
    [
        "postgresql+asyncpg://u@h/db",
        "postgresql+psycopg_async://u@h/db",
        "sqlite+aiosqlite:///x.db",
        "sqlite+aiolibsql:///x.db",
    ],
)
def test_async_urls_point_at_create_async_engine(url: str) -> None:
    """An asyncio driver's URL given to create_engine names the async factory in one sentence."""
    with pytest.raises(ConfigurationError) as raised:
        create_engine(url)
    message = str(raised.value)
    assert "use evals_orm.create_async_engine" in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("url", "package"),
    [("sqlite+pysqlcipher:///x.db", "pysqlcipher3"), ("mysql+mysqldb://u@h/db", "MySQLdb")],
)
def test_a_driver_that_is_not_installed_names_its_package(url: str, package: str) -> None:
    """A known dialect whose driver module is missing says which package to install."""
    with pytest.raises(ConfigurationError, match=f"install the '{package}' package"):
        create_engine(url)


@pytest.mark.parametrize("url", ["sqlite:///x.db", "sqlite+libsql://", "postgresql://u@h/db"])
def test_auth_token_with_a_local_url_is_a_configuration_error(url: str) -> None:
    """An auth token given for a non-remote URL is refused rather than silently ignored."""
    with pytest.raises(ConfigurationError, match="only used with a remote libSQL URL"):
        create_engine(url, auth_token="secret-token")


def test_file_databases_get_foreign_keys_wal_and_busy_timeout(database: Database) -> None:
    """SQLite and libSQL connections run with foreign keys on, WAL and a busy timeout."""
    if database.backend in ("postgresql", "mariadb"):
        pytest.skip("SQLite pragmas do not exist on database servers")
    engine = database.engine()
    with engine.connect() as connection:
        actual = [
            connection.exec_driver_sql(f"PRAGMA {name}").scalar()
            for name in ("foreign_keys", "journal_mode")
        ]
        if database.backend != "libsql-remote":  # sqld refuses busy_timeout; it has its own
            actual.append(connection.exec_driver_sql("PRAGMA busy_timeout").scalar())
    engine.dispose()
    expected: list[object] = [1, "wal"]
    if database.backend != "libsql-remote":
        expected.append(BUSY_TIMEOUT_MS)
    assert expected == actual


_HOLD_WRITE_LOCK = """
import sys, time
from pathlib import Path
driver, path, release = sys.argv[1], sys.argv[2], Path(sys.argv[3])
module = __import__(driver)
connection = module.connect(path, isolation_level=None)
connection.execute("CREATE TABLE held (value INTEGER)")
connection.execute("BEGIN IMMEDIATE")
connection.execute("INSERT INTO held VALUES (1)")
print("held", flush=True)
while not release.exists():
    time.sleep(0.005)
connection.execute("COMMIT")
"""
HOLD_SECONDS = 0.3


@pytest.mark.parametrize(
    ("scheme", "driver"), [("sqlite", "sqlite3"), ("sqlite+libsql", "libsql_experimental")]
)
def test_connecting_waits_for_another_process_holding_the_write_lock(
    scheme: str, driver: str, tmp_path: Path
) -> None:
    """Switching a fresh file to WAL waits for a writer in another process instead of failing.

    SQLite takes the lock for that switch without its busy handler, so four
    processes migrating one new file at once used to fail one of them.
    """
    path, release = tmp_path / "fresh.db", tmp_path / "release"
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_WRITE_LOCK, driver, str(path), str(release)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None
    assert "held" == holder.stdout.readline().strip()
    timer = threading.Timer(HOLD_SECONDS, release.touch)
    engine = create_engine(f"{scheme}:///{path}")
    started = time.monotonic()
    timer.start()
    try:
        with engine.connect() as connection:
            waited = time.monotonic() - started
            mode = connection.exec_driver_sql("PRAGMA journal_mode").scalar()
            rows = connection.exec_driver_sql("SELECT value FROM held").all()
    finally:
        timer.join()
        engine.dispose()
        assert 0 == holder.wait(timeout=30)
    assert ("wal", [(1,)]) == (mode, rows)
    assert waited >= HOLD_SECONDS, "connected while the other process held the write lock"


@pytest.mark.parametrize("url", ["sqlite://", "sqlite+libsql://"])
def test_in_memory_database_is_shared_by_all_connections(url: str) -> None:
    """Every connection and thread of an in-memory engine sees one database."""
    engine = create_engine(url)
    assert isinstance(engine.pool, StaticPool)
    with engine.begin() as connection:
        connection.exec_driver_sql("CREATE TABLE shared (value INTEGER)")
        connection.exec_driver_sql("INSERT INTO shared VALUES (7)")
    seen: list[object] = []

    def read() -> None:
        with engine.connect() as other:
            seen.append(other.exec_driver_sql("SELECT value FROM shared").scalar())

    thread = threading.Thread(target=read)
    thread.start()
    thread.join()
    with engine.connect() as again:
        seen.append(again.exec_driver_sql("SELECT value FROM shared").scalar())
    assert [7, 7] == seen


def test_connections_do_not_share_uncommitted_writes(database: Database) -> None:
    """Two connections of one engine are isolated (remote libSQL uses a QueuePool)."""
    engine = database.engine()
    if database.backend == "libsql-remote":
        assert isinstance(engine.pool, QueuePool)
    with engine.begin() as connection:
        connection.exec_driver_sql("CREATE TABLE isolated (value INTEGER)")
    with engine.connect() as writer, engine.connect() as reader:
        writer.exec_driver_sql("INSERT INTO isolated VALUES (1)")
        count = reader.exec_driver_sql("SELECT count(*) FROM isolated").scalar()
        writer.rollback()
    engine.dispose()
    assert 0 == count


def _remote_only(database: Database) -> str:
    if database.auth_token is None:
        pytest.skip("only remote libSQL takes an auth token")
    return database.auth_token


def test_token_is_absent_from_repr_and_url(database: Database) -> None:
    """The auth token appears in no rendering of the engine or its URL."""
    token = _remote_only(database)
    for url, auth_token in (
        (database.url, token),
        (f"libsql://{database.url.split('://')[1]}?tls=0&authToken={token}", None),
    ):
        engine = create_engine(url, auth_token=auth_token)
        renderings = (
            repr(engine),
            str(engine.url),
            engine.url.render_as_string(hide_password=False),
            repr(engine.url),
        )
        with engine.connect() as connection:  # the token still authenticates
            assert 1 == connection.exec_driver_sql("SELECT 1").scalar()
        engine.dispose()
        assert [] == [text for text in renderings if token in text]


def test_token_is_absent_from_logs(database: Database, caplog: pytest.LogCaptureFixture) -> None:
    """With echo=True, no log line carries the token, even for a failing statement."""
    token = _remote_only(database)
    caplog.set_level(logging.DEBUG)
    engine = create_engine(database.url, auth_token=token, echo="debug")
    with engine.connect() as connection:
        connection.exec_driver_sql("SELECT 1").all()
        with pytest.raises(sa.exc.OperationalError):
            connection.exec_driver_sql("SELECT * FROM no_such_table")
    engine.dispose()
    assert caplog.records
    assert [] == [record.getMessage() for record in caplog.records if token in record.getMessage()]


def test_token_is_absent_from_query_errors(database: Database) -> None:
    """A failing query raises a typed error whose text does not carry the token."""
    token = _remote_only(database)
    engine = create_engine(database.url, auth_token=token)
    with engine.connect() as connection, pytest.raises(sa.exc.OperationalError) as raised:
        connection.exec_driver_sql("SELECT * FROM no_such_table")
    engine.dispose()
    assert "no such table" in str(raised.value)
    assert token not in str(raised.value)
    assert token not in repr(raised.value)


@pytest.mark.parametrize("scheme", ["http", "libsql"])
def test_failed_connection_is_typed_and_hides_the_token(scheme: str) -> None:
    """Connecting to a closed port raises OperationalError without the token."""
    token = "s3cr3t-token-value"
    url = f"{scheme}://127.0.0.1:{_closed_port()}?tls=0&authToken={token}"
    engine = create_engine(url)
    with pytest.raises(sa.exc.OperationalError, match="Connection refused") as raised:
        engine.connect()
    assert token not in str(raised.value)
    assert token not in repr(engine)


def test_wrong_token_is_rejected_without_echoing_it(database: Database) -> None:
    """A token the server refuses raises OperationalError, and neither token is shown."""
    token = _remote_only(database)
    wrong = token[:-8] + "AAAAAAAA"
    engine = create_engine(database.url, auth_token=wrong)
    with pytest.raises(sa.exc.OperationalError, match="401") as raised:
        engine.connect()
    assert wrong not in str(raised.value)
    assert token not in str(raised.value)


def test_missing_libsql_directory_raises_operational_error(tmp_path: Path) -> None:
    """A libSQL file in a missing directory fails as OperationalError, not a bare ValueError."""
    engine = create_engine(f"sqlite+libsql:///{tmp_path / 'missing' / 'x.db'}")
    with pytest.raises(sa.exc.OperationalError, match="missing"):
        engine.connect()


def test_commit_on_a_killed_server_raises_a_typed_error(tmp_path: Path) -> None:
    """A commit whose libSQL server died raises SQLAlchemy's OperationalError, not ValueError.

    The driver raises a bare ``ValueError`` from ``commit()``, where no
    statement is running; it must still reach the caller typed.
    """
    with running_sqld(tmp_path / "sqld") as server:
        engine = create_engine(server.url, auth_token=server.auth_token)
        with engine.begin() as connection:
            connection.exec_driver_sql("CREATE TABLE doomed (value INTEGER)")
        connection = engine.connect()
        connection.exec_driver_sql("INSERT INTO doomed VALUES (1)")
        os.kill(server.pid, signal.SIGKILL)
        with pytest.raises(sa.exc.OperationalError, match="Hrana") as raised:
            connection.commit()
        connection.close()
        engine.dispose()
    assert server.auth_token not in str(raised.value)


def _corrupt_libsql_file(path: Path) -> None:
    """Write a libSQL file whose text cells are not UTF-8 (the driver panics reading them)."""
    engine = create_engine(f"sqlite+libsql:///{path}")
    with engine.begin() as connection:
        connection.exec_driver_sql("CREATE TABLE names (name TEXT)")
        connection.exec_driver_sql("INSERT INTO names VALUES ('cell one'), ('cell two')")
    engine.dispose()
    path.write_bytes(path.read_bytes().replace(b"cell ", b"\xffell "))


def test_corrupt_libsql_file_raises_a_typed_error(tmp_path: Path) -> None:
    """Reading a corrupt libSQL file raises OperationalError naming it malformed, not a panic."""
    path = tmp_path / "corrupt.db"
    _corrupt_libsql_file(path)
    engine = create_engine(f"sqlite+libsql:///{path}")
    with engine.connect() as connection, pytest.raises(sa.exc.OperationalError) as raised:
        connection.exec_driver_sql("SELECT name FROM names").all()
    engine.dispose()
    assert "database disk image is malformed" in str(raised.value)


def _replica(path: Path, primary: str, token: str) -> sa.Engine:
    return create_engine(f"sqlite+libsql:///{path}", sync_url=primary, auth_token=token)


def _values(engine: sa.Engine) -> list[str]:
    with engine.connect() as connection:
        return list(connection.exec_driver_sql("SELECT value FROM notes ORDER BY value").scalars())


def test_replicas_see_the_primary_s_writes_after_sync_only(tmp_path: Path) -> None:
    """Two embedded replicas see a batch written on the primary after ``sync``, not before."""
    with running_sqld(tmp_path / "sqld") as server:
        primary = create_engine(server.url, auth_token=server.auth_token)
        with primary.begin() as connection:
            connection.exec_driver_sql("CREATE TABLE notes (value TEXT)")
            connection.exec_driver_sql("INSERT INTO notes VALUES ('first')")
        replicas = [
            _replica(tmp_path / f"replica{n}.db", server.url, server.auth_token) for n in (1, 2)
        ]
        for replica in replicas:
            sync(replica)
        with primary.begin() as connection:
            connection.exec_driver_sql("INSERT INTO notes VALUES ('second'), ('third')")
        before = [_values(replica) for replica in replicas]
        for replica in replicas:
            sync(replica)
        after = [_values(replica) for replica in replicas]
        for engine in (primary, *replicas):
            engine.dispose()
    assert [["first"], ["first"]] == before
    assert [["first", "second", "third"]] * 2 == after


def test_a_replica_reads_while_its_primary_is_down_and_sync_says_why(tmp_path: Path) -> None:
    """With the primary stopped, replica reads still work; ``sync`` raises one clear sentence."""
    with running_sqld(tmp_path / "sqld") as server:
        with create_engine(server.url, auth_token=server.auth_token).begin() as connection:
            connection.exec_driver_sql("CREATE TABLE notes (value TEXT)")
            connection.exec_driver_sql("INSERT INTO notes VALUES ('kept')")
        replica = _replica(tmp_path / "replica.db", server.url, server.auth_token)
        sync(replica)
    with pytest.raises(DatabaseError) as raised:
        sync(replica)
    values = _values(replica)
    replica.dispose()
    message = str(raised.value)
    assert ["kept"] == values
    assert message.startswith("cannot sync the embedded replica with its primary (")
    assert "primary is running" in message
    assert "\n" not in message
    assert server.auth_token not in message


_SYNC_WITH_THE_PRIMARY_DOWN = """
import sys
from evals_orm import DatabaseError, create_engine, sync
engine = create_engine(f"sqlite+libsql:///{sys.argv[1]}", sync_url=sys.argv[2])
try:
    sync(engine)
except DatabaseError as error:
    print(error, file=sys.stderr)
"""


def test_the_driver_s_log_lines_never_reach_stdout(tmp_path: Path) -> None:
    """A replica failing to reach its primary prints nothing on stdout (the CLI's --json)."""
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            _SYNC_WITH_THE_PRIMARY_DOWN,
            str(tmp_path / "replica.db"),
            f"http://127.0.0.1:{_closed_port()}",
        ],
        capture_output=True,
        text=True,
        check=True,
        env={key: value for key, value in os.environ.items() if key != "RUST_LOG"},
    )
    assert ("", 1) == (result.stdout, len(result.stderr.splitlines()))


@pytest.mark.parametrize(
    ("url", "options", "message"),
    [
        ("sqlite:///x.db", {"sync_url": "http://h:8080"}, "needs a libSQL file URL"),
        ("sqlite+libsql://", {"sync_url": "http://h:8080"}, "needs a libSQL file URL"),
        ("sqlite+libsql:///x.db", {"sync_url": "http://h:abc"}, "cannot parse"),
        ("sqlite+libsql:///x.db", {"sync_interval": 5}, "sync_interval needs sync_url"),
        ("sqlite:///x.db", {"encryption_key": "k"}, "encryption_key needs a libSQL file URL"),
        ("sqlite+libsql://", {"encryption_key": "k"}, "encryption_key needs a libSQL file URL"),
        ("http://h:8080", {"encryption_key": "k"}, "encryption_key needs a libSQL file URL"),
    ],
)
def test_replica_and_encryption_options_where_they_mean_nothing(
    url: str, options: dict[str, Any], message: str
) -> None:
    """sync_url, sync_interval and encryption_key on a URL that cannot use them are refused."""
    with pytest.raises(ConfigurationError, match=message):
        create_engine(url, **options)


def test_sync_refuses_an_engine_that_is_not_a_replica(tmp_path: Path) -> None:
    """``sync`` on an ordinary engine is a ConfigurationError that says what it needs."""
    engine = create_engine(f"sqlite+libsql:///{tmp_path / 'plain.db'}")
    with pytest.raises(ConfigurationError, match="needs an embedded-replica engine"):
        sync(engine)


_KEY = "correct-horse-battery-staple-key"
_CANARY = "plaintext-canary-value"


def _encrypted(path: Path, key: str | None, **kwargs: Any) -> sa.Engine:
    return create_engine(f"sqlite+libsql:///{path}", encryption_key=key, **kwargs)


def test_an_encrypted_file_holds_no_plaintext_and_opens_with_its_key(tmp_path: Path) -> None:
    """A libSQL file created with a key has no readable text; the key reads it back."""
    path = tmp_path / "secret.db"
    engine = _encrypted(path, _KEY)
    with engine.begin() as connection:
        connection.exec_driver_sql("CREATE TABLE notes (value TEXT)")
        connection.exec_driver_sql(f"INSERT INTO notes VALUES ('{_CANARY}')")
    engine.dispose()
    stored = b"".join(file.read_bytes() for file in tmp_path.iterdir())
    again = _encrypted(path, _KEY)
    values = _values(again)
    again.dispose()
    assert _CANARY.encode() not in stored
    assert b"CREATE TABLE" not in stored
    assert [_CANARY] == values


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("a-wrong-key-for-this-file", "cannot be decrypted with this encryption key"),
        (None, "or it is encrypted: pass its encryption_key"),
    ],
)
def test_a_wrong_or_missing_key_is_one_sentence_without_the_key(
    tmp_path: Path, key: str | None, message: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Opening an encrypted file with a wrong key or none says so; no output shows any key."""
    path = tmp_path / "secret.db"
    engine = _encrypted(path, _KEY)
    with engine.begin() as connection:
        connection.exec_driver_sql("CREATE TABLE notes (value TEXT)")
    engine.dispose()
    caplog.set_level(logging.DEBUG)
    opened = _encrypted(path, key, echo="debug")
    with pytest.raises(sa.exc.OperationalError, match=message) as raised:
        opened.connect()
    outputs = [str(raised.value), repr(raised.value), repr(opened), str(opened.url)]
    outputs += [record.getMessage() for record in caplog.records]
    opened.dispose()
    assert [] == [text for text in outputs if _KEY in text or (key and key in text)]
    assert 1 == len(str(raised.value.orig).splitlines())


@pytest.fixture
def tiny_directory(tmp_path: Path) -> Iterator[Path]:
    """A directory on a 256 KiB tmpfs, or a skip where mounting one is not allowed."""
    directory = tmp_path / "tiny"
    directory.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(directory)]
    try:
        mounted = subprocess.run(mount, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        pytest.skip("no mount command to make a small filesystem")
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.strip()}")
    try:
        yield directory
    finally:
        subprocess.run(["umount", str(directory)], check=True)


@pytest.mark.parametrize("scheme", ["sqlite", "sqlite+libsql"])
def test_a_commit_on_a_full_disk_raises_a_typed_error(scheme: str, tiny_directory: Path) -> None:
    """A commit that does not fit on the disk raises OperationalError and keeps nothing.

    libSQL raises a bare ``ValueError`` from ``commit()``, outside any statement.
    """
    engine = create_engine(f"{scheme}:///{tiny_directory / 'full.db'}")
    with engine.begin() as connection:
        connection.exec_driver_sql("CREATE TABLE big (value TEXT)")
    connection = engine.connect()
    for _ in range(100):  # about 400 KB: held in the page cache until the commit
        connection.exec_driver_sql("INSERT INTO big VALUES (?)", ("x" * 4000,))
    with pytest.raises(sa.exc.OperationalError, match="database or disk is full"):
        connection.commit()
    connection.close()
    with engine.connect() as reader:
        count = reader.exec_driver_sql("SELECT count(*) FROM big").scalar()
    engine.dispose()
    assert 0 == count
