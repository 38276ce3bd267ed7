"""Run evals_orm's Alembic migrations, alone or inside a host application's Alembic.

The scripts are the repository's ``alembic/`` directory, shipped inside the
wheel as ``evals_orm/_alembic`` (:data:`SCRIPT_LOCATION`); no source checkout
or ``alembic.ini`` is needed. Their branch label is ``evals_orm`` and their
version table ``evals_orm_alembic_version``, so a host application's own
revisions and ``alembic_version`` are never touched. The README shows the
three ways a host deploys them: a separate step, one ``alembic upgrade`` of
the host, and offline SQL.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TextIO

import sqlalchemy as sa
from alembic import command
from alembic import context as alembic_context
from alembic import op as alembic_op
from alembic.autogenerate.api import AutogenContext
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from evals_orm._tx import check_writable, engine_of
from evals_orm.engine import create_engine
from evals_orm.models import metadata

if TYPE_CHECKING:
    from alembic.runtime.environment import NameFilterParentNames, NameFilterType
    from sqlalchemy.schema import SchemaItem

__all__ = [
    "BRANCH",
    "SCRIPT_LOCATION",
    "VERSION_TABLE",
    "current",
    "downgrade",
    "include_name",
    "include_object",
    "render_item",
    "schema_of",
    "script_location",
    "upgrade",
]

VERSION_TABLE = "evals_orm_alembic_version"
BRANCH = "evals_orm"
# Revision ids of released versions that were renamed since: the environment
# rewrites them in the version table before it migrates.
RENAMED_REVISIONS = {"0001": "evals_orm_0001"}
_OUR_TABLES = frozenset({*metadata.tables, VERSION_TABLE})


def script_location() -> Path:
    """Return the directory of the Alembic scripts (installed, else the source tree's)."""
    package = Path(__file__).resolve().parent
    for candidate in (package / "_alembic", package.parent / "alembic"):
        if (candidate / "env.py").is_file():
            return candidate
    raise FileNotFoundError(f"evals_orm's Alembic scripts are missing from {package}")


def _public_location() -> str:
    scripts = script_location()
    # An installed wheel has them as package data; a source checkout or an
    # editable install only has the repository's folder, so its path is given.
    return (
        "evals_orm:_alembic" if scripts.parent == Path(__file__).resolve().parent else str(scripts)
    )


SCRIPT_LOCATION = _public_location()
"""The package's Alembic ``script_location``: ``evals_orm:_alembic`` once installed."""


def schema_of(bind: sa.Engine | sa.Connection) -> str | None:
    """Return the schema evals_orm's objects live in on ``bind`` (``None``: the default one)."""
    translate: dict[str | None, str] = (
        bind.get_execution_options().get("schema_translate_map") or {}
    )
    return translate.get(None)


def _config(bind: sa.Engine | sa.Connection, output: TextIO | None = None) -> Config:
    config = Config(output_buffer=output)
    config.set_main_option("script_location", str(script_location()))
    config.attributes["connection"] = bind
    config.attributes["configure_logger"] = False
    return config


@contextmanager
def _bound(
    engine_or_url: sa.Engine | sa.Connection | str | sa.URL, auth_token: str | None
) -> Iterator[sa.Engine | sa.Connection]:
    if isinstance(engine_or_url, (sa.Engine, sa.Connection)):
        yield engine_or_url
        return
    if isinstance(engine_or_url, (AsyncEngine, AsyncConnection)):
        raise TypeError(
            "the migrations run on a sync Engine or Connection; from asyncio, run them "
            "on the AsyncConnection: async with engine.begin() as connection: "
            "await connection.run_sync(evals_orm.migrations.upgrade)"
        )
    if not isinstance(engine_or_url, (str, sa.URL)):
        raise TypeError(f"expected an Engine, a Connection or a URL, got {engine_or_url!r}")
    engine = create_engine(engine_or_url, auth_token=auth_token, poolclass=sa.pool.NullPool)
    try:
        yield engine
    finally:
        engine.dispose()


@contextmanager
def _host_context_kept() -> Iterator[None]:
    """Put a host's Alembic ``context`` and ``op`` back once our environment is done.

    Alembic keeps one module-level proxy of each; running our environment
    from a host's ``env.py`` replaces them and leaves them cleared at the
    end, which would break the host's own run. Alembic has no public API to
    nest environments, so its private proxy attribute is read here.
    """
    saved = [getattr(module, "_proxy", None) for module in (alembic_context, alembic_op)]
    try:
        yield
    finally:
        for proxy in saved:
            if proxy is not None:
                proxy._install_proxy()


def upgrade(
    engine_or_url: sa.Engine | sa.Connection | str | sa.URL,
    revision: str = "head",
    *,
    auth_token: str | None = None,
    sql: bool = False,
    output: TextIO | None = None,
) -> None:
    """Upgrade the database to ``revision``; safe to run from several processes at once.

    Given an Engine or a URL, the upgrade runs in one transaction holding a
    migration lock. Given a Connection (a host's, from its ``env.py``), it
    runs on it: inside the open transaction without committing it, else in
    a transaction of its own that it commits; the host's Alembic context is
    left intact. With ``sql=True`` nothing is connected to: the SQL script
    for the URL's or Engine's dialect is written to ``output`` (stdout).
    """
    with _bound(engine_or_url, auth_token) as bind, _host_context_kept():
        if sql:
            command.upgrade(_config(bind, output or sys.stdout), revision, sql=True)
        else:
            check_writable(engine_of(bind))
            command.upgrade(_config(bind), revision)


def downgrade(
    engine_or_url: sa.Engine | sa.Connection | str | sa.URL,
    revision: str,
    *,
    auth_token: str | None = None,
) -> None:
    """Downgrade the database to ``revision`` (``"base"`` drops every evals_orm table)."""
    with _bound(engine_or_url, auth_token) as bind, _host_context_kept():
        check_writable(engine_of(bind))
        command.downgrade(_config(bind), revision)


def current(
    engine_or_url: sa.Engine | sa.Connection | str | sa.URL, *, auth_token: str | None = None
) -> str | None:
    """Return the database's current revision, or ``None`` if it was never migrated."""
    with _bound(engine_or_url, auth_token) as bind:
        if isinstance(bind, sa.Connection):
            return _current_on(bind)
        with bind.connect() as connection:
            return _current_on(connection)


def _current_on(connection: sa.Connection) -> str | None:
    context = MigrationContext.configure(
        connection,
        opts={"version_table": VERSION_TABLE, "version_table_schema": schema_of(connection)},
    )
    revision = context.get_current_revision()
    return RENAMED_REVISIONS.get(revision, revision) if revision is not None else None


def include_name(
    name: str | None, type_: NameFilterType, parent_names: NameFilterParentNames
) -> bool:
    """Hide evals_orm's tables, their indexes and its version table from a host's autogenerate.

    Pass it as ``include_name=`` to the host's ``context.configure``.
    """
    if type_ == "table":
        return name not in _OUR_TABLES
    return parent_names.get("table_name") not in _OUR_TABLES


def include_object(
    object_: SchemaItem,
    name: str | None,
    type_: NameFilterType,
    reflected: bool,
    compare_to: SchemaItem | None,
) -> bool:
    """Hide evals_orm's objects from a host's autogenerate, also when its metadata holds them.

    Pass it as ``include_object=`` to the host's ``context.configure``.
    """
    table = object_ if type_ == "table" else getattr(object_, "table", None)
    return not (isinstance(table, sa.Table) and table.name in _OUR_TABLES)


def render_item(type_: str, object_: Any, autogen_context: AutogenContext) -> str | Literal[False]:
    """Import evals_orm's column types in a host's generated migrations that use them.

    Pass it as ``render_item=`` to the host's ``context.configure``; the type
    itself is rendered as Alembic would (``evals_orm.types.GUID()``).
    """
    module = type(object_).__module__
    if type_ == "type" and module.startswith("evals_orm.") and autogen_context.imports is not None:
        autogen_context.imports.add(f"import {module}")
    return False
