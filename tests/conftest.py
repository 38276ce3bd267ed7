"""The backend fixture: every database test runs on each selected backend.

Backends: ``sqlite`` (stdlib driver, file), ``libsql`` (embedded file),
``libsql-remote`` (a real sqld on loopback, with a JWT) and ``postgresql``
(a database created for the test on the local server, dropped after).
Select them with ``--backend sqlite,libsql`` or ``EVALS_ORM_TEST_BACKENDS``;
the default is all four. A backend that cannot run is skipped with a loud
reason, never silently - and fails instead when ``EVALS_ORM_REQUIRE_BACKENDS=1``
(CI sets it).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import sqlalchemy as sa

from evals_orm import create_engine, migrations

from sqld import SqldUnavailable, running_sqld

BACKENDS = ("sqlite", "libsql", "libsql-remote", "postgresql")
POSTGRES_ADMIN_URL = os.environ.get(
    "EVALS_ORM_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)


@attrs.frozen
class Database:
    """A fresh, empty database of one backend, for one test."""

    backend: str
    url: str
    auth_token: str | None = None

    def engine(self, **kwargs: Any) -> sa.Engine:
        """Create an Engine for this database through ``evals_orm.create_engine``."""
        return create_engine(self.url, auth_token=self.auth_token, **kwargs)

    def env(self) -> dict[str, str]:
        """Return environment variables pointing the CLI and Alembic at this database."""
        env = {"EVALS_ORM_DATABASE_URL": self.url}
        if self.auth_token:
            env["EVALS_ORM_AUTH_TOKEN"] = self.auth_token
        return env


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--backend",
        action="append",
        default=[],
        help=f"backends to test, comma-separated, from {', '.join(BACKENDS)} (default: all)",
    )


def selected_backends(config: pytest.Config) -> list[str]:
    """Return the backends chosen by ``--backend`` or ``EVALS_ORM_TEST_BACKENDS``."""
    raw = ",".join(config.getoption("--backend")) or os.environ.get("EVALS_ORM_TEST_BACKENDS", "")
    chosen = [name.strip() for name in raw.split(",") if name.strip()] or list(BACKENDS)
    unknown = sorted(set(chosen) - set(BACKENDS))
    if unknown:
        raise pytest.UsageError(f"unknown backend(s) {unknown}; choose from {BACKENDS}")
    return chosen


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend" in metafunc.fixturenames:
        metafunc.parametrize("backend", selected_backends(metafunc.config), scope="session")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Lets nox run the database-free tests once instead of once per backend.
    for item in items:
        if "backend" not in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.backend_independent)


def pytest_report_header(config: pytest.Config) -> str:
    return f"evals_orm backends: {', '.join(selected_backends(config))}"


def _unavailable(reason: str) -> None:
    if os.environ.get("EVALS_ORM_REQUIRE_BACKENDS") == "1":
        pytest.fail(f"required backend unavailable: {reason}")
    pytest.skip(f"BACKEND UNAVAILABLE - {reason}")


@pytest.fixture
def database(backend: str, tmp_path: Path) -> Iterator[Database]:
    """A fresh empty database of ``backend``, removed after the test."""
    if backend == "sqlite":
        yield Database(backend, f"sqlite:///{tmp_path / 'test.db'}")
    elif backend == "libsql":
        yield Database(backend, f"sqlite+libsql:///{tmp_path / 'test.db'}")
    elif backend == "libsql-remote":
        try:
            server_context = running_sqld(tmp_path / "sqld")
            server = server_context.__enter__()
        except SqldUnavailable as error:
            _unavailable(f"no libSQL server (sqld): {error}")
        try:
            yield Database(backend, server.url, server.auth_token)
        finally:
            server_context.__exit__(None, None, None)
    else:
        yield from _postgresql_database()


def _postgresql_database() -> Iterator[Database]:
    admin = sa.create_engine(
        POSTGRES_ADMIN_URL.replace("postgresql://", "postgresql+psycopg://", 1),
        isolation_level="AUTOCOMMIT",
        poolclass=sa.pool.NullPool,
    )
    name = f"evals_orm_test_{uuid.uuid4().hex[:16]}"
    try:
        with admin.connect() as connection:
            connection.exec_driver_sql(f'CREATE DATABASE "{name}"')
    except sa.exc.OperationalError as error:
        admin.dispose()
        _unavailable(f"PostgreSQL at {POSTGRES_ADMIN_URL} is unreachable: {error.orig}")
    url = sa.make_url(POSTGRES_ADMIN_URL).set(database=name)
    try:
        yield Database("postgresql", url.render_as_string(hide_password=False))
    finally:
        with admin.connect() as connection:
            connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


@pytest.fixture
def engine(database: Database) -> Iterator[sa.Engine]:
    """An Engine on the fresh database, not migrated."""
    engine = database.engine()
    yield engine
    engine.dispose()


@pytest.fixture
def migrated(engine: sa.Engine) -> sa.Engine:
    """An Engine on the fresh database, upgraded to the head revision."""
    migrations.upgrade(engine)
    return engine
