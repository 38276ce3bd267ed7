"""Alembic environment of evals_orm: the repo's `alembic` command and the wheel's API.

The database comes from, in order: ``config.attributes["connection"]`` (an
Engine or a Connection, for programmatic upgrades on the caller's
connection), ``-x url=...``, ``EVALS_ORM_DATABASE_URL``, ``sqlalchemy.url``.
"""

from __future__ import annotations

import logging.config
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa
from alembic import context

from evals_orm.engine import create_engine
from evals_orm.models import metadata

VERSION_TABLE = "evals_orm_alembic_version"
# Any constant works; it only has to be the same for every upgrading process.
_PG_MIGRATION_LOCK = 0x6576616C735F6F72  # "evals_or"

config = context.config
if config.config_file_name is not None and config.attributes.get("configure_logger", True):
    logging.config.fileConfig(config.config_file_name, disable_existing_loggers=False)


def include_name(name: str | None, type_: str, _parent_names: Any) -> bool:
    """Let autogenerate see only evals_orm's tables, never the host app's."""
    if type_ == "table":
        return name in metadata.tables or name == VERSION_TABLE
    return True


def _configure(**kwargs: Any) -> None:
    context.configure(
        target_metadata=metadata,
        version_table=VERSION_TABLE,
        include_name=include_name,
        compare_type=True,
        user_module_prefix="evals_orm.types.",
        **kwargs,
    )


def _url() -> str:
    url = context.get_x_argument(as_dictionary=True).get("url") or os.environ.get(
        "EVALS_ORM_DATABASE_URL"
    )
    url = url or config.get_main_option("sqlalchemy.url")
    if not url:
        raise SystemExit(
            "evals_orm: no database URL; pass `-x url=...` or set EVALS_ORM_DATABASE_URL"
        )
    return url


def run_migrations_offline() -> None:
    """Emit the migration SQL for the URL's dialect instead of running it."""
    url = _url()
    _configure(url=url, literal_binds=True, dialect_opts={"paramstyle": "named"})
    with context.begin_transaction():
        context.run_migrations()


@contextmanager
def _serialized(connection: sa.Connection) -> Iterator[None]:
    """Run the block in one transaction that holds the database's migration lock.

    Concurrent upgrades then run one after another, and each reads the version
    table only once it holds the lock, so every one of them succeeds.
    """
    dialect = connection.dialect.name
    local_sqlite = dialect == "sqlite" and not connection.engine.url.host
    if local_sqlite:
        # Batch migrations copy tables; with foreign keys on (libSQL's default)
        # that could cascade into rows of other tables. The pragma is a no-op
        # inside a transaction, and remote servers refuse it.
        connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
        connection.commit()
    try:
        if dialect == "postgresql":
            connection.execute(sa.select(sa.func.pg_advisory_xact_lock(_PG_MIGRATION_LOCK)))
        elif dialect == "sqlite":
            connection.exec_driver_sql("BEGIN IMMEDIATE")
        else:
            connection.begin()
        try:
            yield
        except BaseException:
            connection.rollback()
            raise
        connection.commit()
    finally:
        if local_sqlite:
            connection.exec_driver_sql("PRAGMA foreign_keys=ON")
            connection.commit()


def _run_on(connection: sa.Connection, *, own_transaction: bool) -> None:
    options = {"connection": connection, "render_as_batch": connection.dialect.name == "sqlite"}
    if not own_transaction:
        # The caller's connection: the caller owns the transaction and its commit.
        _configure(**options)
        with context.begin_transaction():
            context.run_migrations()
        return
    with _serialized(connection):
        # Configured inside the transaction, so Alembic leaves it to us.
        _configure(**options)
        context.run_migrations()


def run_migrations_online() -> None:
    """Run the migrations on a live database."""
    given = config.attributes.get("connection")
    if isinstance(given, sa.Connection):
        _run_on(given, own_transaction=False)
        return
    if isinstance(given, sa.Engine):
        engine = given
    else:
        engine = create_engine(
            _url(),
            auth_token=os.environ.get("EVALS_ORM_AUTH_TOKEN"),
            poolclass=sa.pool.NullPool,
        )
    with engine.connect() as connection:
        _run_on(connection, own_transaction=True)
    if given is None:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
