"""The host's use of evals_orm: start studies, review them, read reviews back."""

from __future__ import annotations

from datetime import datetime, timezone

import sqlalchemy as sa
from evals_orm import (
    PeriodType,
    SqlEvalProjection,
    SqlEvalStorage,
    SqlEventLog,
    StoredEvalEvent,
    StudyCreated,
    StudyId,
    StudyStarted,
    create_engine,
    migrations,
    uuid7,
)
from sqlalchemy.orm import Session

from host_app.models import Base, Review


class UnknownStudy(LookupError):
    """The study to review does not exist."""


def migrate(url: str) -> None:
    """Bring a database to the host's schema: evals_orm's migrations, then the host's table.

    A real host runs its own Alembic here; ``create_all`` keeps the example short.
    """
    migrations.upgrade(url)
    engine = create_engine(url)
    Base.metadata.create_all(engine)
    engine.dispose()


def start_study(engine: sa.Engine, name: str) -> StudyId:
    """Create and start a weekly study; return its id."""
    study_id = StudyId(uuid7())
    projection = SqlEvalProjection(engine)
    SqlEventLog(engine).append(
        [
            StoredEvalEvent.new(StudyCreated(study_id, name, PeriodType.WEEKLY, 1)),
            StoredEvalEvent.new(StudyStarted(study_id)),
        ],
        projection=projection,
    )
    return study_id


def review(engine: sa.Engine, study_id: StudyId, reviewer: str, verdict: str) -> None:
    """Record a verdict on an existing study; raise ``UnknownStudy`` otherwise."""
    if SqlEvalStorage(engine).get_study(study_id) is None:
        raise UnknownStudy(f"no study {study_id}")
    with Session(engine) as session, session.begin():
        session.add(
            Review(
                study_id=study_id,
                reviewer=reviewer,
                verdict=verdict,
                created_at=datetime.now(timezone.utc),
            )
        )


def verdicts(engine: sa.Engine, study_id: StudyId) -> list[tuple[str, str]]:
    """Return (reviewer, verdict) for a study, in the order they were given."""
    statement = (
        sa.select(Review.reviewer, Review.verdict)
        .where(Review.study_id == study_id)
        .order_by(Review.id)
    )
    with Session(engine) as session:
        return [(reviewer, verdict) for reviewer, verdict in session.execute(statement)]
