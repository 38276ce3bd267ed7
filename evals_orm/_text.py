"""The text of UUIDs and UTC instants, as the wire format and the TEXT columns write them.

orjson writes both in C, several times faster than ``str(uuid)`` and
``datetime.isoformat``. It takes ``UUID`` and ``datetime`` themselves, not
subclasses, so a ``NanoDatetime`` (or a caller's UUID subclass) is handed
over as its base class first.
"""

from __future__ import annotations

from datetime import datetime
from uuid import UUID

import orjson

from evals_orm.domain import as_datetime

__all__ = ["utc_text", "uuid_text"]


def uuid_text(value: UUID) -> str:
    """Return the hyphenated lowercase form of ``value``, as ``str(value)``."""
    if type(value) is not UUID:
        value = UUID(int=value.int)
    return orjson.dumps(value)[1:-1].decode()


def utc_text(value: datetime) -> str:
    """Return ``YYYY-MM-DDTHH:MM:SS[.ffffff]Z`` of ``value``, which must be in ``timezone.utc``.

    The six fraction digits are there only if ``value.microsecond`` is not 0.
    """
    return orjson.dumps(as_datetime(value), option=orjson.OPT_UTC_Z)[1:-1].decode()
