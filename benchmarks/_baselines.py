"""The two baselines ``SqlEvalProjection`` is measured against.

``raw_load`` is the physical limit: a hand-written script that folds the
events into final rows with a dict state machine, encodes the JSON columns
with ``json.dumps`` of hand-built dicts and inserts the rows with the raw
DBAPI driver's ``executemany``, in one transaction.

``naive_orm`` is what users write by hand with the ORM: one ORM object per
event, ``session.get`` for the study, mutate, ``session.flush()`` per event
and one commit at the end.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from typing import Any
from uuid import UUID

import sqlalchemy as sa
from sqlalchemy.orm import Session

from evals_orm import (
    CheckpointRecorded,
    LongitudinalMetrics,
    StoredEvalEvent,
    StudyConfig,
    StudyCreated,
    StudyPaused,
    StudyResumed,
    StudyStarted,
    StudyStatus,
    StudyStopped,
)
from evals_orm.models import CheckpointRow, StudyRow

__all__ = ["ExecuteMany", "naive_orm", "raw_load", "table_digest"]

_CHUNK = 5_000
_STUDY_COLUMNS = (
    "id, name, status, period_type, period_value, config,"
    " created_at, started_at, stopped_at, last_event_id"
)
_CHECKPOINT_COLUMNS = "id, study_id, timestamp, metrics, events_analyzed, sessions_included"
_SQLITE_STUDIES = f"INSERT INTO studies ({_STUDY_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
_SQLITE_CHECKPOINTS = f"INSERT INTO checkpoints ({_CHECKPOINT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)"
_PG_STUDIES = (
    f"INSERT INTO studies ({_STUDY_COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s::jsonb, %s, %s, %s, %s)"
)
_PG_CHECKPOINTS = (
    f"INSERT INTO checkpoints ({_CHECKPOINT_COLUMNS}) VALUES (%s, %s, %s, %s::jsonb, %s, %s::jsonb)"
)
# PyMySQL rewrites an executemany of this form into multi-row INSERTs.
_MYSQL_STUDIES = f"INSERT INTO studies ({_STUDY_COLUMNS}) VALUES ({', '.join(['%s'] * 10)})"
_MYSQL_CHECKPOINTS = (
    f"INSERT INTO checkpoints ({_CHECKPOINT_COLUMNS.replace('timestamp', '`timestamp`')}) "
    f"VALUES ({', '.join(['%s'] * 6)})"
)

_TRANSITIONS = {
    ("pending", StudyStarted): "running",
    ("running", StudyPaused): "paused",
    ("paused", StudyResumed): "running",
    ("pending", StudyStopped): "stopped",
    ("running", StudyStopped): "stopped",
    ("paused", StudyStopped): "stopped",
}
# Positions in a study row (a list while it is folded).
_STATUS, _CREATED, _STARTED, _STOPPED, _LAST = 2, 6, 7, 8, 9


ExecuteMany = Callable[[str, Sequence[tuple[Any, ...]]], object]
"""A driver's ``executemany``: ``cursor.executemany`` (or the connection's shortcut)."""


def _rfc3339(value: datetime) -> str:
    """Format a UTC datetime as the wire format does (no, 3 or 6 fraction digits)."""
    micro = value.microsecond
    spec = "seconds" if not micro else "milliseconds" if not micro % 1000 else "microseconds"
    return value.isoformat(timespec=spec)[:-6] + "Z"


def _fixed(value: datetime) -> str:
    """Format a UTC datetime as the fixed-width text stored on SQLite/libSQL."""
    return value.isoformat(timespec="microseconds")[:-6] + "Z"


def _metrics_json(m: LongitudinalMetrics) -> str:
    duration = m.avg_session_duration
    return json.dumps(
        {
            "sessions_completed": m.sessions_completed,
            "session_success_rate": m.session_success_rate,
            "avg_session_duration": [
                duration.days * 86_400 + duration.seconds,
                duration.microseconds * 1000,
            ],
            "tasks_completed": m.tasks_completed,
            "first_attempt_success_rate": m.first_attempt_success_rate,
            "avg_iterations_to_success": m.avg_iterations_to_success,
            "agent_efficiency": m.agent_efficiency,
            "tool_success_rate": m.tool_success_rate,
            "self_correction_rate": m.self_correction_rate,
            "swarm_coordination_overhead": m.swarm_coordination_overhead,
            "parallelism_efficiency": m.parallelism_efficiency,
            "learnings_applied": m.learnings_applied,
            "learning_effectiveness": m.learning_effectiveness,
            "total_tokens": m.total_tokens,
            "total_cost": m.total_cost,
            "cost_per_successful_task": m.cost_per_successful_task,
            "period": {"start": _rfc3339(m.period.start), "end": _rfc3339(m.period.end)},
        },
        separators=(",", ":"),
    )


def _config_json(config: StudyConfig) -> str:
    value: dict[str, object] = {}
    if config.description is not None:
        value["description"] = config.description
    if config.tags:
        value["tags"] = list(config.tags)
    if config.metadata:
        value["metadata"] = dict(config.metadata)
    return json.dumps(value, separators=(",", ":"))


def raw_load(
    run: ExecuteMany, events: Iterable[StoredEvalEvent], *, dialect: str
) -> tuple[int, int]:
    """Insert the final rows of ``events`` with the driver's ``executemany`` (the caller commits).

    ``dialect`` is the Engine's: "sqlite", "postgresql", "mysql" or "mariadb".
    Checkpoint rows are final when seen, so they go out in chunks as the
    stream is read; study rows are kept in a dict and written at the end.
    Return the numbers of study and checkpoint rows written.
    """
    # PostgreSQL takes uuid, timestamptz and numeric as Python values and the
    # JSON as text cast to jsonb; MariaDB/MySQL take BINARY(16) bytes and
    # naive UTC DATETIMEs; SQLite/libSQL take the seed schema's text.
    postgresql = dialect == "postgresql"
    mysql = dialect in ("mysql", "mariadb")
    studies_sql, checkpoints_sql = (
        (_PG_STUDIES, _PG_CHECKPOINTS)
        if postgresql
        else (_MYSQL_STUDIES, _MYSQL_CHECKPOINTS)
        if mysql
        else (_SQLITE_STUDIES, _SQLITE_CHECKPOINTS)
    )

    def key(value: UUID) -> object:
        return value if postgresql else value.bytes if mysql else str(value)

    def time(value: datetime) -> object:
        return value if postgresql else value.replace(tzinfo=None) if mysql else _fixed(value)

    studies: dict[UUID, list[Any]] = {}
    chunk: list[tuple[Any, ...]] = []
    checkpoints = 0
    for stored in events:
        event = stored.event
        if isinstance(event, CheckpointRecorded):
            study = studies[event.study_id]
            chunk.append(
                (
                    key(event.id),
                    key(event.study_id),
                    time(event.timestamp),
                    _metrics_json(event.metrics),
                    event.events_analyzed,
                    json.dumps(list(event.sessions_included), separators=(",", ":")),
                )
            )
            study[_LAST] = stored.event_id
            if len(chunk) == _CHUNK:
                run(checkpoints_sql, chunk)
                checkpoints += len(chunk)
                chunk = []
        elif isinstance(event, StudyCreated):
            studies[event.id] = [
                event.id,
                event.name,
                "pending",
                event.period_type.value,
                event.period_value,
                _config_json(event.config),
                stored.occurred_at,
                None,
                None,
                stored.event_id,
            ]
        else:
            study = studies[event.id]
            status = _TRANSITIONS.get((study[_STATUS], type(event)))
            if status is not None:
                study[_STATUS] = status
                if status == "running" and study[_STARTED] is None:
                    study[_STARTED] = stored.occurred_at
                elif status == "stopped":
                    study[_STOPPED] = stored.occurred_at
            study[_LAST] = stored.event_id
    if chunk:
        run(checkpoints_sql, chunk)
        checkpoints += len(chunk)
    rows = [
        (
            key(row[0]),
            *row[1:_CREATED],
            time(row[_CREATED]),
            None if row[_STARTED] is None else time(row[_STARTED]),
            None if row[_STOPPED] is None else time(row[_STOPPED]),
            key(row[_LAST]),
        )
        for row in studies.values()
    ]
    for start in range(0, len(rows), _CHUNK):
        run(studies_sql, rows[start : start + _CHUNK])
    return len(rows), checkpoints


_NAIVE_STATUS = {
    (StudyStatus(before), event_type): StudyStatus(after)
    for (before, event_type), after in _TRANSITIONS.items()
}


def naive_orm(engine: sa.Engine, events: Iterable[StoredEvalEvent]) -> None:
    """Project ``events`` the way a hand-written ORM loop does: flush per event."""
    with Session(engine) as session:
        for stored in events:
            event = stored.event
            if isinstance(event, StudyCreated):
                session.add(
                    StudyRow(
                        id=event.id,
                        name=event.name,
                        status=StudyStatus.PENDING,
                        period_type=event.period_type,
                        period_value=event.period_value,
                        config=event.config,
                        created_at=stored.occurred_at,
                        started_at=None,
                        stopped_at=None,
                        last_event_id=stored.event_id,
                    )
                )
            elif isinstance(event, CheckpointRecorded):
                study = session.get(StudyRow, event.study_id)
                if study is None:
                    raise LookupError(f"unknown study {event.study_id}")
                session.add(
                    CheckpointRow(
                        id=event.id,
                        study_id=event.study_id,
                        timestamp=event.timestamp,
                        metrics=event.metrics,
                        events_analyzed=event.events_analyzed,
                        sessions_included=event.sessions_included,
                    )
                )
                study.last_event_id = stored.event_id
            else:
                study = session.get(StudyRow, event.id)
                if study is None:
                    raise LookupError(f"unknown study {event.id}")
                status = _NAIVE_STATUS.get((study.status, type(event)))
                if status is not None:
                    study.status = status
                    if status is StudyStatus.RUNNING and study.started_at is None:
                        study.started_at = stored.occurred_at
                    elif status is StudyStatus.STOPPED:
                        study.stopped_at = stored.occurred_at
                study.last_event_id = stored.event_id
            session.flush()
        session.commit()


_JSON_COLUMNS = frozenset({"config", "metrics", "sessions_included"})


def table_digest(engine: sa.Engine) -> tuple[int, int, str]:
    """Return the row counts of studies and checkpoints and a digest of every value.

    JSON columns are compared as JSON values: the raw baseline's
    ``json.dumps`` writes small floats as ``1e-05`` where the wire format
    (serde_json's) writes ``0.00001``, and ``jsonb`` has a text form of its own.
    """
    digest = hashlib.sha256()
    counts = []
    # MySQL has no CAST AS TEXT; its driver's values (bytes, datetime, int, str) compare as well.
    mysql = engine.dialect.name in ("mysql", "mariadb")
    with engine.connect() as connection:
        for table, columns in (("studies", _STUDY_COLUMNS), ("checkpoints", _CHECKPOINT_COLUMNS)):
            names = [name.strip() for name in columns.split(",")]
            casts = ", ".join(f"`{name}`" if mysql else f'CAST("{name}" AS TEXT)' for name in names)
            rows = connection.exec_driver_sql(f"SELECT {casts} FROM {table} ORDER BY id").all()
            counts.append(len(rows))
            is_json = [name in _JSON_COLUMNS for name in names]
            for row in rows:
                values = [
                    json.loads(value) if json_column else value
                    for value, json_column in zip(row, is_json, strict=True)
                ]
                digest.update(repr(values).encode())
    return counts[0], counts[1], digest.hexdigest()[:12]
