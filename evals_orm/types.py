"""Column types: the one place that knows how each backend stores a value.

SQLite and libSQL store everything as the seed schema's TEXT/INTEGER;
PostgreSQL uses its native ``uuid``, ``timestamptz``, ``jsonb`` and
``numeric``; MariaDB/MySQL ``BINARY(16)``, ``DATETIME(6)`` in UTC,
``LONGTEXT`` and unsigned integers. The Python side of every type is
identical on all backends.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any, Generic, TypeVar
from uuid import UUID

import sqlalchemy as sa
from sqlalchemy.dialects import mysql, postgresql
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import GenericFunction
from sqlalchemy.types import TypeDecorator, TypeEngine

from evals_orm import converters
from evals_orm._text import utc_text, uuid_text
from evals_orm.domain import ensure_utc, unchecked_uuid

__all__ = ["GUID", "MYSQL_DIALECTS", "EnumText", "UInt32", "UInt64", "UTCDateTime", "WireJSON"]

T = TypeVar("T")
E = TypeVar("E", bound=enum.Enum)

_U64_MAX = 2**64 - 1
_I32 = range(-(2**31), 2**31)
_HYPHENATED_LENGTH = 36


# SQLAlchemy names the dialect of a ``mariadb://`` URL "mariadb", and a
# variant for "mysql" does not reach it: MySQL types list both names.
MYSQL_DIALECTS = ("mysql", "mariadb")


def _is_postgresql(dialect: Dialect) -> bool:
    return dialect.name == "postgresql"


def _is_mysql(dialect: Dialect) -> bool:
    return dialect.name in MYSQL_DIALECTS


# Bind processing: each type picks the function for the dialect once, and
# ``bind_processor`` hands it to SQLAlchemy as it is (no impl type here has
# bind processing of its own to chain on any backend), so a bulk insert makes
# one call per value instead of TypeDecorator's wrapper and dialect checks.
Binder = Callable[[Any], Any]


def format_utc_text(value: datetime) -> str:
    """Format an aware UTC datetime as fixed-width ``YYYY-MM-DDTHH:MM:SS.ffffffZ``."""
    text = utc_text(value)
    return text if value.microsecond else text[:-1] + ".000000Z"


def parse_utc_text(text: str) -> datetime:
    """Parse a stored timestamp (ours, or any ISO 8601 form with an offset) as UTC."""
    if text.endswith(("Z", "z")):
        # An offset rather than "Z": Python 3.10's fromisoformat knows only offsets.
        return datetime.fromisoformat(text[:-1] + "+00:00")
    value = datetime.fromisoformat(text)
    if value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc)


def _utc_datetime(value: datetime | None) -> datetime | None:
    return None if value is None else ensure_utc(value, "datetime parameter")


def _naive_utc_datetime(value: datetime | None) -> datetime | None:
    return None if value is None else ensure_utc(value, "datetime parameter").replace(tzinfo=None)


def _utc_text(value: datetime | None) -> str | None:
    return None if value is None else format_utc_text(ensure_utc(value, "datetime parameter"))


def _utc_of_text(value: str | None) -> datetime | None:
    return None if value is None else parse_utc_text(value)


class UTCDateTime(TypeDecorator[datetime]):
    """An aware UTC datetime: fixed-width text on SQLite/libSQL, ``timestamptz`` on PostgreSQL.

    The fixed width makes text order equal time order, so range queries and
    ``ORDER BY`` work on the index. MariaDB/MySQL store it as a naive
    ``DATETIME(6)`` holding UTC (``TIMESTAMP`` would convert through the
    session time zone and ends in 2038). Naive datetimes are rejected.
    """

    impl = sa.Text
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if _is_postgresql(dialect):
            return dialect.type_descriptor(postgresql.TIMESTAMP(timezone=True))
        if _is_mysql(dialect):
            return dialect.type_descriptor(mysql.DATETIME(fsp=6))
        return dialect.type_descriptor(sa.Text())

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> Any:
        return self.bind_processor(dialect)(value)

    def bind_processor(self, dialect: Dialect) -> Binder:
        if _is_postgresql(dialect):
            return _utc_datetime
        if _is_mysql(dialect):
            return _naive_utc_datetime
        return _utc_text

    def result_processor(self, dialect: Dialect, coltype: object) -> Any:
        if dialect.name == "sqlite":
            return _utc_of_text
        # PostgreSQL's and MySQL's drivers return datetimes: the general way.
        return super().result_processor(dialect, coltype)

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if isinstance(value, datetime):
            if value.tzinfo is None and _is_mysql(dialect):
                return value.replace(tzinfo=timezone.utc)
            return ensure_utc(value, "stored datetime")
        return parse_utc_text(value)


class GUID(TypeDecorator[UUID]):
    """A UUID: lowercase hyphenated TEXT on SQLite/libSQL, native ``uuid`` on PostgreSQL.

    MariaDB/MySQL store its 16 bytes in ``BINARY(16)``, which holds every
    128-bit id and sorts like ``UUID`` (MariaDB's own ``UUID`` type rejects
    ids with the NCS variant and a high version nibble, and sorts otherwise).
    """

    impl = sa.Text
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if _is_postgresql(dialect):
            return dialect.type_descriptor(postgresql.UUID(as_uuid=True))
        if _is_mysql(dialect):
            return dialect.type_descriptor(mysql.BINARY(16))
        return dialect.type_descriptor(sa.Text())

    def process_bind_param(self, value: UUID | None, dialect: Dialect) -> Any:
        return self.bind_processor(dialect)(value)

    def bind_processor(self, dialect: Dialect) -> Binder:
        if _is_postgresql(dialect):
            return _uuid
        if _is_mysql(dialect):
            return _uuid_bytes
        return _uuid_text

    def process_result_value(self, value: Any, dialect: Dialect) -> UUID | None:
        if value is None or isinstance(value, UUID):
            return value
        if isinstance(value, (bytes, bytearray)):
            return UUID(bytes=bytes(value))
        return UUID(value)

    def result_processor(self, dialect: Dialect, coltype: object) -> Any:
        if dialect.name == "sqlite":
            return _uuid_of_text
        # PostgreSQL's drivers and MySQL's BINARY(16) go the general way.
        return super().result_processor(dialect, coltype)


def _as_uuid(value: UUID | str) -> UUID:
    return value if isinstance(value, UUID) else UUID(str(value))


def _uuid(value: UUID | str | None) -> UUID | None:
    return None if value is None else _as_uuid(value)


def _uuid_bytes(value: UUID | str | None) -> bytes | None:
    return None if value is None else _as_uuid(value).bytes


def _uuid_text(value: UUID | str | None) -> str | None:
    return None if value is None else uuid_text(_as_uuid(value))


def _uuid_of_text(value: str | None) -> UUID | None:
    if value is None:
        return None
    # process_bind_param's hyphenated form is not checked again; the other
    # forms UUID() reads (from rows written elsewhere) go through it.
    return unchecked_uuid(value) if len(value) == _HYPHENATED_LENGTH else UUID(value)


class EnumText(TypeDecorator[E], Generic[E]):
    """A ``str`` enum stored as its value in a TEXT column (no CHECK, as the seed)."""

    impl = sa.Text
    cache_ok = True

    def __init__(self, enum_class: type[E]) -> None:
        super().__init__()
        self.enum_class = enum_class

    def process_bind_param(self, value: E | str | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        return self.enum_class(value).value

    def process_result_value(self, value: Any, dialect: Dialect) -> E | None:
        return None if value is None else self.enum_class(value)


class _UnsignedInteger(TypeDecorator[int]):
    """An unsigned integer that SQLite's signed 64-bit INTEGER holds losslessly."""

    impl = sa.Integer
    cache_ok = True
    bits = 64

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if _is_postgresql(dialect):
            if self.bits > 32:
                return dialect.type_descriptor(sa.Numeric(20, 0))
            return dialect.type_descriptor(sa.BigInteger())
        if _is_mysql(dialect):
            # Native unsigned columns: no two's complement needed.
            if self.bits > 32:
                return dialect.type_descriptor(mysql.BIGINT(unsigned=True))
            return dialect.type_descriptor(mysql.INTEGER(unsigned=True))
        return dialect.type_descriptor(sa.Integer())

    def process_bind_param(self, value: int | None, dialect: Dialect) -> Any:
        return self.bind_processor(dialect)(value)

    def bind_processor(self, dialect: Dialect) -> Binder:
        end = 2**self.bits
        native = _is_postgresql(dialect) or _is_mysql(dialect)
        libsql = dialect.driver == "libsql"

        def bind(value: int | None) -> Any:
            if value is None:
                return None
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"expected an int, got {type(value).__name__}")
            if not 0 <= value < end:
                raise ValueError(f"{value} is outside 0..{end - 1}")
            if native:
                return value
            if value >= 2**63:
                # Two's complement, as the original service stores u64 in SQLite.
                value -= 2**64
            if libsql and value not in _I32:
                # libsql sends integers beyond 32 bits as REAL (f64) and loses
                # precision above 2**53; decimal text into an INTEGER column is exact.
                return str(value)
            return value

        return bind

    def process_result_value(self, value: Any, dialect: Dialect) -> int | None:
        if value is None:
            return None
        number = int(value)
        return number + 2**64 if number < 0 else number


