"""``evals-orm``: migrations, ingest, rebuild, queries and a demo from the command line.

Exit status: 0 on success, 1 on a data error, 2 on a usage error, 130 when
interrupted. Every error is one sentence on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import datetime, timezone
from typing import IO, Any, NoReturn
from uuid import UUID

import attrs
import sqlalchemy as sa

from evals_orm import _db, _demo
from evals_orm.converters import dumps, loads, structure, unstructure
from evals_orm.domain import Checkpoint, Study, StudyId, StudyStatus
from evals_orm.engine import create_engine
from evals_orm.errors import (
    ConfigurationError,
    EvalsError,
    EventConflictError,
    EventOrderError,
    InvalidEventError,
    ProjectionError,
)
from evals_orm.eventlog import InvalidLine, SqlEventLog
from evals_orm.events import StoredEvalEvent
from evals_orm.models import CheckpointRow
from evals_orm.projection import SqlEvalProjection
from evals_orm.storage import SqlEvalStorage

__all__ = ["main"]

PROG = "evals-orm"
URL_ENV = "EVALS_ORM_DATABASE_URL"
TOKEN_ENV = "EVALS_ORM_AUTH_TOKEN"
DEFAULT_URL = "sqlite+libsql:///evals.db"

EXIT_OK = 0
EXIT_DATA = 1
EXIT_USAGE = 2
EXIT_BROKEN_PIPE = 141
EXIT_INTERRUPTED = 130

INGEST_BATCH = 500
_REJECTED = (ProjectionError, EventConflictError, EventOrderError)
_SPARKS = "▁▂▃▄▅▆▇█"
_EARLIEST = datetime.min.replace(tzinfo=timezone.utc)
_LATEST = datetime.max.replace(tzinfo=timezone.utc)


class UsageError(Exception):
    """The command line is wrong in a way only found after parsing (exit 2)."""


class DataError(Exception):
    """The data does not allow the command (exit 1)."""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line, without the usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see `{self.prog} --help`)\n")


# --- progress and output -----------------------------------------------------


class _Progress:
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

    def clear(self) -> None:
        if self._shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._shown = False


def _bar(done: int, total: int, width: int = 24) -> str:
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


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, ensure_ascii=False))


# --- the context every command runs in ----------------------------------------


@attrs.define
class _Context:
    url: str
    auth_token: str | None
    json: bool
    progress: _Progress
    _engine: sa.Engine | None = None

    @property
    def engine(self) -> sa.Engine:
        if self._engine is None:
            self._engine = create_engine(self.url, auth_token=self.auth_token)
        return self._engine

    def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()


# --- db ----------------------------------------------------------------------


def _migrate(ctx: _Context, direction: str, revision: str, **options: Any) -> None:
    """Run ``migrations.upgrade``/``downgrade``; an unknown revision is a usage error."""
    # Alembic is imported only by the commands that migrate: it is slow to load.
    from alembic.util import CommandError  # noqa: PLC0415 - see above

    from evals_orm import migrations  # noqa: PLC0415 - it imports Alembic

    try:
        getattr(migrations, direction)(ctx.engine, revision, **options)
    except CommandError as error:
        raise UsageError(f"cannot {direction} to {revision!r}: {error}") from None


def _cmd_db_upgrade(args: argparse.Namespace, ctx: _Context) -> int:
    if args.sql:
        # Only the SQL on stdout, so it can be piped into psql or sqlite3.
        _migrate(ctx, "upgrade", args.revision, sql=True)
        return EXIT_OK
    _migrate(ctx, "upgrade", args.revision)
    return _report_revision(ctx, "upgraded the database to revision")


def _cmd_db_downgrade(args: argparse.Namespace, ctx: _Context) -> int:
    _migrate(ctx, "downgrade", args.revision)
    return _report_revision(ctx, "downgraded the database to revision")


def _cmd_db_current(_args: argparse.Namespace, ctx: _Context) -> int:
    return _report_revision(ctx, "the database is at revision")


def _report_revision(ctx: _Context, sentence: str) -> int:
    from evals_orm import migrations  # noqa: PLC0415 - it imports Alembic, slow to load

    revision = migrations.current(ctx.engine)
    if ctx.json:
        _print_json({"revision": revision})
    elif revision is None:
        print(f"{sentence} base (no evals_orm tables; run `{PROG} db upgrade`)")
    else:
        print(f"{sentence} {revision}")
    return EXIT_OK


# --- ingest --------------------------------------------------------------------


@attrs.define
class _Ingest:
    """Appends good lines to the log with inline projection, in batches; counts the rest."""

    log: SqlEventLog
    projection: SqlEvalProjection
    progress: _Progress
    read: int = 0
    new: int = 0
    invalid: list[InvalidLine] = attrs.field(factory=list)
    _batch: list[tuple[InvalidLine, StoredEvalEvent]] = attrs.field(factory=list)
    _pending_invalid: list[InvalidLine] = attrs.field(factory=list)

    def feed(self, name: str, stream: IO[bytes], size: int | None) -> None:
        """Ingest every line of ``stream`` (called ``name`` in reports)."""
        for number, line in enumerate(stream, start=1):
            if not line.strip():
                continue
            self.read += 1
            try:
                stored = loads(line)
            except InvalidEventError as error:
                self._pending_invalid.append(InvalidLine(name, number, str(error)))
            else:
                self._batch.append((InvalidLine(name, number, ""), stored))
                if len(self._batch) >= INGEST_BATCH:
                    self.flush()
            if self.progress.enabled:
                done = f"{self.read} events read"
                if size:
                    done = f"{_bar(stream.tell(), size)} {done}"
                self.progress.update(f"ingesting {name} {done}")
        self.flush()

    def flush(self) -> None:
        """Append the pending batch; isolate the events the log or projection rejects."""
        batch, self._batch = self._batch, []
        if batch:
            try:
                self.new += self.log.append(
                    [stored for _, stored in batch], projection=self.projection
                )
            except _REJECTED:
                # Nothing of the batch was written: retry event by event, so
                # only the culprits are left out.
                for where, stored in batch:
                    try:
                        self.new += self.log.append(stored, projection=self.projection)
                    except _REJECTED as error:
                        self._pending_invalid.append(attrs.evolve(where, reason=str(error)))
        if self._pending_invalid:
            self.progress.clear()
            for bad in sorted(self._pending_invalid, key=lambda bad: bad.line):
                print(bad, file=sys.stderr)
            self.invalid.extend(self._pending_invalid)
            self._pending_invalid = []


def _open_inputs(names: Sequence[str]) -> list[tuple[str, IO[bytes], int | None]]:
    """Open every input before writing anything, so a missing file is a usage error."""
    opened: list[tuple[str, IO[bytes], int | None]] = []
    try:
        for name in names:
            if name == "-":
                opened.append(("<stdin>", sys.stdin.buffer, None))
                continue
            try:
                stream = open(name, "rb")  # noqa: SIM115 - closed by the caller
            except OSError as error:
                raise UsageError(f"cannot read {name}: {error.strerror or error}") from None
            opened.append((name, stream, os.fstat(stream.fileno()).st_size or None))
    except BaseException:
        _close_inputs(opened)
        raise
    return opened


def _close_inputs(opened: Iterable[tuple[str, IO[bytes], int | None]]) -> None:
    for _, stream, _ in opened:
        if stream is not sys.stdin.buffer:
            stream.close()


def _ingest(ctx: _Context, inputs: Iterable[tuple[str, IO[bytes], int | None]]) -> _Ingest:
    log = SqlEventLog(ctx.engine)
    projection = SqlEvalProjection(ctx.engine)
    # Inline projection only keeps up if the projection already has the log.
    projection.catch_up(log)
    ingest = _Ingest(log, projection, ctx.progress)
    for name, stream, size in inputs:
        ingest.feed(name, stream, size)
    ctx.progress.clear()
    return ingest


def _cmd_ingest(args: argparse.Namespace, ctx: _Context) -> int:
    inputs = _open_inputs(args.files)
    try:
        ingest = _ingest(ctx, inputs)
    finally:
        _close_inputs(inputs)
    bad = len(ingest.invalid)
    known = ingest.read - ingest.new - bad
    if ctx.json:
        _print_json(
            {
                "read": ingest.read,
                "new": ingest.new,
                "already_logged": known,
                "bad": bad,
                "invalid_lines": [attrs.asdict(line) for line in ingest.invalid],
            }
        )
    else:
        print(f"{ingest.read} events read, {ingest.new} new, {known} already logged, {bad} bad")
    return EXIT_DATA if bad else EXIT_OK


# --- rebuild -------------------------------------------------------------------


def _counted(
    events: Iterable[StoredEvalEvent], total: int, progress: _Progress
) -> Iterator[StoredEvalEvent]:
    for done, stored in enumerate(events, start=1):
        yield stored
        if progress.enabled:
            progress.update(f"rebuilding {_bar(done, total)} {done}/{total} events")


def _cmd_rebuild(_args: argparse.Namespace, ctx: _Context) -> int:
    log = SqlEventLog(ctx.engine)
    total = log.count()
    count = SqlEvalProjection(ctx.engine).rebuild(_counted(log.read(), total, ctx.progress))
    ctx.progress.clear()
    if ctx.json:
        _print_json({"events": count})
    else:
        print(f"rebuilt the projection from {count} events")
    return EXIT_OK


# --- studies -------------------------------------------------------------------


def _checkpoint_counts(engine: sa.Engine) -> dict[UUID, int]:
    statement = sa.select(CheckpointRow.study_id, sa.func.count()).group_by(CheckpointRow.study_id)
    with _db.read(engine) as connection:
        return dict(connection.execute(statement).tuples().all())


def _period(study: Study) -> str:
    if study.period_value is None:
        return study.period_type.value
    return f"{study.period_type.value} ({study.period_value})"


def _study_json(study: Study, checkpoints: int) -> dict[str, Any]:
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


def _print_studies(ctx: _Context, studies: Sequence[Study]) -> None:
    counts = _checkpoint_counts(ctx.engine)
    if ctx.json:
        _print_json([_study_json(study, counts.get(study.id, 0)) for study in studies])
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


def _cmd_studies(args: argparse.Namespace, ctx: _Context) -> int:
    storage = SqlEvalStorage(ctx.engine)
    if args.status is None:
        studies = storage.list_studies()
    else:
        studies = storage.list_studies_by_status(StudyStatus(args.status))
    _print_studies(ctx, studies)
    return EXIT_OK


# --- checkpoints ----------------------------------------------------------------


def _percent(value: float) -> str:
    return f"{100 * value:.1f}%"


def _print_checkpoints(ctx: _Context, checkpoints: Sequence[Checkpoint]) -> None:
    if ctx.json:
        _print_json([unstructure(checkpoint) for checkpoint in checkpoints])
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


def _cmd_checkpoints(args: argparse.Namespace, ctx: _Context) -> int:
    start: datetime = args.start or _EARLIEST
    end: datetime = args.end or _LATEST
    if start > end:
        raise UsageError("--from must not be later than --to")
    storage = SqlEvalStorage(ctx.engine)
    study_id = StudyId(args.study_id)
    if storage.get_study(study_id) is None:
        raise DataError(f"no study {study_id}")
    if args.start is None and args.end is None:
        if args.latest:
            latest = storage.get_latest_checkpoint(study_id)
            checkpoints = [] if latest is None else [latest]
        else:
            checkpoints = storage.get_checkpoints(study_id)
    else:
        checkpoints = storage.get_checkpoints_in_range(study_id, start, end)
        if args.latest:
            checkpoints = checkpoints[-1:]
    _print_checkpoints(ctx, checkpoints)
    return EXIT_OK


# --- demo ------------------------------------------------------------------------


def _cmd_demo(_args: argparse.Namespace, ctx: _Context) -> int:
    _migrate(ctx, "upgrade", "head")
    events = _demo.sample_events()
    text = "".join(f"{dumps(stored)}\n" for stored in events)
    ingest = _ingest_text(ctx, text)
    storage = SqlEvalStorage(ctx.engine)
    studies = storage.list_studies()
    if ctx.json:
        counts = _checkpoint_counts(ctx.engine)
        _print_json(
            {
                "read": ingest.read,
                "new": ingest.new,
                "studies": [_study_json(study, counts.get(study.id, 0)) for study in studies],
            }
        )
        return EXIT_OK
    where = ctx.engine.url.render_as_string(hide_password=True)
    print(f"demo database {where}: {ingest.read} sample events, {ingest.new} new\n")
    _print_studies(ctx, studies)
    featured = next((study for study in studies if study.name == _demo.FEATURED_STUDY), None)
    if featured is not None:
        checkpoints = storage.get_checkpoints(featured.id)
        if checkpoints:
            print()
            _print_trends(featured, checkpoints)
    print(f"\nnext: `{PROG} checkpoints <id>` shows a study's checkpoints")
    return EXIT_OK


def _ingest_text(ctx: _Context, text: str) -> _Ingest:
    stream = io.BytesIO(text.encode())
    return _ingest(ctx, [("<demo>", stream, len(text))])


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


def _print_trends(study: Study, checkpoints: Sequence[Checkpoint]) -> None:
    first, last = checkpoints[0].timestamp, checkpoints[-1].timestamp
    print(
        f"{study.name} ({study.status.value}): {len(checkpoints)} checkpoints, "
        f"{first:%Y-%m-%d} to {last:%Y-%m-%d}"
    )
    width = max(len(label) for label, _, _ in _TRENDS)
    for label, metric, show in _TRENDS:
        values = [metric(checkpoint) for checkpoint in checkpoints]
        print(f"  {label:<{width}}  {_sparkline(values)}  {show(values[0])} -> {show(values[-1])}")


# --- the parser --------------------------------------------------------------------


def _study_id(text: str) -> UUID:
    try:
        return UUID(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a study id (a UUID)") from None


def _timestamp(text: str) -> datetime:
    try:
        value: datetime = structure(text, datetime)
    except InvalidEventError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an RFC 3339 time with an offset, such as 2025-03-01T00:00:00Z"
        ) from None
    return value


def _parser() -> _Parser:
    common = _Parser(add_help=False)
    # SUPPRESS keeps an option given before the subcommand from being reset
    # by the subcommand's default; the real defaults are applied in main().
    common.add_argument(
        "--url",
        default=argparse.SUPPRESS,
        help=f"database URL (default: ${URL_ENV}, else {DEFAULT_URL})",
    )
    common.add_argument(
        "--auth-token",
        default=argparse.SUPPRESS,
        metavar="TOKEN",
        help=f"auth token of a remote libSQL database (default: ${TOKEN_ENV})",
    )
    common.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="write JSON to stdout"
    )

    parser = _Parser(
        prog=PROG,
        description="Event-sourced storage for longitudinal evaluation studies.",
        parents=[common],
    )
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)

    def command(
        group: Any, name: str, handler: Callable[[argparse.Namespace, _Context], int], text: str
    ) -> _Parser:
        sub: _Parser = group.add_parser(name, help=text, description=text, parents=[common])
        sub.set_defaults(handler=handler)
        return sub

    db = commands.add_parser("db", help="manage the schema migrations", parents=[common])
    db_commands = db.add_subparsers(title="commands", metavar="COMMAND", required=True)
    upgrade = command(db_commands, "upgrade", _cmd_db_upgrade, "upgrade the schema")
    upgrade.add_argument("revision", nargs="?", default="head", metavar="REV")
    upgrade.add_argument(
        "--sql",
        action="store_true",
        help="print the SQL script for the URL's database, run nothing",
    )
    downgrade = command(db_commands, "downgrade", _cmd_db_downgrade, "downgrade the schema")
    downgrade.add_argument("revision", metavar="REV", help='target revision ("base": no tables)')
    command(db_commands, "current", _cmd_db_current, "show the schema's revision")

    ingest = command(
        commands, "ingest", _cmd_ingest, "append JSON Lines of events to the log and project them"
    )
    ingest.add_argument("files", nargs="+", metavar="FILE", help='JSON Lines file ("-": stdin)')

    command(commands, "rebuild", _cmd_rebuild, "rebuild the projection from the log")

    studies = command(commands, "studies", _cmd_studies, "list the studies")
    studies.add_argument(
        "--status", choices=[status.value for status in StudyStatus], help="only this status"
    )

    checkpoints = command(commands, "checkpoints", _cmd_checkpoints, "list a study's checkpoints")
    checkpoints.add_argument(
        "study_id", type=_study_id, metavar="STUDY_ID", help="the study's id (a UUID)"
    )
    checkpoints.add_argument(
        "--from",
        dest="start",
        type=_timestamp,
        metavar="T",
        help="from this RFC 3339 time, with an offset (inclusive)",
    )
    checkpoints.add_argument(
        "--to",
        dest="end",
        type=_timestamp,
        metavar="T",
        help="up to this RFC 3339 time, with an offset (exclusive)",
    )
    checkpoints.add_argument("--latest", action="store_true", help="only the newest checkpoint")

    command(commands, "demo", _cmd_demo, "load a sample stream and show it")
    return parser


# --- main ----------------------------------------------------------------------------


def _database_message(error: sa.exc.SQLAlchemyError) -> str:
    if isinstance(error, sa.exc.DBAPIError):
        return str(_db.translate(error))  # the same wording as the services' errors
    return str(error).strip().splitlines()[0]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    if isinstance(sys.stdout, io.TextIOWrapper):
        # A terminal that cannot show a sparkline or a name gets "?", not a traceback.
        sys.stdout.reconfigure(errors="replace")
    progress = _Progress(sys.stderr)
    ctx: _Context | None = None
    code, message = EXIT_OK, ""
    try:
        args = _parser().parse_args(argv)
        ctx = _Context(
            url=getattr(args, "url", None) or os.environ.get(URL_ENV) or DEFAULT_URL,
            auth_token=getattr(args, "auth_token", None) or os.environ.get(TOKEN_ENV) or None,
            json=getattr(args, "json", False),
            progress=progress,
        )
        code = args.handler(args, ctx)
        sys.stdout.flush()
    except KeyboardInterrupt:
        code = EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`| head`): stop quietly, and keep Python from
        # complaining while it flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = EXIT_BROKEN_PIPE
    except (UsageError, ConfigurationError) as error:
        code, message = EXIT_USAGE, str(error)
    except (DataError, EvalsError, OSError) as error:
        code, message = EXIT_DATA, str(error)
    except sa.exc.SQLAlchemyError as error:
        code, message = EXIT_DATA, _database_message(error)
    finally:
        progress.clear()
        if ctx is not None:
            ctx.close()
    if message:
        print(f"{PROG}: {message}", file=sys.stderr)
    return code
