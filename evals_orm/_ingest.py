"""Ingest JSON Lines of events: append to the log, project, and isolate the bad lines."""

from __future__ import annotations

import os
import select
import time
from collections.abc import Callable, Iterable, Iterator
from typing import IO

import attrs

from evals_orm.converters import loads
from evals_orm.errors import EventConflictError, EventOrderError, InvalidEventError, ProjectionError
from evals_orm.eventlog import InvalidLine, SqlEventLog
from evals_orm.events import StoredEvalEvent
from evals_orm.projection import SqlEvalProjection

__all__ = ["FLUSH_AFTER_S", "MAX_LINE_BYTES", "IngestReport", "ingest", "paced_lines"]

BATCH = 500
# Longer lines are bad lines, read without holding them whole: no event
# needs more (a checkpoint naming ten thousand sessions is under 1 MiB), and
# a remote libSQL server refuses a batch holding a value of tens of MiB.
MAX_LINE_BYTES = 4 * 1024 * 1024
_REJECTED = (ProjectionError, EventConflictError, EventOrderError, InvalidEventError)
# Bytes read at a time while skipping the rest of an over-long line.
_SKIP = 1 << 16
# ``paced_lines``: a line waits at most this long for its batch to be committed.
FLUSH_AFTER_S = 0.2
# How often ``paced_lines`` looks at its stop signal while the stream is quiet.
_STOP_CHECK_S = 0.1
_READ_SIZE = 1 << 16


class _TooLong:
    """Stands for a line longer than the limit, which is never held whole."""


_TOO_LONG = _TooLong()


@attrs.frozen
class IngestReport:
    """What ``ingest`` did: lines read, events new to the log, and the bad lines."""

    read: int = 0
    new: int = 0
    invalid: tuple[InvalidLine, ...] = ()

    @property
    def already_logged(self) -> int:
        """How many good lines were events the log already held."""
        return self.read - self.new - len(self.invalid)

    def __add__(self, other: IngestReport) -> IngestReport:
        return IngestReport(
            self.read + other.read, self.new + other.new, self.invalid + other.invalid
        )


