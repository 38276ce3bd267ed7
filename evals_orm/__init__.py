"""Event-sourced storage for longitudinal evaluation studies, on SQLAlchemy."""

import importlib
from typing import TYPE_CHECKING, Any

from evals_orm._ingest import IngestReport, ingest
from evals_orm.converters import converter, dumps, loads
from evals_orm.domain import (
    Checkpoint,
    CheckpointId,
    FieldError,
    LongitudinalMetrics,
    NanoDatetime,
    NanoTimedelta,
    PeriodType,
    Study,
    StudyConfig,
    StudyId,
    StudyStatus,
    TimePeriod,
    uuid7,
    uuid7_at,
)
from evals_orm.engine import create_async_engine, create_engine, sync
from evals_orm.errors import (
    ConfigurationError,
    CredentialsError,
    DatabaseError,
    EvalsError,
    EventConflictError,
    EventOrderError,
    InvalidEventError,
    ProjectionError,
    SchemaMissingError,
    UnreachableError,
)
from evals_orm.eventlog import InvalidLine, SqlEventLog, read_jsonl
from evals_orm.events import (
    CheckpointRecorded,
    EvalEvent,
    StoredEvalEvent,
    StudyCreated,
    StudyPaused,
    StudyResumed,
    StudyStarted,
    StudyStopped,
)
from evals_orm.models import metadata
from evals_orm.projection import EvalProjection, SqlEvalProjection
from evals_orm.storage import EvalStorage, SqlEvalStorage

if TYPE_CHECKING:
    from evals_orm import migrations

__all__ = [
    "Checkpoint",
    "CheckpointId",
    "CheckpointRecorded",
    "ConfigurationError",
    "CredentialsError",
    "DatabaseError",
    "EvalEvent",
    "EvalProjection",
    "EvalStorage",
    "EvalsError",
    "EventConflictError",
    "EventOrderError",
    "FieldError",
    "IngestReport",
    "InvalidEventError",
    "InvalidLine",
    "LongitudinalMetrics",
    "NanoDatetime",
    "NanoTimedelta",
    "PeriodType",
    "ProjectionError",
    "SchemaMissingError",
    "SqlEvalProjection",
    "SqlEvalStorage",
    "SqlEventLog",
    "StoredEvalEvent",
    "Study",
    "StudyConfig",
    "StudyCreated",
    "StudyId",
    "StudyPaused",
    "StudyResumed",
    "StudyStarted",
    "StudyStatus",
    "StudyStopped",
    "TimePeriod",
    "UnreachableError",
    "converter",
    "create_async_engine",
    "create_engine",
    "dumps",
    "ingest",
    "loads",
    "metadata",
    "migrations",
    "read_jsonl",
    "sync",
    "uuid7",
    "uuid7_at",
]


def __getattr__(name: str) -> Any:
    # ``evals_orm.migrations`` imports Alembic, which is slow to load and not
    # needed by the services: it is imported on first access.
    if name == "migrations":
        return importlib.import_module("evals_orm.migrations")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
