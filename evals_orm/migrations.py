"""Run evals_orm's Alembic migrations from the installed package.

The scripts are the repository's ``alembic/`` directory, shipped inside the
wheel as ``evals_orm/_alembic``; no source checkout or ``alembic.ini`` is
needed. Alembic's version table is ``evals_orm_alembic_version``, so a host
application's own ``alembic_version`` is never touched.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext

from evals_orm.engine import create_engine

__all__ = ["VERSION_TABLE", "current", "downgrade", "script_location", "upgrade"]

VERSION_TABLE = "evals_orm_alembic_version"


def script_location() -> Path:
    """Return the directory of the Alembic scripts (installed, else the source tree's)."""
    package = Path(__file__).resolve().parent
    for candidate in (package / "_alembic", package.parent / "alembic"):
        if (candidate / "env.py").is_file():
            return candidate
    raise FileNotFoundError(f"evals_orm's Alembic scripts are missing from {package}")


def _config(bind: sa.Engine | sa.Connection) -> Config:
    config = Config()
    config.set_main_option("script_location", str(script_location()))
    config.attributes["connection"] = bind
    config.attributes["configure_logger"] = False
    return config


@contextmanager
def _bound(
    engine_or_url: sa.Engine | sa.Connection | str, auth_token: str | None
) -> Iterator[sa.Engine | sa.Connection]:
    if isinstance(engine_or_url, (sa.Engine, sa.Connection)):
        yield engine_or_url
        return
    engine = create_engine(engine_or_url, auth_token=auth_token, poolclass=sa.pool.NullPool)
    try:
        yield engine
    finally:
        engine.dispose()


def upgrade(
    engine_or_url: sa.Engine | sa.Connection | str,
    revision: str = "head",
    *,
    auth_token: str | None = None,
) -> None:
    """Upgrade the database to ``revision``; safe to run from several processes at once.

    Given an Engine or a URL, the upgrade runs in one transaction holding a
    migration lock. Given a Connection, it runs on the caller's transaction.
    """
    with _bound(engine_or_url, auth_token) as bind:
        command.upgrade(_config(bind), revision)


def downgrade(
    engine_or_url: sa.Engine | sa.Connection | str,
    revision: str,
    *,
    auth_token: str | None = None,
) -> None:
    """Downgrade the database to ``revision`` (``"base"`` drops every evals_orm table)."""
    with _bound(engine_or_url, auth_token) as bind:
        command.downgrade(_config(bind), revision)


def current(
    engine_or_url: sa.Engine | sa.Connection | str, *, auth_token: str | None = None
) -> str | None:
    """Return the database's current revision, or ``None`` if it was never migrated."""
    with _bound(engine_or_url, auth_token) as bind:
        if isinstance(bind, sa.Connection):
            return _current_on(bind)
        with bind.connect() as connection:
            return _current_on(connection)


def _current_on(connection: sa.Connection) -> str | None:
    context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
    return context.get_current_revision()
