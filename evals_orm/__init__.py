"""Event-sourced storage for longitudinal evaluation studies, on SQLAlchemy."""

from evals_orm.converters import converter, dumps, loads
from evals_orm.domain import (
    Checkpoint,
    CheckpointId,
    LongitudinalMetrics,
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
    DatabaseError,
    EvalsError,
    EventConflictError,
    EventOrderError,
    InvalidEventError,
    ProjectionError,
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

__all__ = [
    "Checkpoint",
    "CheckpointId",
    "CheckpointRecorded",
    "ConfigurationError",
    "DatabaseError",
    "EvalEvent",
    "EvalProjection",
    "EvalStorage",
    "EvalsError",
    "EventConflictError",
    "EventOrderError",
    "InvalidEventError",
    "InvalidLine",
    "LongitudinalMetrics",
    "PeriodType",
    "ProjectionError",
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
    "converter",
    "create_async_engine",
    "create_engine",
    "dumps",
    "loads",
    "metadata",
    "read_jsonl",
    "sync",
    "uuid7",
    "uuid7_at",
]
