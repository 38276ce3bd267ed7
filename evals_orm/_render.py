"""How the command line shows things: tables, sparklines, progress, JSON."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import IO, Any

from evals_orm.converters import unstructure
from evals_orm.domain import Checkpoint, Study, StudyId

__all__ = [
    "Progress",
    "bar",
    "print_checkpoints",
    "print_json",
    "print_studies",
    "print_trends",
    "study_json",
]

_SPARKS = "▁▂▃▄▅▆▇█"


class Progress:
    """A one-line progress report on a terminal's stderr; silent when stderr is piped."""

    _INTERVAL_S = 0.1

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self.enabled = stream.isatty()
        self._shown = False
        self._last = 0.0

    def update(self, text: str) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last < self._INTERVAL_S:
            return
        self._last = now
        self.stream.write(f"\r\x1b[K{text}")
        self.stream.flush()
        self._shown = True

    def print_above(self, line: object) -> None:
        """Print ``line`` to the stream, above the progress line."""
        self.clear()
        print(line, file=self.stream)

    def clear(self) -> None:
        if self._shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._shown = False


def bar(done: int, total: int, width: int = 24) -> str:
    """Return a progress bar with a percentage."""
    filled = width * done // total if total else width
    return f"[{'#' * filled}{'.' * (width - filled)}] {100 * done // max(total, 1):3d}%"


def _time(value: datetime | None) -> str | None:
    """Write a datetime as RFC 3339 UTC with ``Z``, as the wire format does."""
    return None if value is None else str(unstructure(value))


def _short_time(value: datetime | None, spec: str = "%Y-%m-%d %H:%M") -> str:
    return "-" if value is None else value.strftime(spec)


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: set[int]) -> str:
    """Align ``rows`` under ``headers``; the columns in ``right`` are right-aligned."""
    widths = [max(len(row[i]) for row in (headers, *rows)) for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            cell.rjust(width) if i in right else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    return "\n".join(
        [line(headers), line(["-" * width for width in widths])] + [line(row) for row in rows]
    )


def _sparkline(values: Sequence[float]) -> str:
    low, high = min(values), max(values)
    if high == low:
        return _SPARKS[len(_SPARKS) // 2] * len(values)
    scale = (len(_SPARKS) - 1) / (high - low)
    return "".join(_SPARKS[round((value - low) * scale)] for value in values)


def print_json(value: Any) -> None:
    """Print ``value`` as indented JSON."""
    print(json.dumps(value, indent=2, ensure_ascii=False))


def _period(study: Study) -> str:
    if study.period_value is None:
        return study.period_type.value
    return f"{study.period_type.value} ({study.period_value})"


def study_json(study: Study, checkpoints: int) -> dict[str, Any]:
    """Return the JSON object of a study with its checkpoint count."""
    return {
        "id": str(study.id),
        "name": study.name,
        "status": study.status.value,
        "period_type": study.period_type.value,
        "period_value": study.period_value,
        "config": unstructure(study.config),
        "created_at": _time(study.created_at),
        "started_at": _time(study.started_at),
        "stopped_at": _time(study.stopped_at),
        "checkpoints": checkpoints,
    }


def print_studies(
    studies: Sequence[Study], counts: Mapping[StudyId, int], *, as_json: bool = False
) -> None:
    """Print ``studies`` with their checkpoint ``counts``, as a table or JSON."""
    if as_json:
        print_json([study_json(study, counts.get(study.id, 0)) for study in studies])
        return
    if not studies:
        print("no studies")
        return
    headers = (
        "id",
        "name",
        "status",
        "period",
        "created (UTC)",
        "started (UTC)",
        "stopped (UTC)",
        "checkpoints",
    )
    rows = [
        (
            str(study.id),
            study.name,
            study.status.value,
            _period(study),
            _short_time(study.created_at),
            _short_time(study.started_at),
            _short_time(study.stopped_at),
            str(counts.get(study.id, 0)),
        )
        for study in studies
    ]
    print(_table(headers, rows, right={7}))


def _percent(value: float) -> str:
    return f"{100 * value:.1f}%"


def print_checkpoints(checkpoints: Sequence[Checkpoint], *, as_json: bool = False) -> None:
    """Print ``checkpoints`` as a table or JSON."""
    if as_json:
        print_json([unstructure(checkpoint) for checkpoint in checkpoints])
        return
    if not checkpoints:
        print("no checkpoints")
        return
    headers = (
        "timestamp (UTC)",
        "events",
        "sessions",
        "success",
        "first try",
        "tool ok",
        "tasks",
        "tokens",
        "cost",
    )
    rows = [
        (
            _short_time(c.timestamp, "%Y-%m-%d %H:%M:%S"),
            str(c.events_analyzed),
            str(len(c.sessions_included)),
            _percent(c.metrics.session_success_rate),
            _percent(c.metrics.first_attempt_success_rate),
            _percent(c.metrics.tool_success_rate),
            str(c.metrics.tasks_completed),
            str(c.metrics.total_tokens),
            f"{c.metrics.total_cost:.2f}",
        )
        for c in checkpoints
    ]
    print(_table(headers, rows, right=set(range(1, len(headers)))))


_TRENDS: tuple[tuple[str, Callable[[Checkpoint], float], Callable[[float], str]], ...] = (
    ("session success rate", lambda c: c.metrics.session_success_rate, _percent),
    ("tool success rate", lambda c: c.metrics.tool_success_rate, _percent),
    ("total cost", lambda c: c.metrics.total_cost, lambda v: f"${v:.2f}"),
    (
        "cost per successful task",
        lambda c: c.metrics.cost_per_successful_task,
        lambda v: f"${v:.3f}",
    ),
)


def print_trends(study: Study, checkpoints: Sequence[Checkpoint]) -> None:
    """Print sparklines of a study's main metrics over its checkpoints."""
    first, last = checkpoints[0].timestamp, checkpoints[-1].timestamp
    print(
        f"{study.name} ({study.status.value}): {len(checkpoints)} checkpoints, "
        f"{first:%Y-%m-%d} to {last:%Y-%m-%d}"
    )
    width = max(len(label) for label, _, _ in _TRENDS)
    for label, metric, show in _TRENDS:
        values = [metric(checkpoint) for checkpoint in checkpoints]
        print(f"  {label:<{width}}  {_sparkline(values)}  {show(values[0])} -> {show(values[-1])}")