class UInt64(_UnsignedInteger):
    """A u64: two's-complement INTEGER on SQLite/libSQL, ``numeric(20)`` on PostgreSQL.

    ``BIGINT UNSIGNED`` on MariaDB/MySQL.
    """

    cache_ok = True
    bits = 64


class UInt32(_UnsignedInteger):
    """A u32: INTEGER on SQLite/libSQL, ``bigint`` on PostgreSQL, ``INT UNSIGNED`` on MySQL."""

    cache_ok = True
    bits = 32


class _JSONText(GenericFunction[Any]):
    """A wire-JSON column as selected: its TEXT, or the text of its ``jsonb``.

    PostgreSQL sends jsonb as text anyway; cast to ``text`` it reaches the
    driver as a string, which orjson parses faster than psycopg's own
    ``json.loads`` of jsonb.
    """

    _register = False
    inherit_cache = True


@compiles(_JSONText)
def _compile_json_text(element: _JSONText, compiler: SQLCompiler, **kw: Any) -> str:
    return compiler.process(element.clauses, **kw)


@compiles(_JSONText, "postgresql")
def _compile_jsonb_text(element: _JSONText, compiler: SQLCompiler, **kw: Any) -> str:
    return f"CAST({compiler.process(element.clauses, **kw)} AS TEXT)"