def ingest(
    lines: Iterable[str | bytes | None] | IO[str] | IO[bytes],
    log: SqlEventLog,
    projection: SqlEvalProjection | None = None,
    *,
    source: str = "<stream>",
    on_invalid: Callable[[InvalidLine], None] | None = None,
    on_line: Callable[[int], None] | None = None,
    batch_size: int = BATCH,
    max_line_bytes: int = MAX_LINE_BYTES,
) -> IngestReport:
    """Append the ``StoredEvalEvent`` JSON lines to ``log`` (and project them); report.

    Blank lines are skipped. Good lines are appended in transactions of
    ``batch_size``, projected inline when ``projection`` is given. A line
    that is not a valid event, or that the log or the projection rejects,
    is left out - nothing of it is written - and reported as an
    ``InvalidLine`` (with ``source`` and its line number), to ``on_invalid``
    too, in line order, as each batch is done. So is a line longer than
    ``max_line_bytes`` (characters, for a text stream): read from a stream,
    it is skipped without being held whole. ``on_line`` gets the count of
    lines read so far after each line (for progress displays). A ``None``
    among the lines commits the open batch at once: ``paced_lines`` sends
    one when a line has waited long enough.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if max_line_bytes < 1:
        raise ValueError(f"max_line_bytes must be at least 1, got {max_line_bytes}")
    if projection is not None:
        # Inline projection only keeps up if the projection already has the log.
        projection.catch_up(log)
    read = new = 0
    invalid: list[InvalidLine] = []
    batch: list[tuple[int, StoredEvalEvent]] = []
    pending: list[InvalidLine] = []

    def flush() -> None:
        nonlocal new
        if batch:
            try:
                new += log.append([stored for _, stored in batch], projection=projection)
            except _REJECTED:
                # Nothing of the batch was written: retry event by event, so
                # only the culprits are left out.
                for number, stored in batch:
                    try:
                        new += log.append(stored, projection=projection)
                    except _REJECTED as error:
                        pending.append(InvalidLine(source, number, str(error)))
            batch.clear()
        pending.sort(key=lambda bad: bad.line)
        for bad in pending:
            if on_invalid is not None:
                on_invalid(bad)
        invalid.extend(pending)
        pending.clear()

    number = 0
    for line in _bounded_lines(lines, max_line_bytes):
        if line is None:
            flush()
            continue
        number += 1
        if not isinstance(line, _TooLong) and not line.strip():
            continue
        read += 1
        try:
            if isinstance(line, _TooLong):
                raise InvalidEventError(f"line longer than {max_line_bytes} bytes")
            stored = loads(line)
            log.validate(stored)
            batch.append((number, stored))
        except InvalidEventError as error:
            pending.append(InvalidLine(source, number, str(error)))
        if len(batch) >= batch_size:
            flush()
        if on_line is not None:
            on_line(read)
    flush()
    return IngestReport(read, new, tuple(invalid))


def _bounded_lines(
    lines: Iterable[str | bytes | None] | IO[str] | IO[bytes], limit: int
) -> Iterator[str | bytes | _TooLong | None]:
    """Yield the lines (and ``None``s), ``_TOO_LONG`` for each line longer than ``limit``.

    The newline is not counted. From a stream, at most ``limit`` + 1 bytes of
    a line are held: the rest of a longer one is read in small pieces and dropped.
    """
    if not hasattr(lines, "readline"):
        for line in lines:
            if line is None:
                yield None
            else:
                yield _TOO_LONG if len(line) - _ends_line(line) > limit else line
        return
    stream: IO[str] | IO[bytes] = lines  # type: ignore[assignment]
    while line := stream.readline(limit + 1):
        if len(line) <= limit or _ends_line(line):
            yield line
            continue
        while line and not _ends_line(line):
            line = stream.readline(_SKIP)
        yield _TOO_LONG


def _ends_line(line: str | bytes) -> bool:
    return line.endswith(b"\n" if isinstance(line, bytes) else "\n")  # type: ignore[arg-type]


def paced_lines(
    stream: IO[bytes],
    *,
    flush_after: float = FLUSH_AFTER_S,
    stop: Callable[[], bool] | None = None,
    max_line_bytes: int = MAX_LINE_BYTES,
) -> Iterator[bytes | None]:
    """Yield the lines of a stream as they arrive, and ``None`` to commit what waits.

    For ``ingest`` on a pipe that never ends (a stream consumer): a ``None``
    follows at most ``flush_after`` seconds after a line was yielded, so the
    line is committed then, even while the pipe stays open and quiet. The
    descriptor is read as bytes arrive (``select``), never waiting for a full
    buffer. Once ``stop()`` is true the lines already read are yielded and
    the iteration ends, leaving the rest of the stream unread. Of a line
    longer than ``max_line_bytes`` only its first ``max_line_bytes`` + 1
    bytes are held and yielded, without a newline, which ``ingest`` reports
    as too long.
    """
    fd = stream.fileno()
    pending = b""
    skipping = False  # inside a line too long to keep; ``pending`` holds its head
    deadline: float | None = None  # when the oldest line not yet committed must be
    while True:
        now = time.monotonic()
        if deadline is not None and now >= deadline:
            deadline = None
            yield None
        if stop is not None and stop():
            return
        timeout = None if deadline is None else deadline - now
        if stop is not None:
            timeout = _STOP_CHECK_S if timeout is None else min(timeout, _STOP_CHECK_S)
        if not select.select([fd], [], [], timeout)[0]:
            continue
        chunk = os.read(fd, _READ_SIZE)
        if not chunk:
            if pending:
                yield pending
            return
        if skipping:
            _, newline, chunk = chunk.partition(b"\n")
            if not newline:
                continue
            skipping = False
            yield pending
            pending = b""
        lines = (pending + chunk).split(b"\n")
        pending = lines.pop()
        if len(pending) > max_line_bytes:
            pending, skipping = pending[: max_line_bytes + 1], True
        if lines and deadline is None:
            deadline = time.monotonic() + flush_after
        for line in lines:
            yield line + b"\n"
