"""Alembic environment of evals_orm: the repo's `alembic` command and the wheel's API.

The database comes from, in order: ``config.attributes["connection"]`` (an
Engine or a Connection, for programmatic upgrades on the caller's
connection), ``-x url=...``, ``EVALS_ORM_DATABASE_URL``, ``sqlalchemy.url``.
A PostgreSQL schema comes from the Engine's ``schema_translate_map``, else
``-x schema=...`` or the ini's ``schema`` option.
"""

from __future__ import annotations

import hashlib
import logging.config
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa
from alembic import context

from evals_orm.engine import create_engine
from evals_orm.errors import DatabaseError
from evals_orm.migrations import RENAMED_REVISIONS, VERSION_TABLE, schema_of
from evals_orm.models import metadata

config = context.config
# A host's ini (`alembic -n evals_orm`) need not configure logging.
if (
    config.config_file_name is not None
    and config.attributes.get("configure_logger", True)
    and config.file_config.has_section("formatters")
):
    logging.config.fileConfig(config.config_file_name, disable_existing_loggers=False)


def _only_ours(name: str | None, type_: str, _parent_names: Any) -> bool:
    """Let autogenerate see only evals_orm's tables: not the host app's, not the version table."""
    return type_ != "table" or name in metadata.tables


def _configure(schema: str | None, **kwargs: Any) -> None:
    context.configure(
        target_metadata=metadata,
        version_table=VERSION_TABLE,
        version_table_schema=schema,
        include_name=_only_ours,
        compare_type=True,
        user_module_prefix="evals_orm.types.",
        **kwargs,
    )


def _engine() -> sa.Engine:
    """Return the Engine given by the caller, else one for the configured URL."""
    given = config.attributes.get("connection")
    if isinstance(given, sa.Engine):
        return given
    options = context.get_x_argument(as_dictionary=True)
    url = options.get("url") or os.environ.get("EVALS_ORM_DATABASE_URL")
    url = url or config.get_main_option("sqlalchemy.url")
    if not url:
        raise SystemExit(
            "evals_orm: no database URL; pass `-x url=...` or set EVALS_ORM_DATABASE_URL"
        )
    return create_engine(
        url,
        auth_token=os.environ.get("EVALS_ORM_AUTH_TOKEN"),
        schema=options.get("schema") or config.get_main_option("schema") or None,
        poolclass=sa.pool.NullPool,
    )


def run_migrations_offline() -> None:
    """Write the migration SQL for the database's dialect instead of running it.

    Only the dialect is used; nothing connects. No batch mode: a SQLite
    table rebuild needs to read the live table, which a script cannot.
    """
    engine = _engine()
    schema = schema_of(engine)
    options: dict[str, Any] = {}
    if engine.dialect.name == "sqlite":
        # SQLite's DDL is transactional, though Alembic does not assume it:
        # a script that fails halfway then leaves nothing behind.
        options["transactional_ddl"] = True
    _configure(
        schema,
        dialect_name=engine.dialect.name,
        literal_binds=True,
        render_as_batch=False,
        dialect_opts={"paramstyle": "named"},
        **options,
    )
    with context.begin_transaction():
        if schema is not None:
            # A script's DDL has no execution options: the schema is the
            # search path of the session that runs it.
            quoted = context.get_context().dialect.identifier_preparer.quote_schema(schema)
            context.execute(sa.schema.CreateSchema(schema, if_not_exists=True))
            context.execute(f"SET LOCAL search_path TO {quoted}")
        context.run_migrations()


def _lock_postgresql(connection: sa.Connection, schema: str | None) -> None:
    """Take the transaction's advisory lock of one installation: its schema's, so two never wait."""
    digest = hashlib.blake2b(f"evals_orm migrations {schema or ''}".encode(), digest_size=8)
    key = int.from_bytes(digest.digest(), "big", signed=True)
    connection.execute(sa.select(sa.func.pg_advisory_xact_lock(key)))


# Seconds a MariaDB/MySQL upgrade waits for another one to finish.
MYSQL_LOCK_WAIT_S = 600


