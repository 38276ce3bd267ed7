"""Lock rows of ``eval_tracking``: a named write lock that also holds a position."""

from __future__ import annotations

import time

import sqlalchemy as sa

from evals_orm import _bulk, _writer
from evals_orm._backend import backend_of
from evals_orm.models import TrackingRow

__all__ = ["lock", "set_position"]


def lock(connection: sa.Connection, name: str) -> int:
    """Take the write lock named ``name`` until the transaction ends; return its position.

    The lock is a row of ``eval_tracking`` written by an upsert: it is the
    first write of the transaction, so SQLite takes its write lock up front
    (no deadlock on a later lock upgrade) and PostgreSQL and InnoDB lock the
    row (InnoDB's ON DUPLICATE KEY takes an exclusive lock even where it
    changes nothing, so waiters queue instead of deadlocking on shared ones).
    """
    _writer.before_lock(connection, name)
    position = _take(connection, name)
    _writer.locked(connection, name)
    return position


def _take(connection: sa.Connection, name: str) -> int:
    """Upsert the lock row; where the server answers a wait with SQLITE_BUSY, wait here.

    Only a lock statement that opens the transaction waits (nothing is
    written yet, so the driver's transaction is rolled back and the
    statement sent again); after an earlier write, SQLITE_BUSY is raised.
    The async libSQL adapter waits for every such statement itself.
    """
    dbapi = connection.connection.dbapi_connection
    waits = (
        backend_of(connection.engine).busy_first_write
        and not connection.dialect.is_async
        and not getattr(dbapi, "in_transaction", True)
    )
    deadline = time.monotonic() + _writer.WAIT_S
    pause = 0.01
    while True:
        try:
            position: int = _bulk.upsert_one(
                connection,
                TrackingRow,
                {"name": name, "position": 0},
                key=TrackingRow.name,
                set_={"position": TrackingRow.position},
                returning=TrackingRow.position,
            )
        except sa.exc.OperationalError as error:
            busy = "SQLITE_BUSY" in str(error.orig)
            if not (waits and busy) or time.monotonic() + pause > deadline:
                raise
        else:
            return position
        assert dbapi is not None
        dbapi.rollback()
        time.sleep(pause)
        pause = min(2 * pause, 0.2)


def set_position(connection: sa.Connection, name: str, position: int) -> None:
    """Set the position of the tracking row ``name`` (held by ``lock``)."""
    connection.execute(
        sa.update(TrackingRow).where(TrackingRow.name == name).values(position=position)
    )
