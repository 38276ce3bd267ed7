"""Lock rows of ``eval_tracking``: a named write lock that also holds a position."""

from __future__ import annotations

import time
from collections.abc import Callable

import sqlalchemy as sa

from evals_orm import _bulk, _writer
from evals_orm._backend import backend_of
from evals_orm.models import TrackingRow

__all__ = ["Abandoned", "lock", "set_position"]


class Abandoned(Exception):
    """A lock's waiter gave up because it is stopping; its transaction has written nothing."""


def lock(
    connection: sa.Connection, name: str, *, stopping: Callable[[], bool] | None = None
) -> int:
    """Take the write lock named ``name`` until the transaction ends; return its position.

    The lock is a row of ``eval_tracking`` written by an upsert: it is the
    first write of the transaction, so SQLite takes its write lock up front
    (no deadlock on a later lock upgrade) and PostgreSQL and InnoDB lock the
    row (InnoDB's ON DUPLICATE KEY takes an exclusive lock even where it
    changes nothing, so waiters queue instead of deadlocking on shared ones).

    Where the server refuses the lock for now and it is asked again
    (``_take``), ``stopping`` is looked at between the attempts: once it
    returns true, ``Abandoned`` is raised instead of waiting on.
    """
    _writer.before_lock(connection, name)
    position = _take(connection, name, stopping)
    _writer.locked(connection, name)
    return position


def _take(connection: sa.Connection, name: str, stopping: Callable[[], bool] | None) -> int:
    """Upsert the lock row; retry it where the server refused it only for now.

    Only a lock statement that opens the transaction is retried (nothing is
    written yet, so the driver's transaction is rolled back and the
    statement sent again); after an earlier write the refusal is raised.
    """
    retryable = _retryable(connection)
    dbapi = connection.connection.dbapi_connection
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
            if not retryable(error.orig) or time.monotonic() + pause > deadline:
                raise
        else:
            return position
        assert dbapi is not None
        dbapi.rollback()
        if stopping is not None and stopping():
            raise Abandoned(f"stopped while waiting for the {name} lock")
        _writer.pause(pause)
        pause = min(2 * pause, 0.2)


def _retryable(connection: sa.Connection) -> Callable[[BaseException | None], bool]:
    """Return which refusals of the lock statement about to run are only for now.

    Two, and only while the transaction has written nothing:

    * SQLITE_BUSY, from a server that answers a wait with it
      (``Backend.busy_first_write``); the async libSQL adapter waits for
      every such statement itself;
    * InnoDB's deadlock (error 1213) between upserts creating the same new
      row: when the first one rolls back, the two queued behind it deadlock
      and the server cancels one.
    """
    dbapi = connection.connection.dbapi_connection
    backend = backend_of(connection.engine)
    if backend.busy_first_write:
        if connection.dialect.is_async or getattr(dbapi, "in_transaction", True):
            return _never
        return lambda error: "SQLITE_BUSY" in str(error)
    if backend.family == "mysql":
        # PyMySQL and asyncmy (under SQLAlchemy's async adapter) keep the
        # server's status flags; inside a savepoint the caller's transaction
        # is at stake, and InnoDB's deadlock has rolled all of it back.
        driver = getattr(dbapi, "_connection", dbapi)
        status = getattr(driver, "server_status", _IN_TRANSACTION)
        if connection.in_nested_transaction() or status & _IN_TRANSACTION:
            return _never
        return lambda error: error is not None and error.args[:1] == (_DEADLOCK,)
    return _never


def _never(_error: BaseException | None) -> bool:
    return False


# MySQL's protocol: the server status flag of a transaction that has written.
_IN_TRANSACTION = 1
# MySQL's and MariaDB's ER_LOCK_DEADLOCK.
_DEADLOCK = 1213


def set_position(connection: sa.Connection, name: str, position: int) -> None:
    """Set the position of the tracking row ``name`` (held by ``lock``)."""
    connection.execute(
        sa.update(TrackingRow).where(TrackingRow.name == name).values(position=position)
    )
