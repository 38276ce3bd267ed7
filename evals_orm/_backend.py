"""One record per backend: every dialect and driver decision of the services reads it.

Adding a backend means adding one ``Backend`` in ``backend_of`` and, where it
needs one, a bulk-insert strategy in ``_bulk``.
"""

from __future__ import annotations

import enum
import weakref
from collections.abc import Callable
from typing import Any

import attrs
import sqlalchemy as sa
from sqlalchemy.dialects import mysql, postgresql, sqlite
from sqlalchemy.dialects.postgresql.psycopg import PGDialect_psycopg

from evals_orm.errors import DatabaseError

__all__ = ["Backend", "BulkInsert", "backend_of", "mark_embedded_replica"]


class BulkInsert(enum.Enum):
    """How ``_bulk.insert_rows`` sends many rows."""

    COPY = "copy"  # PostgreSQL through psycopg 3: COPY FROM STDIN
    TUPLES = "tuples"  # one DBAPI executemany of processed parameter tuples
    MULTI_ROW = "multi_row"  # few INSERT statements of many VALUES rows each
    EXECUTEMANY = "executemany"  # SQLAlchemy's own executemany


# A follower's idle wait: local files are cheap to look at.
_POLL_S = 0.1
_REMOTE_POLL_S = 0.25
_NOTIFIED_POLL_S = 5.0
# SQLite's default busy handler sleeps at most 100 ms between two looks.
_FILE_STEP_GAP_S = 0.1


@attrs.frozen
class Backend:
    """What the services need to know about the database behind an Engine."""

    name: str  # "sqlite", "libsql", "libsql-remote", "postgresql" or "mariadb"
    family: str  # the dialect's name ("mysql" for MariaDB and MySQL)
    remote: bool
    in_memory: bool
    # A libSQL file synced from a primary (``create_engine(..., sync_url=...)``):
    # the services only read through it (see ``_tx.check_writable``).
    embedded_replica: bool
    # The dialect's ``insert`` construct, the one with ON CONFLICT (or, in
    # the "mysql" family, ON DUPLICATE KEY UPDATE) clauses.
    insert: Callable[..., Any]
    bulk_insert: BulkInsert
    # Whether ``insert_rows(..., skip_conflicts=True)`` works and counts what it inserted.
    skips_conflicts: bool
    # How many events one write transaction takes.
    batch_size: int
    # One writer per database: writers of this process queue on a writer slot
    # (``_writer``) in Python, never inside the driver.
    single_writer: bool
    # ``column = ANY(:array)`` instead of an IN list of thousands of parameters.
    any_array: bool
    # Execution options of the services' own write transactions.
    write_options: dict[str, str] = attrs.field(factory=dict)
    # A follower's longest idle wait between two looks at the log (seconds).
    poll_interval: float = _POLL_S
    # Appends send a NOTIFY that followers LISTEN for (PostgreSQL through psycopg 3).
    notifies: bool = False
    # The server answers a write that must wait for another connection's
    # write lock with SQLITE_BUSY after about half a second (measured on
    # sqld 0.24 with 9 processes writing) instead of queueing it as a busy
    # timeout would: the lock statement that opens a transaction retries.
    busy_first_write: bool = False
    # How long a series of write transactions (a rebuild's steps) leaves the
    # database free once it has held it for a while. Writers of other
    # processes wait in SQLite's busy handler, which then looks again only
    # every 100 ms: a rebuild starting each step at once could take the lock
    # first every time (measured: appends waited 1.3-1.9 s, several steps,
    # during a 1M rebuild).
    step_gap: float = 0.0


_CACHE: weakref.WeakKeyDictionary[sa.Engine, Backend] = weakref.WeakKeyDictionary()
# Engines ``create_engine`` made with ``sync_url``: nothing in the Engine
# itself tells a replica from a plain libSQL file.
_EMBEDDED_REPLICAS: weakref.WeakSet[sa.Engine] = weakref.WeakSet()

# A remote libSQL server aborts a transaction that keeps a waiting writer out
# for about 5 s, so batches there stay small; elsewhere large batches
# amortise statements and commits.
_REMOTE_BATCH = 500
_BATCH = 10_000


