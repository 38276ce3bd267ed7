"""Binds and transactions: the services' own, or a savepoint in the caller's.

A service is bound to an ``Engine`` or a ``sessionmaker`` (it runs its own
transactions and commits them) or to a ``Connection`` or a ``Session`` (it
works inside the caller's transaction, each call in a savepoint, and never
ends that transaction).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Union

import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from evals_orm import _revision, _writer
from evals_orm._backend import Backend, backend_of
from evals_orm._errors import translated
from evals_orm.errors import ConfigurationError

__all__ = ["Bind", "backend", "check_bind", "check_writable", "engine_of", "read", "transaction"]

Bind = Union[sa.Engine, "sessionmaker[Session]", sa.Connection, Session]

_ACCEPTED = "an Engine, a sessionmaker, a Connection or a Session"

# The connection of the write transaction this context (thread, task) is
# inside, so reads nested in it - ``rebuild(log.read())``, the projection
# catching up inside ``append`` - run on it: they see its writes, and on an
# in-memory database a second checkout would share (and roll back) it.
_ACTIVE: ContextVar[tuple[sa.Engine, sa.Connection] | None] = ContextVar(
    "evals_orm_active_connection", default=None
)


def check_bind(bind: object) -> Bind:
    """Return ``bind`` if a service can use it; else raise ``TypeError`` naming what can."""
    if isinstance(bind, (sa.Engine, sa.Connection, Session, sessionmaker)):
        _writer.install(engine_of(bind))
        return bind
    raise TypeError(f"bind must be {_ACCEPTED}, not {type(bind).__name__}")


def engine_of(bind: Bind) -> sa.Engine:
    """Return the Engine behind a bind."""
    if isinstance(bind, sa.Engine):
        return bind
    if isinstance(bind, sa.Connection):
        return bind.engine
    try:
        target = bind.get_bind() if isinstance(bind, Session) else bind.kw.get("bind")
    except sa.exc.UnboundExecutionError:
        target = None
    if isinstance(target, sa.Engine):
        return target
    if isinstance(target, sa.Connection):
        return target.engine
    raise TypeError(f"the {type(bind).__name__} must be bound to an Engine or a Connection")


def backend(bind: Bind) -> Backend:
    """Return the ``Backend`` of the database behind ``bind``."""
    return backend_of(engine_of(bind))


def _session_connection(session: Session) -> sa.Connection:
    # Pending ORM objects are flushed first, so the services read the
    # caller's own writes.
    session.flush()
    return session.connection()


@contextmanager
def read(bind: Bind) -> Iterator[sa.Connection]:
    """Yield a Connection for reads; driver errors become ``DatabaseError``."""
    with translated(engine_of(bind)):
        if isinstance(bind, sa.Connection):
            yield _checked(bind.engine, bind)
            return
        if isinstance(bind, Session):
            connection = _session_connection(bind)
            yield _checked(connection.engine, connection)
            return
        engine = engine_of(bind)
        active = _ACTIVE.get()
        if active is not None and active[0] is engine:
            yield active[1]
            return
        if isinstance(bind, sa.Engine):
            with bind.connect() as connection:
                yield _checked(engine, connection)
        else:
            with bind() as session:
                yield _checked(engine, session.connection())


def check_writable(engine: sa.Engine) -> None:
    """Refuse at once a write of the services (or a migration) through an embedded replica.

    The driver forwards a replica's writes statement by statement to the
    primary, outside this process's writer slot of the primary: a writer on
    the primary's Engine and one on the replica's, in one process, stall each
    other until the server aborts one (measured: "Transaction timed-out").
    Only the primary's own Engine keeps the services' guarantees.
    """
    if backend_of(engine).embedded_replica:
        raise ConfigurationError(
            "evals_orm does not write through an embedded replica: "
            "write through an engine on the primary's URL (the replica's sync_url), "
            "then evals_orm.sync the replica"
        )


@contextmanager
def transaction(bind: Bind) -> Iterator[sa.Connection]:
    """Yield a Connection in a write transaction of its own, or in a savepoint of the caller's.

    An Engine or a sessionmaker: a new transaction, committed at the end and
    rolled back on error. A Connection or a Session: the caller's transaction
    (begun if none is open), with the block in a savepoint that an error
    rolls back, leaving the caller's transaction usable; it is never
    committed or rolled back here.
    """
    engine = engine_of(bind)
    check_writable(engine)
    options = backend_of(engine).write_options
    with translated(engine):
        if isinstance(bind, Session):
            with bind.begin_nested():
                yield from _activated(engine, bind.connection())
        elif isinstance(bind, sa.Connection):
            if not bind.in_transaction():
                bind.begin()
            with bind.begin_nested():
                yield from _activated(engine, bind)
        elif isinstance(bind, sa.Engine):
            with bind.connect() as connection:
                if options:
                    connection.execution_options(**options)
                with connection.begin():
                    yield from _activated(engine, connection)
        else:
            if not isinstance(bind.kw.get("bind"), sa.Engine):
                # Bound to the caller's Connection: its transaction, its isolation.
                options = {}
            with bind.begin() as session:
                yield from _activated(engine, session.connection(execution_options=options))


def _checked(engine: sa.Engine, connection: sa.Connection) -> sa.Connection:
    _revision.check(engine, connection)
    return connection


def _activated(engine: sa.Engine, connection: sa.Connection) -> Iterator[sa.Connection]:
    _revision.check(engine, connection)
    token = _ACTIVE.set((engine, connection))
    try:
        yield connection
    finally:
        _ACTIVE.reset(token)