class WireJSON(TypeDecorator[T], Generic[T]):
    """A value stored as its wire-format JSON: TEXT identical to ``dumps()``, or ``jsonb``.

    MariaDB/MySQL keep the same bytes in ``LONGTEXT`` (MySQL's ``JSON``
    would normalise them; MariaDB's is ``LONGTEXT`` with a check anyway).
    """

    impl = sa.Text
    cache_ok = True

    def __init__(self, value_type: Any) -> None:
        super().__init__()
        self.value_type = value_type

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if _is_postgresql(dialect):
            return dialect.type_descriptor(postgresql.JSONB())
        if _is_mysql(dialect):
            return dialect.type_descriptor(mysql.LONGTEXT())
        return dialect.type_descriptor(sa.Text())

    def bind_processor(self, dialect: Dialect) -> Any:
        # The value is written as wire JSON text on every backend; jsonb's own
        # processor (which would encode it again) is skipped on purpose and
        # PostgreSQL parses the text at the bind's ``::JSONB`` cast.
        # Encoded as the column's type, whose hook is found once; by the
        # value's class, a ``tuple[str, ...]`` would go item by item as any tuple.
        encode = converters.encoder(self.value_type)

        def process(value: T | None) -> str | None:
            return None if value is None else encode(value)

        return process

    def process_bind_param(self, value: T | None, dialect: Dialect) -> Any:
        return None if value is None else converters.dumps(value, self.value_type)

    def column_expression(self, colexpr: sa.ColumnElement[Any]) -> sa.ColumnElement[T]:
        return _JSONText(colexpr, type_=self)

    def result_processor(self, dialect: Dialect, coltype: object) -> Any:
        # Only ``dumps`` wrote these values (text, or jsonb the driver parses),
        # so they are read back without the wire format's checks; the impl
        # types have no result processing of their own to chain.
        decode = converters.written_decoder(self.value_type)

        def process(value: Any) -> T | None:
            return None if value is None else decode(value)

        return process