def backend_of(engine: sa.Engine) -> Backend:
    """Return the ``Backend`` of ``engine`` (computed once per Engine)."""
    backend = _CACHE.get(engine)
    if backend is None:
        backend = _CACHE[engine] = _compute(engine)
    return backend


def mark_embedded_replica(engine: sa.Engine) -> None:
    """Record that ``engine`` is an embedded replica (before its ``Backend`` is first read)."""
    _EMBEDDED_REPLICAS.add(engine)
    _CACHE.pop(engine, None)


def _compute(engine: sa.Engine) -> Backend:
    dialect = engine.dialect
    if dialect.name == "sqlite":
        version = dialect.server_version_info
        if version is not None and version < (3, 24):
            raise DatabaseError("SQLite 3.24 or newer is needed (for ON CONFLICT upserts)")
        libsql = dialect.driver == "libsql"
        remote = libsql and bool(engine.url.host)
        # Remote libSQL sends one request per row of an executemany.
        bulk = BulkInsert.MULTI_ROW if remote else BulkInsert.TUPLES
        in_memory = not remote and engine.url.database in (None, "", ":memory:")
        return Backend(
            name="libsql-remote" if remote else "libsql" if libsql else "sqlite",
            family="sqlite",
            remote=remote,
            in_memory=in_memory,
            embedded_replica=engine in _EMBEDDED_REPLICAS,
            insert=sqlite.insert,
            bulk_insert=bulk,
            skips_conflicts=True,
            batch_size=_REMOTE_BATCH if remote else _BATCH,
            single_writer=True,
            any_array=False,
            # Each look at a remote log is an HTTP request: fewer of them keep
            # an idle follower cheap, well inside the 1 s it may lag.
            poll_interval=_REMOTE_POLL_S if remote else _POLL_S,
            busy_first_write=remote,
            # One process holds an in-memory database; sqld queues its waiters.
            step_gap=0.0 if remote or in_memory else _FILE_STEP_GAP_S,
        )
    if dialect.name == "postgresql":
        # psycopg 3's dialects, sync and async (whose ``driver`` is "psycopg" too).
        copy = isinstance(dialect, PGDialect_psycopg)
        return Backend(
            name="postgresql",
            family="postgresql",
            remote=True,
            in_memory=False,
            embedded_replica=False,
            insert=postgresql.insert,
            bulk_insert=BulkInsert.COPY if copy else BulkInsert.EXECUTEMANY,
            # COPY cannot skip conflicting rows, and other drivers' executemany
            # may not count what it inserted: checkpoints are looked up first.
            skips_conflicts=False,
            batch_size=_BATCH,
            single_writer=False,
            any_array=True,
            # A writer that waited for a lock row reads what its predecessor
            # committed instead of failing to serialise.
            write_options={"isolation_level": "READ COMMITTED"},
            # Followers wake on NOTIFY; polling is only the safety net.
            poll_interval=_NOTIFIED_POLL_S,
            notifies=copy,
        )
    if dialect.name in ("mysql", "mariadb"):
        return Backend(
            # One name for the family: the test matrix runs it on MariaDB.
            name="mariadb",
            family="mysql",
            remote=True,
            in_memory=False,
            embedded_replica=False,
            insert=mysql.insert,
            # PyMySQL rewrites an executemany of INSERT ... VALUES into
            # multi-row statements of up to about 1 MB each.
            bulk_insert=BulkInsert.EXECUTEMANY,
            # INSERT IGNORE would also turn other errors into warnings, and
            # with the dialect's FOUND_ROWS flag an ON DUPLICATE KEY no-op
            # counts as a row: stored checkpoints are looked up first.
            skips_conflicts=False,
            batch_size=_BATCH,
            single_writer=False,
            any_array=False,
            # As on PostgreSQL: a writer that waited for a lock row reads what
            # its predecessor committed; and InnoDB then takes no gap locks on
            # the rows it scans (REPEATABLE READ would), so writers queue on the
            # lock row and nowhere else. create_engine makes it the default too.
            write_options={"isolation_level": "READ COMMITTED"},
        )
    raise DatabaseError(f"the {dialect.name} dialect is not supported by evals_orm")