@contextmanager
def _mysql_lock(connection: sa.Connection) -> Iterator[None]:
    """Hold the database's named migration lock (``GET_LOCK``) for the block.

    MySQL's DDL commits implicitly, so no transaction can serialise upgrades;
    a named lock belongs to the session and outlives those commits. Its name
    is server-wide, so it is derived from the database's name (hashed to fit
    the 64 characters a name may have).
    """
    name = sa.func.concat("evals_orm:", sa.func.sha1(sa.func.database()))
    got = connection.scalar(sa.select(sa.func.get_lock(name, MYSQL_LOCK_WAIT_S)))
    if got != 1:
        raise DatabaseError(
            f"another upgrade kept this database's migration lock for "
            f"{MYSQL_LOCK_WAIT_S} s; retry once it has finished"
        )
    try:
        yield
    finally:
        connection.scalar(sa.select(sa.func.release_lock(name)))


@contextmanager
def _serialized_mysql(connection: sa.Connection) -> Iterator[None]:
    """``_serialized`` on MariaDB/MySQL: the named lock, then a transaction that reads fresh."""
    if connection.in_transaction():
        with _mysql_lock(connection):
            yield
        return
    try:
        with _mysql_lock(connection):
            # The lock's SELECT began a transaction: a fresh one reads the
            # version table as the previous holder left it.
            connection.commit()
            connection.begin()
            try:
                yield
            except BaseException:
                connection.rollback()
                raise
            connection.commit()
    finally:
        # Ends the transaction the lock's release began.
        connection.commit()


@contextmanager
def _serialized(connection: sa.Connection, schema: str | None) -> Iterator[None]:
    """Run the block holding the database's migration lock, in a transaction.

    Concurrent upgrades then run one after another, and each reads the version
    table only once it holds the lock, so every one of them succeeds. In a
    transaction the caller opened, the block joins it and the caller commits.
    """
    dialect = connection.dialect.name
    if dialect in ("mysql", "mariadb"):
        with _serialized_mysql(connection):
            yield
        return
    if connection.in_transaction():
        if dialect == "postgresql":
            _lock_postgresql(connection, schema)
        yield
        return
    local_sqlite = dialect == "sqlite" and not connection.engine.url.host
    if local_sqlite:
        # Batch migrations copy tables; with foreign keys on (libSQL's default)
        # that could cascade into rows of other tables. The pragma is a no-op
        # inside a transaction, and remote servers refuse it.
        connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
        connection.commit()
    try:
        if dialect == "postgresql":
            _lock_postgresql(connection, schema)
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


def _rename_old_revisions(connection: sa.Connection, schema: str | None) -> None:
    """Rewrite revision ids released before their rename, so Alembic finds them."""
    if not sa.inspect(connection).has_table(VERSION_TABLE, schema=schema):
        return
    version = sa.table(VERSION_TABLE, sa.column("version_num"), schema=schema)
    for old, new in RENAMED_REVISIONS.items():
        connection.execute(
            version.update().where(version.c.version_num == old).values(version_num=new)
        )


@contextmanager
def _default_schema(connection: sa.Connection, schema: str | None) -> Iterator[None]:
    """Create ``schema`` and make it the transaction's search path for the block.

    The engine's ``schema_translate_map`` reaches the DDL but not Alembic's
    reflection, so autogenerate and ``alembic check`` would look in the
    wrong schema. The caller's search path comes back afterwards; after an
    error the rollback restores it.
    """
    if schema is None:
        yield
        return
    connection.execute(sa.schema.CreateSchema(schema, if_not_exists=True))
    previous = connection.scalar(sa.select(sa.func.current_setting("search_path")))
    quoted = connection.dialect.identifier_preparer.quote_schema(schema)
    connection.execute(sa.select(sa.func.set_config("search_path", quoted, True)))
    yield
    connection.execute(sa.select(sa.func.set_config("search_path", previous, True)))


def _run_on(connection: sa.Connection) -> None:
    schema = schema_of(connection)
    with _serialized(connection, schema), _default_schema(connection, schema):
        _rename_old_revisions(connection, schema)
        # Configured inside the transaction, so Alembic leaves it to us.
        _configure(
            schema,
            connection=connection,
            render_as_batch=connection.dialect.name == "sqlite",
        )
        context.run_migrations()


def run_migrations_online() -> None:
    """Run the migrations on a live database."""
    given = config.attributes.get("connection")
    if isinstance(given, sa.Connection):
        _run_on(given)
        return
    engine = _engine()
    with engine.connect() as connection:
        _run_on(connection)
    if given is None:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
