"""The text of UUIDs and UTC instants, as the wire format and the TEXT columns write them.

orjson writes both in C, several times faster than ``str(uuid)`` and
``datetime.isoformat``; a subclass it does not take (``NanoDatetime``, a
caller's UUID subclass) is handed to it as its base class.
"""

from __future__ import annotations

from datetime import datetime
from uuid import UUID

import orjson

__all__ = ["utc_text", "uuid_text"]


def _base(value: object) -> object:
    # orjson's ``default``: called only for what it does not write itself.
    if isinstance(value, datetime):
        # Field by field: ``timetuple()`` costs several times as much.
        return datetime(
            value.year,
            value.month,
            value.day,
            value.hour,
            value.minute,
            value.second,
            value.microsecond,
            value.tzinfo,
        )
    if isinstance(value, UUID):
        return str(value)
    raise TypeError


def uuid_text(value: UUID) -> str:
    """Return the hyphenated lowercase form of ``value``, as ``str(value)``."""
    return orjson.dumps(value, default=_base)[1:-1].decode()


def utc_text(value: datetime) -> str:
    """Return ``YYYY-MM-DDTHH:MM:SS[.ffffff]Z`` of ``value``, which must be in ``timezone.utc``.

    The six fraction digits are there only if ``value.microsecond`` is not 0.
    """
    return orjson.dumps(value, default=_base, option=orjson.OPT_UTC_Z)[1:-1].decode()
