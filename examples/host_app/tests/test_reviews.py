"""The host's tests: they use only the fixtures of evals_orm.testing, on every backend."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from evals_orm import SqlEvalStorage, StudyId, StudyStatus, create_engine, uuid7

from host_app.service import UnknownStudy, migrate, review, start_study, verdicts


@pytest.fixture
def engine(evals_url: str) -> Iterator[sa.Engine]:
    """An Engine on a fresh database with the host's combined schema."""
    migrate(evals_url)
    engine = create_engine(evals_url)
    yield engine
    engine.dispose()


def test_a_started_study_is_running(evals_engine: sa.Engine) -> None:
    """evals_engine is migrated: a study can be started and read back at once."""
    study_id = start_study(evals_engine, "weekly-eval")

    study = SqlEvalStorage(evals_engine).get_study(study_id)

    assert study is not None
    assert StudyStatus.RUNNING == study.status


def test_every_test_starts_without_studies(evals_engine: sa.Engine) -> None:
    """The previous test's study is not in this test's database."""
    assert [] == SqlEvalStorage(evals_engine).list_studies()


def test_verdicts_come_back_in_order(engine: sa.Engine) -> None:
    """The host's own table sits next to evals_orm's and holds the verdicts."""
    study_id = start_study(engine, "reviewed")

    review(engine, study_id, "ada", "accept")
    review(engine, study_id, "grace", "revise")

    assert [("ada", "accept"), ("grace", "revise")] == verdicts(engine, study_id)


def test_a_review_of_an_unknown_study_is_refused(engine: sa.Engine) -> None:
    """Reviewing a study that does not exist raises UnknownStudy and writes nothing."""
    missing = StudyId(uuid7())

    with pytest.raises(UnknownStudy):
        review(engine, missing, "ada", "accept")

    assert [] == verdicts(engine, missing)


def test_the_url_is_a_fresh_empty_database(evals_backend: str, evals_url: str) -> None:
    """evals_url alone reaches an empty database of the backend named in the test id."""
    engine = create_engine(evals_url)
    expected = {"postgresql": "postgresql", "mariadb": "mysql"}.get(evals_backend, "sqlite")

    assert expected == engine.dialect.name
    assert [] == sa.inspect(engine).get_table_names()
    engine.dispose()
