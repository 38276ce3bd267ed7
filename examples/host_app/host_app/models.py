"""The host's own table, on its own MetaData, typed with evals_orm's portable types."""

from __future__ import annotations

from datetime import datetime
from uuid import UUID

from evals_orm.types import GUID, UTCDateTime
from sqlalchemy import MetaData, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    """The host's declarative base; evals_orm's tables live on ``evals_orm.metadata``."""

    metadata = MetaData(
        naming_convention={"pk": "pk_%(table_name)s", "ix": "ix_%(column_0_label)s"}
    )


class Review(Base):
    """A reviewer's verdict on an evals_orm study."""

    __tablename__ = "host_reviews"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[UUID] = mapped_column(GUID(), index=True)
    reviewer: Mapped[str] = mapped_column(String(100))
    verdict: Mapped[str] = mapped_column(String(20))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
