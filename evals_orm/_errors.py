"""Driver errors become ``DatabaseError``s that say what to do - here, and only here."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

import sqlalchemy as sa

from evals_orm.errors import (
    CredentialsError,
    DatabaseError,
    EvalsError,
    SchemaMissingError,
    UnreachableError,
)

__all__ = ["translate", "translated"]

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
    r"error sending request|timed out|dns error|lost connection|server has gone away",
    re.IGNORECASE,
)
# PyMySQL's messages are the tuple ``(code, "text")``: only the text is shown.
_MYSQL_MESSAGE = re.compile(r"^\((\d+), [\"'](.*)[\"']\)$")


def translate(error: Exception) -> DatabaseError:
    """Return the ``DatabaseError`` that tells the user what to do about a driver error."""
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
    if _MISSING_SCHEMA.search(message):
        return SchemaMissingError(
            "the evals_orm tables are missing from this database; "
            "run `evals-orm db upgrade` (or evals_orm.migrations.upgrade) first"
        )
    if _UNAUTHORIZED.search(message):
        return CredentialsError(
            f"the database refused the credentials ({message}); check the auth token or password"
        )
    if _UNREACHABLE.search(message):
        return UnreachableError(
            f"cannot reach the database ({message}); check the URL, "
            "the credentials and that the server is running"
        )
    return DatabaseError(f"the database failed: {message}")


@contextmanager
def translated() -> Iterator[None]:
    """Raise driver errors of the block as ``DatabaseError``; let ``EvalsError`` through."""
    try:
        yield
    except EvalsError:
        raise
    except sa.exc.DBAPIError as error:
        raise translate(error) from error
