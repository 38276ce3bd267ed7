"""``evals-orm``: migrations, ingest, rebuild, queries and a demo from the command line.

Exit status: 0 on success, 1 on a data error, 2 on a usage error, 130 when
interrupted. ``follow`` and ``ingest`` take SIGINT and SIGTERM as a request to
stop: they finish the batch in hand and exit with their usual status. Every
error is one sentence on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import IO, Any, NoReturn
from uuid import UUID

import attrs
import sqlalchemy as sa

from evals_orm import _demo, _render, sync
from evals_orm._errors import database_file, translate
from evals_orm._follow import Lag
from evals_orm._ingest import MAX_LINE_BYTES, IngestReport, ingest, paced_lines
from evals_orm.converters import dumps, structure, unstructure
from evals_orm.domain import StudyId, StudyStatus
from evals_orm.engine import create_engine
from evals_orm.errors import ConfigurationError, DatabaseError, EvalsError, InvalidEventError
from evals_orm.eventlog import SqlEventLog
from evals_orm.projection import SqlEvalProjection
from evals_orm.storage import SqlEvalStorage

__all__ = ["main"]

PROG = "evals-orm"
URL_ENV = "EVALS_ORM_DATABASE_URL"
TOKEN_ENV = "EVALS_ORM_AUTH_TOKEN"
SYNC_URL_ENV = "EVALS_ORM_SYNC_URL"
KEY_ENV = "EVALS_ORM_ENCRYPTION_KEY"
DEFAULT_URL = "sqlite+libsql:///evals.db"

EXIT_OK = 0
EXIT_DATA = 1
EXIT_USAGE = 2
EXIT_BROKEN_PIPE = 141
EXIT_INTERRUPTED = 130

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


# --- the context every command runs in ----------------------------------------


@attrs.define
class _Context:
    url: str
    auth_token: str | None = attrs.field(repr=False)
    json: bool
    progress: _render.Progress
    sync_url: str | None = None
    encryption_key: str | None = attrs.field(default=None, repr=False)
    _engine: sa.Engine | None = None

    @property
    def engine(self) -> sa.Engine:
        if self._engine is None:
            self._engine = create_engine(
                self.url,
                auth_token=self.auth_token,
                sync_url=self.sync_url,
                encryption_key=self.encryption_key,
            )
        return self._engine

    def existing_engine(self) -> sa.Engine:
        """Return the engine of a database that exists; never create a database file."""
        path = database_file(self.engine)
        if path is not None and not path.exists():
            raise DataError(
                f"there is no database at {path}; run `{PROG} db upgrade` to create one"
            )
        return self.engine

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
    ctx.existing_engine()
    return _report_revision(ctx, "the database is at revision")


def _report_revision(ctx: _Context, sentence: str) -> int:
    from evals_orm import migrations  # noqa: PLC0415 - it imports Alembic, slow to load

    revision = migrations.current(ctx.engine)
    if ctx.json:
        _render.print_json({"revision": revision})
    elif revision is None:
        print(f"{sentence} base (no evals_orm tables; run `{PROG} db upgrade`)")
    else:
        print(f"{sentence} {revision}")
    return EXIT_OK


# --- ingest --------------------------------------------------------------------


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


def _ingest(
    ctx: _Context,
    inputs: Iterable[tuple[str, IO[bytes], int | None]],
    max_line_bytes: int = MAX_LINE_BYTES,
    stop: threading.Event | None = None,
) -> IngestReport:
    """Ingest every input; once ``stop`` is set, finish the open batch and skip the rest."""
    log = SqlEventLog(ctx.engine)
    projection = SqlEvalProjection(ctx.engine)
    report = IngestReport()
    for name, stream, size in inputs:
        if stop is not None and stop.is_set():
            break
        lines: Iterable[bytes | None] = stream
        if stream is sys.stdin.buffer:
            # A pipe may never end: commit what arrived every FLUSH_AFTER_S.
            lines = paced_lines(
                stream,
                stop=None if stop is None else stop.is_set,
                max_line_bytes=max_line_bytes,
            )
        elif stop is not None:
            lines = _until(stream, stop, max_line_bytes)
        report += ingest(
            lines,
            log,
            projection,
            source=name,
            on_invalid=ctx.progress.print_above,
            on_line=_show_ingest(ctx.progress, name, stream, size, report.read),
            max_line_bytes=max_line_bytes,
        )
    ctx.progress.clear()
    return report


def _until(stream: IO[bytes], stop: threading.Event, limit: int) -> Iterator[bytes]:
    """Yield the lines of ``stream`` until ``stop`` is set.

    Of a line longer than ``limit`` only its first ``limit`` + 1 bytes are
    read and yielded (``ingest`` reports it as too long); the rest is skipped.
    """
    while not stop.is_set() and (line := stream.readline(limit + 1)):
        if len(line) > limit and not line.endswith(b"\n"):
            rest = line
            while rest and not rest.endswith(b"\n"):
                if stop.is_set():
                    return
                rest = stream.readline(1 << 16)
        yield line


def _show_ingest(
    progress: _render.Progress, name: str, stream: IO[bytes], size: int | None, before: int
) -> Callable[[int], None]:
    """Return the ``on_line`` of ``ingest`` that shows the progress through ``stream``."""

    def show(read: int) -> None:
        if progress.enabled:
            done = f"{before + read} events read"
            if size:
                done = f"{_render.bar(stream.tell(), size)} {done}"
            progress.update(f"ingesting {name} {done}")

    return show


def _cmd_ingest(args: argparse.Namespace, ctx: _Context) -> int:
    inputs = _open_inputs(args.files)
    stop = threading.Event()
    try:
        ctx.existing_engine()
        with _stopped_by_signals(stop):
            report = _ingest(ctx, inputs, args.max_line_bytes, stop)
    finally:
        _close_inputs(inputs)
    bad = len(report.invalid)
    if ctx.json:
        _render.print_json(
            {
                "read": report.read,
                "new": report.new,
                "already_logged": report.already_logged,
                "bad": bad,
                "invalid_lines": [attrs.asdict(line) for line in report.invalid],
            }
        )
    else:
        print(
            f"{report.read} events read, {report.new} new, "
            f"{report.already_logged} already logged, {bad} bad"
        )
    return EXIT_DATA if bad else EXIT_OK


@contextmanager
def _stopped_by_signals(stop: threading.Event) -> Iterator[None]:
    """Let SIGINT and SIGTERM set ``stop`` (the work in hand is finished) instead of killing."""

    def handle(_signum: int, _frame: object) -> None:
        stop.set()

    previous = {number: signal.signal(number, handle) for number in _STOP_SIGNALS}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


# --- follow ----------------------------------------------------------------------


class _FollowReport:
    """Shows a follower's progress and lag: a live line on a terminal, else lines now and then.

    A line is written when the state changed, at most every ``_EVERY_S``, so
    an idle follower is quiet and a busy one does not flood its log.
    """

    _EVERY_S = 1.0

    def __init__(self, ctx: _Context) -> None:
        self.ctx = ctx
        self.last: Lag | None = None
        self._shown: tuple[int, int] | None = None
        self._shown_at = 0.0

    def progress(self, lag: Lag) -> None:
        self.last = lag
        if self.ctx.progress.enabled and not self.ctx.json:
            self.ctx.progress.update(f"following: {self._text(lag)}")
            return
        now = time.monotonic()
        if self._shown == (lag.applied, lag.behind) or now - self._shown_at < self._EVERY_S:
            return
        self._shown, self._shown_at = (lag.applied, lag.behind), now
        self._write(lag)

    def error(self, error: DatabaseError) -> None:
        """Report one incident of a lost database (``follow`` retries it)."""
        self.ctx.progress.print_above(f"{PROG}: {error}; retrying with backoff")
        if self.ctx.json:
            _print_json_line({"error": str(error), "retrying": True})

    def done(self, applied: int) -> None:
        self.ctx.progress.clear()
        lag = (
            Lag(applied, 0, None) if self.last is None else attrs.evolve(self.last, applied=applied)
        )
        if self.ctx.json:
            _print_json_line({**self._json(lag), "stopped": True})
        else:
            print(f"stopped: {self._text(lag)}")

    def _write(self, lag: Lag) -> None:
        if self.ctx.json:
            _print_json_line(self._json(lag))
        else:
            print(f"following: {self._text(lag)}", flush=True)

    @staticmethod
    def _age(lag: Lag) -> float | None:
        if lag.newest_applied_at is None:
            return None
        return max((datetime.now(timezone.utc) - lag.newest_applied_at).total_seconds(), 0.0)

    def _json(self, lag: Lag) -> dict[str, Any]:
        age = self._age(lag)
        return {
            "applied": lag.applied,
            "behind": lag.behind,
            "newest_applied_at": None
            if lag.newest_applied_at is None
            else unstructure(lag.newest_applied_at),
            "newest_applied_age_s": None if age is None else round(age, 3),
        }

    def _text(self, lag: Lag) -> str:
        age = self._age(lag)
        newest = (
            "no event projected yet" if age is None else f"newest applied event {age:.1f} s old"
        )
        return f"{lag.applied} applied, {lag.behind} behind, {newest}"


def _print_json_line(value: Any) -> None:
    print(json.dumps(value, ensure_ascii=False), flush=True)


def _cmd_follow(args: argparse.Namespace, ctx: _Context) -> int:
    log = SqlEventLog(ctx.engine)
    projection = SqlEvalProjection(ctx.engine)
    report = _FollowReport(ctx)
    if args.once:
        applied = projection.catch_up(log)
        report.last = projection.lag(log)
        report.done(applied)
        return EXIT_OK
    stop = threading.Event()
    with _stopped_by_signals(stop):
        applied = projection.follow(
            log,
            poll_interval=args.poll_interval,
            stop=stop,
            on_progress=report.progress,
            on_error=report.error,
        )
    report.done(applied)
    return EXIT_OK


# --- rebuild -------------------------------------------------------------------


def _cmd_rebuild(_args: argparse.Namespace, ctx: _Context) -> int:
    log = SqlEventLog(ctx.existing_engine())
    total = log.count()

    def show(done: int) -> None:
        ctx.progress.update(f"rebuilding {_render.bar(done, total)} {done}/{total} events")

    count = SqlEvalProjection(ctx.engine).rebuild(log, on_progress=show)
    ctx.progress.clear()
    if ctx.json:
        _render.print_json({"events": count})
    else:
        print(f"rebuilt the projection from {count} events")
    return EXIT_OK


# --- studies -------------------------------------------------------------------


def _cmd_studies(args: argparse.Namespace, ctx: _Context) -> int:
    storage = SqlEvalStorage(ctx.existing_engine())
    if args.status is None:
        studies = storage.list_studies()
    else:
        studies = storage.list_studies_by_status(StudyStatus(args.status))
    _render.print_studies(studies, storage.checkpoint_counts(), as_json=ctx.json)
    return EXIT_OK


# --- checkpoints ----------------------------------------------------------------


def _cmd_checkpoints(args: argparse.Namespace, ctx: _Context) -> int:
    start: datetime = args.start or _EARLIEST
    end: datetime = args.end or _LATEST
    if start > end:
        raise UsageError("--from must not be later than --to")
    storage = SqlEvalStorage(ctx.existing_engine())
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
    _render.print_checkpoints(checkpoints, as_json=ctx.json)
    return EXIT_OK


# --- demo ------------------------------------------------------------------------


def _cmd_demo(_args: argparse.Namespace, ctx: _Context) -> int:
    _migrate(ctx, "upgrade", "head")
    events = _demo.sample_events()
    text = "".join(f"{dumps(stored)}\n" for stored in events)
    report = _ingest(ctx, [("<demo>", io.BytesIO(text.encode()), len(text))])
    storage = SqlEvalStorage(ctx.engine)
    studies = storage.list_studies()
    counts = storage.checkpoint_counts()
    if ctx.json:
        _render.print_json(
            {
                "read": report.read,
                "new": report.new,
                "studies": [
                    _render.study_json(study, counts.get(study.id, 0)) for study in studies
                ],
            }
        )
        return EXIT_OK
    where = ctx.engine.url.render_as_string(hide_password=True)
    print(f"demo database {where}: {report.read} sample events, {report.new} new\n")
    _render.print_studies(studies, counts)
    featured = next((study for study in studies if study.name == _demo.FEATURED_STUDY), None)
    if featured is not None:
        checkpoints = storage.get_checkpoints(featured.id)
        if checkpoints:
            print()
            _render.print_trends(featured, checkpoints)
    print(f"\nnext: `{PROG} checkpoints <id>` shows a study's checkpoints")
    return EXIT_OK


# --- the parser --------------------------------------------------------------------


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


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


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
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
        "--sync-url",
        default=argparse.SUPPRESS,
        metavar="URL",
        help=f"make the --url libSQL file an embedded replica of this primary "
        f"(default: ${SYNC_URL_ENV})",
    )
    common.add_argument(
        "--encryption-key",
        default=argparse.SUPPRESS,
        metavar="KEY",
        help=f"key of an encrypted libSQL file (default: ${KEY_ENV}); prefer the "
        "variable: a key on the command line is visible in the process list",
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
    ingest.add_argument(
        "--max-line-bytes",
        type=_positive,
        default=MAX_LINE_BYTES,
        metavar="N",
        help=f"longer lines are bad lines (default: {MAX_LINE_BYTES})",
    )

    command(commands, "rebuild", _cmd_rebuild, "rebuild the projection from the log")

    follow = command(
        commands,
        "follow",
        _cmd_follow,
        "keep the projection caught up with the log until SIGINT or SIGTERM",
    )
    follow.add_argument("--once", action="store_true", help="catch up once and exit")
    follow.add_argument(
        "--poll-interval",
        type=_seconds,
        metavar="SECONDS",
        help="longest wait between two looks at the log "
        "(default: 0.1; 0.25 on remote libSQL; 5 on PostgreSQL, which is woken by NOTIFY)",
    )

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
    command(commands, "sync", _cmd_sync, "pull the primary's changes into an embedded replica")
    return parser


# --- sync ----------------------------------------------------------------------------


def _cmd_sync(_args: argparse.Namespace, ctx: _Context) -> int:
    if ctx.sync_url is None:
        raise UsageError(f"sync needs the primary's URL: pass --sync-url or set ${SYNC_URL_ENV}")
    # The driver's report (None from libsql-experimental) as text JSON can hold.
    reported = sync(ctx.engine)
    report = None if reported is None else str(reported)
    if ctx.json:
        _render.print_json({"synced": True, "replica": ctx.url, "driver_report": report})
    else:
        print(f"synced {ctx.url} from its primary (the driver reported {report or 'nothing'})")
    return EXIT_OK


# --- main ----------------------------------------------------------------------------


def _database_message(error: sa.exc.SQLAlchemyError, engine: sa.Engine | None) -> str:
    if isinstance(error, sa.exc.DBAPIError):
        return str(translate(error, engine))  # the same wording as the services' errors
    return str(error).strip().splitlines()[0]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    if isinstance(sys.stdout, io.TextIOWrapper):
        # A terminal that cannot show a sparkline or a name gets "?", not a traceback.
        sys.stdout.reconfigure(errors="replace")
    # Errors reach the user as one sentence: log records of the libraries
    # (psycopg ending a COPY on a dead server, a pool failing to reset a dead
    # connection) must not reach Python's last-resort handler on stderr.
    logging.getLogger().addHandler(logging.NullHandler())
    progress = _render.Progress(sys.stderr)
    ctx: _Context | None = None
    code, message = EXIT_OK, ""
    try:
        args = _parser().parse_args(argv)
        ctx = _Context(
            url=getattr(args, "url", None) or os.environ.get(URL_ENV) or DEFAULT_URL,
            auth_token=getattr(args, "auth_token", None) or os.environ.get(TOKEN_ENV) or None,
            json=getattr(args, "json", False),
            progress=progress,
            sync_url=getattr(args, "sync_url", None) or os.environ.get(SYNC_URL_ENV) or None,
            encryption_key=(
                getattr(args, "encryption_key", None) or os.environ.get(KEY_ENV) or None
            ),
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
        code, message = EXIT_DATA, _database_message(error, None if ctx is None else ctx._engine)
    finally:
        progress.clear()
        if ctx is not None:
            ctx.close()
    if message:
        print(f"{PROG}: {message}", file=sys.stderr)
    return code
