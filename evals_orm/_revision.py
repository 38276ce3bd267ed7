"""The schema revision check every service makes once per Engine, at its first use."""

from __future__ import annotations

import functools
import re
import weakref
from pathlib import Path

import sqlalchemy as sa

from evals_orm.errors import DatabaseError

__all__ = ["check", "known"]

# Alembic's version table of the package (``migrations.VERSION_TABLE``).
_VERSION_TABLE = "evals_orm_alembic_version"
_REVISION = re.compile(r"^revision(?:\s*:\s*str)?\s*=\s*['\"]([^'\"]+)['\"]", re.MULTILINE)

_CHECKED: weakref.WeakSet[sa.Engine] = weakref.WeakSet()


@functools.cache
def known() -> frozenset[str]:
    """Return the revision ids of the package's migration scripts.

    Read off the scripts' ``revision = "..."`` lines, the lookup that
    ``migrations.script_location`` makes: importing Alembic to ask it would
    add a tenth of a second to every command.
    """
    package = Path(__file__).resolve().parent
    for scripts in (package / "_alembic", package.parent / "alembic"):
        versions = scripts / "versions"
        if versions.is_dir():
            return frozenset(
                match.group(1)
                for path in versions.glob("*.py")
                for match in _REVISION.finditer(path.read_text(encoding="utf-8"))
            )
    return frozenset()


def check(engine: sa.Engine, connection: sa.Connection) -> None:
    """Refuse a database stamped with a revision this package does not know.

    A database without the version table passes: a missing table then fails
    with the usual "run `evals-orm db upgrade`". Done once per Engine.
    """
    if engine in _CHECKED:
        return
    schema = connection.get_execution_options().get("schema_translate_map", {}).get(None)
    if sa.inspect(connection).has_table(_VERSION_TABLE, schema=schema):
        table = sa.table(_VERSION_TABLE, sa.column("version_num"), schema=schema)
        stamped = connection.execute(sa.select(table.c.version_num)).scalars().all()
        unknown = sorted(set(stamped) - known())
        if unknown:
            # Rare, so only now pay for importing Alembic: ids of released
            # revisions renamed since are known too.
            from evals_orm.migrations import RENAMED_REVISIONS  # noqa: PLC0415 - see above

            unknown = sorted(set(unknown) - RENAMED_REVISIONS.keys())
        if unknown:
            raise DatabaseError(
                f"the database was migrated by a newer evals_orm (revision "
                f"{', '.join(unknown)}); upgrade the package"
            )
    _CHECKED.add(engine)
