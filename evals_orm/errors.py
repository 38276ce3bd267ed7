"""The one exception tree of evals_orm."""

from __future__ import annotations

from uuid import UUID

__all__ = [
    "ConfigurationError",
    "CredentialsError",
    "DatabaseError",
    "EvalsError",
    "EventConflictError",
    "EventOrderError",
    "InvalidEventError",
    "ProjectionError",
    "SchemaMissingError",
    "UnreachableError",
]


class EvalsError(Exception):
    """Base class of every error evals_orm raises on purpose."""


class InvalidEventError(EvalsError, ValueError):
    """An event, or its JSON, is malformed; the message names the field path."""


class ProjectionError(EvalsError):
    """An event cannot be applied to the projection; nothing of it was written."""

    def __init__(self, event_id: UUID, reason: str) -> None:
        super().__init__(f"cannot apply event {event_id}: {reason}")
        self.event_id = event_id
        self.reason = reason

    def __reduce__(self) -> tuple[type[ProjectionError], tuple[UUID, str]]:
        return type(self), (self.event_id, self.reason)


class EventConflictError(EvalsError):
    """An event_id is already logged with a different payload."""


class EventOrderError(EvalsError):
    """An event_id is not newer than the last logged event of its study."""


class ConfigurationError(EvalsError, ValueError):
    """A database URL or option is not usable; the message says what is expected."""


class DatabaseError(EvalsError):
    """The database failed in a way the caller can act on; the message says how."""


class SchemaMissingError(DatabaseError):
    """The evals_orm tables are missing: run the migrations first."""


class CredentialsError(DatabaseError):
    """The database refused the credentials (auth token, password)."""


class UnreachableError(DatabaseError):
    """The database cannot be reached (URL, network, server down)."""
