"""Driver errors become ``DatabaseError``s that say what to do - here, and only here."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import sqlalchemy as sa

from evals_orm.errors import (
    CredentialsError,
    DatabaseError,
    EvalsError,
    SchemaMissingError,
    UnreachableError,
)

__all__ = ["database_file", "translate", "translated"]

_MISSING_SCHEMA = re.compile(
    r"no such table|relation \"?[\w.]+\"? does not exist|UndefinedTable|"
    r"Table '[^']+' doesn't exist",
    re.IGNORECASE,
)
_MISSING_DATABASE = re.compile(r"Unknown database '([^']+)'|database \"([^\"]+)\" does not exist")
_UNAUTHORIZED = re.compile(
    r"\b401\b|unauthori[sz]ed|password authentication failed|invalid token|jwt|access denied",
    re.IGNORECASE,
)
_UNREACHABLE = re.compile(
    r"connection refused|could not connect|connection failed|can't connect|"
    r"failed to connect|name or service not known|unable to open database|"
    r"error sending request|timed out|dns error|connection reset|broken pipe|"
    r"server closed the connection|lost connection|server has gone away",
    re.IGNORECASE,
)
# PyMySQL's messages are the tuple ``(code, "text")``: only the text is shown.
_MYSQL_MESSAGE = re.compile(r"^\((\d+), [\"'](.*)[\"']\)$")
_CANNOT_OPEN = re.compile(
    r"unable to open database file|readonly database|read-only file system", re.IGNORECASE
)
_ABORTED = re.compile(r"TRANSACTION_TIMEOUT|transaction timed out", re.IGNORECASE)
_DISK_FULL = re.compile(r"database or disk is full|no space left on device", re.IGNORECASE)
_CORRUPT = re.compile(
    r"database disk image is malformed|file is not a database|database corrupt", re.IGNORECASE
)


def database_file(engine: sa.Engine) -> Path | None:
    """Return the file of an SQLite or embedded libSQL database, ``None`` for any other."""
    url = engine.url
    database = url.database or ""
    if engine.dialect.name != "sqlite" or url.host or database in ("", ":memory:"):
        return None
    if database.startswith("file:"):
        return None
    return Path(database)


def _open_failure(path: Path) -> str | None:
    """Say why the database file ``path`` cannot be opened for writing, if the cause shows."""
    if not path.parent.is_dir():
        return f"cannot open the database {path}: the directory {path.parent} does not exist"
    # SQLite writes its journal (-wal, -shm) beside the file, even to read.
    if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        return (
            f"cannot open the database {path}: its location is read-only "
            "(SQLite and libSQL write their journal beside the file, even to read)"
        )
    return None


# (what the driver says, the error to raise, what to tell the user), first match wins.
_RULES: tuple[tuple[re.Pattern[str], type[DatabaseError], str], ...] = (
    (
        _DISK_FULL,
        DatabaseError,
        "the database's disk is full ({message}); free some space and run it again",
    ),
    (_CORRUPT, DatabaseError, "the database is damaged ({message}); restore it from a backup"),
    (
        _MISSING_SCHEMA,
        SchemaMissingError,
        "the evals_orm tables are missing from this database; "
        "run `evals-orm db upgrade` (or evals_orm.migrations.upgrade) first",
    ),
    (
        _UNAUTHORIZED,
        CredentialsError,
        "the database refused the credentials ({message}); check the auth token or password",
    ),
    (
        _ABORTED,
        DatabaseError,
        "the libSQL server aborted the transaction, which kept other writers waiting too "
        "long ({message}); run it again",
    ),
    (
        _UNREACHABLE,
        UnreachableError,
        "cannot reach the database ({message}); check the URL, "
        "the credentials and that the server is running",
    ),
)


def translate(error: Exception, engine: sa.Engine | None = None) -> DatabaseError:
    """Return the ``DatabaseError`` that tells the user what to do about a driver error.

    Given the ``engine``, a file database's failures to open name the file.
    """
    message = str(getattr(error, "orig", None) or error).strip().splitlines()[0]
    mysql = _MYSQL_MESSAGE.match(message)
    if mysql is not None:
        message = f"{mysql[2]} (error {mysql[1]})"
    missing_database = _MISSING_DATABASE.search(message)
    if missing_database is not None:
        return UnreachableError(
            f"the database {missing_database[1] or missing_database[2]!r} does not exist; "
            "create it, or check the database name in the URL"
        )
    path = None if engine is None else database_file(engine)
    if path is not None and _CANNOT_OPEN.search(message):
        failure = _open_failure(path)
        if failure is not None:
            return UnreachableError(failure)
    for pattern, error_class, text in _RULES:
        if pattern.search(message):
            return error_class(text.format(message=message))
    return DatabaseError(f"the database failed: {message}")


@contextmanager
def translated(engine: sa.Engine | None = None) -> Iterator[None]:
    """Raise driver errors of the block as ``DatabaseError``; let ``EvalsError`` through."""
    try:
        yield
    except EvalsError:
        raise
    except sa.exc.DBAPIError as error:
        raise translate(error, engine) from error
