"""pytest plugin: run a host application's tests on every evals_orm backend.

Install ``evals-orm[testing]``; pytest loads the plugin through its ``pytest11``
entry point (or ``-p evals_orm.testing``). It does nothing until backends are
selected, with any of (first one set wins)::

    pytest --evals-backend sqlite,libsql,libsql-remote,postgresql,mariadb   # repeatable
    EVALS_ORM_TEST_BACKENDS=sqlite,postgresql pytest
    [tool.pytest.ini_options] evals_backends = "sqlite,libsql"

Each test that uses a fixture below then runs once per selected backend, the
backend's name in its id (``test_x[sqlite]``). Without a selection nothing is
parametrized and those tests run on ``sqlite`` alone.

Fixtures, function-scoped (every test gets its own database):

- ``evals_backend``: the backend's name.
- ``evals_url``: the URL of a fresh, empty, un-migrated database, enough for
  ``evals_orm.create_engine`` and ``evals_orm.migrations`` on its own (a remote
  server's token travels in it as ``?authToken=``); removed after the test.
  Run the host's own (combined) migrations on it.
- ``evals_engine``: an Engine on that database, migrated to the package's head
  revision, disposed after the test.
- ``evals_async_engine``: the same as an ``AsyncEngine`` (``NullPool``), when
  the installed evals_orm has ``create_async_engine``.
- ``evals_database``: the database as a ``Database`` (``backend``, ``url``
  without the token, ``auth_token``, ``engine()``, ``env()``).

and, session-scoped (one per ``pytest-xdist`` worker), ``evals_sqld``: the
running libSQL server of ``libsql-remote``.

Backends: ``sqlite`` and ``libsql`` are files in the test's ``tmp_path``;
``postgresql`` is a database created per test from the admin URL
(``--evals-postgres-url``, ``EVALS_ORM_TEST_POSTGRES_URL``, ini
``evals_postgres_url``; default ``postgresql://postgres@127.0.0.1:5432/test``)
and dropped ``WITH (FORCE)`` after it; ``mariadb`` likewise, from its admin URL
(``--evals-mysql-url``, ``EVALS_ORM_TEST_MYSQL_URL``, ini ``evals_mysql_url``;
default ``mysql://root@127.0.0.1:3306/``), each test's database in utf8mb4,
its URL of the form ``mysql://root@127.0.0.1:3306/<db>``; ``libsql-remote`` is one real ``sqld``
per test session (per ``pytest-xdist`` worker) on a free loopback port, emptied
before each test and stopped at the end, its log shown with a failing test. The
binary is the pinned one of the extra, or the host's (``--evals-sqld``,
``EVALS_ORM_SQLD``, ini ``evals_sqld``).

A backend that cannot run skips its tests with the reason, or fails them under
``--evals-strict`` (``EVALS_ORM_REQUIRE_BACKENDS=1``, ini ``evals_strict``).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any, NoReturn

import attrs
import pytest
import sqlalchemy as sa

import evals_orm
from evals_orm import create_engine, migrations
from evals_orm._backend_names import BACKENDS
from evals_orm._sqld import SQLD_ENV_VAR, SqldServer, running_sqld

__all__ = ["BACKENDS", "DEFAULT_MYSQL_URL", "DEFAULT_POSTGRES_URL", "Database"]

DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"
DEFAULT_MYSQL_URL = "mysql://root@127.0.0.1:3306/"
BACKENDS_ENV_VAR = "EVALS_ORM_TEST_BACKENDS"
POSTGRES_ENV_VAR = "EVALS_ORM_TEST_POSTGRES_URL"
MYSQL_ENV_VAR = "EVALS_ORM_TEST_MYSQL_URL"
STRICT_ENV_VAR = "EVALS_ORM_REQUIRE_BACKENDS"
_UNSELECTED_DEFAULT = "sqlite"

_selection_key = pytest.StashKey[tuple[str, ...]]()
_sqld_key = pytest.StashKey[SqldServer]()


@attrs.frozen
class Database:
    """A fresh, empty database of one backend, for one test."""

    backend: str
    url: str
    auth_token: str | None = attrs.field(default=None, repr=False)

    @property
    def url_with_token(self) -> str:
        """Return ``url`` carrying the auth token (if any), for ``create_engine(url)``."""
        if self.auth_token is None:
            return self.url
        return (
            sa.make_url(self.url)
            .update_query_dict({"authToken": self.auth_token})
            .render_as_string(hide_password=False)
        )

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
    group = parser.getgroup("evals_orm", "evals_orm backends")
    group.addoption(
        "--evals-backend",
        action="append",
        default=[],
        metavar="NAMES",
        help=f"run the evals_orm fixtures on these backends (comma list, repeatable): "
        f"{', '.join(BACKENDS)}; env {BACKENDS_ENV_VAR}",
    )
    group.addoption(
        "--evals-postgres-url",
        help=f"admin URL that creates the per-test PostgreSQL databases; env {POSTGRES_ENV_VAR}"
        f" (default {DEFAULT_POSTGRES_URL})",
    )
    group.addoption(
        "--evals-mysql-url",
        help=f"admin URL that creates the per-test MariaDB/MySQL databases; env {MYSQL_ENV_VAR}"
        f" (default {DEFAULT_MYSQL_URL})",
    )
    group.addoption(
        "--evals-sqld",
        metavar="PATH",
        help=f"sqld binary for libsql-remote (default: the pinned one); env {SQLD_ENV_VAR}",
    )
    group.addoption(
        "--evals-strict",
        action="store_true",
        default=None,
        help=f"fail, not skip, tests of a backend that cannot run; env {STRICT_ENV_VAR}=1",
    )
    parser.addini("evals_backends", "evals_orm backends to run on (comma list)", default="")
    parser.addini("evals_postgres_url", "admin URL for the PostgreSQL test databases")
    parser.addini("evals_mysql_url", "admin URL for the MariaDB/MySQL test databases")
    parser.addini("evals_sqld", "sqld binary for libsql-remote")
    parser.addini("evals_strict", "fail instead of skip unavailable backends", type="bool")


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_selection_key] = _parse_backends(config)


def pytest_report_header(config: pytest.Config) -> str | None:
    selection = config.stash[_selection_key]
    return f"evals_orm backends: {', '.join(selection)}" if selection else None


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    backends = metafunc.config.stash[_selection_key]
    if backends and "evals_backend" in metafunc.fixturenames:
        # The parameter replaces the ``evals_backend`` fixture. Session scope
        # groups the tests by backend, so each worker starts its sqld (and meets
        # an unreachable server) once, not between every test.
        metafunc.parametrize("evals_backend", backends, ids=backends, scope="session")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    server = item.stash.get(_sqld_key, None)
    if server is not None and report.failed:
        report.sections.append((f"sqld log ({server.log_path})", server.log_tail()))
    return report


@pytest.fixture
def evals_backend() -> str:
    """The name of the backend this test runs on (``sqlite`` when none is selected)."""
    return _UNSELECTED_DEFAULT


@pytest.fixture(scope="session")
def evals_sqld(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SqldServer]:
    """Run one sqld for this session (this xdist worker), stopped at its end.

    Started by the first test that needs it; ``libsql-remote`` databases empty it.
    """
    config = request.config
    binary = (
        config.getoption("--evals-sqld")
        or os.environ.get(SQLD_ENV_VAR)
        or config.getini("evals_sqld")
        or None
    )
    context = running_sqld(tmp_path_factory.mktemp("sqld"), binary)
    try:
        server = context.__enter__()
    except (RuntimeError, OSError) as error:
        _unavailable(config, f"libsql-remote: no libSQL server (sqld): {error}")
    try:
        yield server
    finally:
        context.__exit__(None, None, None)


@pytest.fixture(scope="session")
def _evals_postgres_admin(request: pytest.FixtureRequest) -> Iterator[sa.Engine]:
    config = request.config
    url = (
        config.getoption("--evals-postgres-url")
        or os.environ.get(POSTGRES_ENV_VAR)
        or config.getini("evals_postgres_url")
        or DEFAULT_POSTGRES_URL
    )
    parsed = sa.make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    admin = sa.create_engine(parsed, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
    try:
        with admin.connect() as connection:
            connection.exec_driver_sql("SELECT 1")
    except sa.exc.DBAPIError as error:
        admin.dispose()
        shown = parsed.render_as_string(hide_password=True)
        _unavailable(config, f"postgresql: {shown} is unreachable: {error.orig}")
    yield admin
    admin.dispose()


@pytest.fixture(scope="session")
def _evals_mysql_admin(request: pytest.FixtureRequest) -> Iterator[sa.Engine]:
    config = request.config
    url = (
        config.getoption("--evals-mysql-url")
        or os.environ.get(MYSQL_ENV_VAR)
        or config.getini("evals_mysql_url")
        or DEFAULT_MYSQL_URL
    )
    admin = create_engine(url, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
    try:
        with admin.connect() as connection:
            connection.exec_driver_sql("SELECT 1")
    except (sa.exc.DBAPIError, evals_orm.EvalsError) as error:
        admin.dispose()
        shown = admin.url.render_as_string(hide_password=True)
        _unavailable(config, f"mariadb: {shown} is unreachable: {getattr(error, 'orig', error)}")
    yield admin
    admin.dispose()


@pytest.fixture
def evals_database(
    request: pytest.FixtureRequest, evals_backend: str, tmp_path: Path
) -> Iterator[Database]:
    """A fresh, empty database of ``evals_backend``, removed after the test."""
    if evals_backend in ("sqlite", "libsql"):
        scheme = "sqlite" if evals_backend == "sqlite" else "sqlite+libsql"
        yield Database(evals_backend, f"{scheme}:///{tmp_path / 'evals.db'}")
    elif evals_backend == "libsql-remote":
        server: SqldServer = request.getfixturevalue("evals_sqld")
        request.node.stash[_sqld_key] = server
        server.reset()
        yield Database(evals_backend, server.url, server.auth_token)
    elif evals_backend == "mariadb":
        yield from _mysql_database(request.getfixturevalue("_evals_mysql_admin"))
    else:
        yield from _postgresql_database(request.getfixturevalue("_evals_postgres_admin"))


@pytest.fixture
def evals_url(evals_database: Database) -> str:
    """The URL of a fresh, empty (un-migrated) database; ``create_engine(url)`` suffices."""
    return evals_database.url_with_token


@pytest.fixture
def evals_engine(evals_database: Database) -> Iterator[sa.Engine]:
    """An Engine on the fresh database, migrated to head, disposed after the test."""
    engine = evals_database.engine()
    try:
        migrations.upgrade(engine)
        yield engine
    finally:
        engine.dispose()


# The async API may be absent from the installed evals_orm; the fixture exists with it.
_create_async_engine: Any = getattr(evals_orm, "create_async_engine", None)
if _create_async_engine is not None:
    from sqlalchemy.ext.asyncio import AsyncEngine

    @pytest.fixture
    def evals_async_engine(evals_database: Database) -> AsyncEngine:
        """An AsyncEngine on the fresh database, migrated to head.

        ``NullPool``: each test's event loop is its own, so no connection may
        outlive it, and there is nothing to dispose afterwards.
        """
        migrations.upgrade(evals_database.url, auth_token=evals_database.auth_token)
        engine: AsyncEngine = _create_async_engine(
            evals_database.url,
            auth_token=evals_database.auth_token,
            poolclass=sa.pool.NullPool,
        )
        return engine


def _parse_backends(config: pytest.Config) -> tuple[str, ...]:
    raw = (
        ",".join(config.getoption("--evals-backend"))
        or os.environ.get(BACKENDS_ENV_VAR, "")
        or str(config.getini("evals_backends"))
    )
    chosen = [name.strip() for name in raw.replace(" ", ",").split(",") if name.strip()]
    unknown = sorted(set(chosen) - set(BACKENDS))
    if unknown:
        raise pytest.UsageError(
            f"unknown evals_orm backend(s) {', '.join(unknown)}; choose from {', '.join(BACKENDS)}"
        )
    return tuple(dict.fromkeys(chosen))


def _strict(config: pytest.Config) -> bool:
    option = config.getoption("--evals-strict")
    if option is not None:
        return bool(option)
    return os.environ.get(STRICT_ENV_VAR) == "1" or bool(config.getini("evals_strict"))


def _unavailable(config: pytest.Config, reason: str) -> NoReturn:
    # One line, and ``from None``: the driver's traceback chain would bury the reason.
    reason = " ".join(reason.split())
    if _strict(config):
        raise pytest.fail.Exception(
            f"evals_orm backend unavailable (strict): {reason}", pytrace=False
        ) from None
    raise pytest.skip.Exception(f"BACKEND UNAVAILABLE - {reason}") from None


def _postgresql_database(admin: sa.Engine) -> Iterator[Database]:
    # A uuid is unique across xdist workers and concurrent runs on one server.
    name = f"evals_orm_test_{uuid.uuid4().hex}"
    with admin.connect() as connection:
        connection.exec_driver_sql(f'CREATE DATABASE "{name}"')
    url = admin.url.set(drivername="postgresql", database=name)
    try:
        yield Database("postgresql", url.render_as_string(hide_password=False))
    finally:
        with admin.connect() as connection:
            connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _mysql_database(admin: sa.Engine) -> Iterator[Database]:
    name = f"evals_orm_test_{uuid.uuid4().hex}"
    with admin.connect() as connection:
        connection.exec_driver_sql(
            f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_bin"
        )
    # The URL form a user writes: mysql://user@host/db, PyMySQL by default.
    url = admin.url.set(drivername=admin.url.get_backend_name(), database=name, query={})
    try:
        yield Database("mariadb", url.render_as_string(hide_password=False))
    finally:
        with admin.connect() as connection:
            connection.exec_driver_sql(f"DROP DATABASE IF EXISTS `{name}`")
