"""Lock rows of ``eval_tracking``: a named write lock that also holds a position."""

from __future__ import annotations

import sqlalchemy as sa

from evals_orm import _bulk, _writer
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
    position: int = _bulk.upsert_one(
        connection,
        TrackingRow,
        {"name": name, "position": 0},
        key=TrackingRow.name,
        set_={"position": TrackingRow.position},
        returning=TrackingRow.position,
    )
    _writer.locked(connection, name)
    return position


def set_position(connection: sa.Connection, name: str, position: int) -> None:
    """Set the position of the tracking row ``name`` (held by ``lock``)."""
    connection.execute(
        sa.update(TrackingRow).where(TrackingRow.name == name).values(position=position)
    )
