"""The project's fixture names over the shipped plugin ``evals_orm.testing``.

The plugin parametrizes every database test by backend and makes its
databases: ``sqlite`` and ``libsql`` files, one ``sqld`` per worker for
``libsql-remote`` (with a JWT, so ``database.auth_token`` is set), a database
per test for ``postgresql`` and ``mariadb``. All five run unless ``--evals-backend`` (alias
``--backend``) or ``EVALS_ORM_TEST_BACKENDS`` narrows them; CI sets
``EVALS_ORM_REQUIRE_BACKENDS=1`` so an unavailable backend fails, not skips.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from evals_orm import migrations
from evals_orm.testing import Database

__all__ = ["Database"]

# tests/test_testing_plugin.py runs host projects through the plugin.
pytest_plugins = ["pytester"]


def pytest_addoption(parser: pytest.Parser) -> None:
    # The project's older spelling; it fills the plugin's own option.
    parser.addoption(
        "--backend", action="append", default=[], dest="evals_backend", help="--evals-backend"
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Lets nox run the database-free tests once instead of once per backend.
    for item in items:
        if "evals_backend" not in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.backend_independent)


@pytest.fixture
def backend(evals_backend: str) -> str:
    """The name of the backend this test runs on."""
    return evals_backend


@pytest.fixture
def database(evals_database: Database) -> Database:
    """A fresh empty database of ``backend``, removed after the test."""
    return evals_database


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
