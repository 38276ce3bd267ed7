"""Lock rows of ``eval_tracking``: a named write lock that also holds a position."""

from __future__ import annotations

import sqlalchemy as sa

from evals_orm import _writer
from evals_orm._backend import backend_of
from evals_orm.models import TrackingRow

__all__ = ["lock", "set_position"]


def lock(connection: sa.Connection, name: str) -> int:
    """Take the write lock named ``name`` until the transaction ends; return its position.

    The lock is a row of ``eval_tracking`` written by an upsert: it is the
    first write of the transaction, so SQLite takes its write lock up front
    (no deadlock on a later lock upgrade) and PostgreSQL locks the row.
    """
    statement = backend_of(connection.engine).insert(TrackingRow).values(name=name, position=0)
    statement = statement.on_conflict_do_update(
        index_elements=[TrackingRow.name],
        set_={"position": TrackingRow.position},
    ).returning(TrackingRow.position)
    _writer.before_lock(connection, name)
    position: int = connection.execute(statement).scalar_one()
    _writer.locked(connection, name)
    return position


def set_position(connection: sa.Connection, name: str, position: int) -> None:
    """Set the position of the tracking row ``name`` (held by ``lock``)."""
    connection.execute(
        sa.update(TrackingRow).where(TrackingRow.name == name).values(position=position)
    )
