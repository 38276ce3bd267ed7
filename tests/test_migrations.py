"""Alembic migrations: the schema they build, the CLI, the API, concurrency and batch mode."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.environment import IncludeNameFn, IncludeObjectFn, RenderItemFn
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from conftest import Database

from evals_orm import (
    ConfigurationError,
    SqlEvalProjection,
    SqlEvalStorage,
    SqlEventLog,
    StudyCreated,
    metadata,
    migrations,
)
from evals_orm._demo import sample_events
from evals_orm.domain import uuid7

from support import HEAD, OUR_TABLES, T0, checkpoint_row, raw_rows, seed, study_row

REPO = Path(__file__).resolve().parent.parent
ALEMBIC = Path(sys.executable).parent / "alembic"
SEED_DDL = """
CREATE TABLE studies (id TEXT PRIMARY KEY, name TEXT NOT NULL, status TEXT NOT NULL,
  period_type TEXT NOT NULL, period_value INTEGER, config TEXT NOT NULL,
  created_at TEXT NOT NULL, started_at TEXT, stopped_at TEXT);
CREATE TABLE checkpoints (id TEXT PRIMARY KEY, study_id TEXT NOT NULL,
  timestamp TEXT NOT NULL, metrics TEXT NOT NULL, events_analyzed INTEGER NOT NULL,
  sessions_included TEXT NOT NULL);
CREATE INDEX idx_checkpoints_study_time ON checkpoints(study_id, timestamp);
"""


def _tables(engine: sa.Engine) -> set[str]:
    return set(sa.inspect(engine).get_table_names())


def _table_info(rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """Reduce PRAGMA table_info rows to (name, type, notnull-or-pk, pk)."""
    # The spec allows primary-key columns to be declared NOT NULL as well.
    return [(name, kind, bool(notnull) or bool(pk), pk) for _, name, kind, notnull, _, pk in rows]


def test_sqlite_schema_equals_the_seed_ddl(migrated: sa.Engine) -> None:
    """On SQLite/libSQL the migrated tables and index match the seed DDL (extra columns last)."""
    if migrated.dialect.name != "sqlite":
        pytest.skip(
            "the seed DDL is SQLite's; PostgreSQL and MariaDB are checked by their own tests"
        )
    seed_db = sqlite3.connect(":memory:")
    seed_db.executescript(SEED_DDL)
    for table in ("studies", "checkpoints"):
        expected = _table_info(seed_db.execute(f"PRAGMA table_info({table})").fetchall())
        actual = _table_info(raw_rows(migrated, f"PRAGMA table_info({table})"))
        assert expected == actual[: len(expected)]
    index_columns = raw_rows(migrated, "PRAGMA index_info(idx_checkpoints_study_time)")
    assert ["study_id", "timestamp"] == [name for _, _, name in index_columns]
    indexes = {row[1]: row[2] for row in raw_rows(migrated, "PRAGMA index_list(checkpoints)")}
    assert 0 == indexes["idx_checkpoints_study_time"]
    assert ["last_event_id"] == [
        name for _, name, *_ in raw_rows(migrated, "PRAGMA table_info(studies)")[9:]
    ]


def test_postgresql_schema_uses_native_types(migrated: sa.Engine) -> None:
    """On PostgreSQL the columns are uuid, timestamptz, jsonb, numeric(20) and bigint."""
    if migrated.dialect.name != "postgresql":
        pytest.skip("native types are PostgreSQL's")
    query = """
        SELECT table_name, column_name, data_type, numeric_precision, numeric_scale, is_nullable
        FROM information_schema.columns
        WHERE table_name IN ('studies', 'checkpoints') ORDER BY table_name, ordinal_position
    """
    expected = [
        ("checkpoints", "id", "uuid", None, None, "NO"),
        ("checkpoints", "study_id", "uuid", None, None, "NO"),
        ("checkpoints", "timestamp", "timestamp with time zone", None, None, "NO"),
        ("checkpoints", "metrics", "jsonb", None, None, "NO"),
        ("checkpoints", "events_analyzed", "numeric", 20, 0, "NO"),
        ("checkpoints", "sessions_included", "jsonb", None, None, "NO"),
        ("studies", "id", "uuid", None, None, "NO"),
        ("studies", "name", "text", None, None, "NO"),
        ("studies", "status", "text", None, None, "NO"),
        ("studies", "period_type", "text", None, None, "NO"),
        ("studies", "period_value", "bigint", 64, 0, "YES"),
        ("studies", "config", "jsonb", None, None, "NO"),
        ("studies", "created_at", "timestamp with time zone", None, None, "NO"),
        ("studies", "started_at", "timestamp with time zone", None, None, "YES"),
        ("studies", "stopped_at", "timestamp with time zone", None, None, "YES"),
        ("studies", "last_event_id", "uuid", None, None, "NO"),
    ]
    assert expected == raw_rows(migrated, query)
    index = raw_rows(
        migrated,
        "SELECT indexdef FROM pg_indexes WHERE indexname = 'idx_checkpoints_study_time'",
    )
    assert [("CREATE INDEX idx_checkpoints_study_time ON public.checkpoints "
             "USING btree (study_id, \"timestamp\")",)] == index  # fmt: skip
    constraints = raw_rows(
        migrated, "SELECT conname FROM pg_constraint WHERE conrelid = 'studies'::regclass"
    )
    assert [("pk_studies",)] == constraints


def test_mariadb_schema_uses_native_types(migrated: sa.Engine) -> None:
    """On MariaDB: BINARY(16), DATETIME(6), checked LONGTEXT JSON, unsigned ints, utf8mb4 InnoDB."""
    if migrated.dialect.name not in ("mysql", "mariadb"):
        pytest.skip("these column types are MariaDB's")
    columns = raw_rows(
        migrated,
        "SELECT table_name, column_name, column_type, is_nullable FROM information_schema.columns "
        "WHERE table_schema = DATABASE() AND table_name IN ('studies', 'checkpoints') "
        "ORDER BY table_name, ordinal_position",
    )
    assert [
        ("checkpoints", "id", "binary(16)", "NO"),
        ("checkpoints", "study_id", "binary(16)", "NO"),
        ("checkpoints", "timestamp", "datetime(6)", "NO"),
        ("checkpoints", "metrics", "longtext", "NO"),
        ("checkpoints", "events_analyzed", "bigint(20) unsigned", "NO"),
        ("checkpoints", "sessions_included", "longtext", "NO"),
        ("studies", "id", "binary(16)", "NO"),
        ("studies", "name", "longtext", "NO"),
        ("studies", "status", "text", "NO"),
        ("studies", "period_type", "text", "NO"),
        ("studies", "period_value", "int(10) unsigned", "YES"),
        ("studies", "config", "longtext", "NO"),
        ("studies", "created_at", "datetime(6)", "NO"),
        ("studies", "started_at", "datetime(6)", "YES"),
        ("studies", "stopped_at", "datetime(6)", "YES"),
        ("studies", "last_event_id", "binary(16)", "NO"),
    ] == columns
    tables = raw_rows(
        migrated,
        "SELECT DISTINCT engine, table_collation FROM information_schema.tables "
        "WHERE table_schema = DATABASE() AND table_name NOT LIKE 'evals_orm_alembic%'",
    )
    assert [("InnoDB", "utf8mb4_bin")] == tables
    index = raw_rows(
        migrated,
        "SELECT column_name FROM information_schema.statistics WHERE table_schema = DATABASE() "
        "AND index_name = 'idx_checkpoints_study_time' ORDER BY seq_in_index",
    )
    assert [("study_id",), ("timestamp",)] == index
    with pytest.raises(sa.exc.DBAPIError, match="ck_studies_config_json"):
        # Only JSON gets in, as jsonb guarantees on PostgreSQL.
        raw_rows(
            migrated,
            "INSERT INTO studies VALUES (x'00', 'n', 'pending', 'daily', NULL, 'not json', "
            "NOW(6), NULL, NULL, x'00')",
        )


def test_metadata_has_a_naming_convention() -> None:
    """evals_orm.metadata names constraints by convention, so migrations can refer to them."""
    convention = metadata.naming_convention
    assert {"ix", "uq", "ck", "fk", "pk"} <= set(convention)
    assert "pk_studies" == metadata.tables["studies"].primary_key.name


def _alembic(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("EVALS_ORM_")}
    return subprocess.run(
        [str(ALEMBIC), *args],
        cwd=REPO,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.slow
def test_alembic_command_line_with_env_var_and_x_url(database: Database) -> None:
    """`alembic upgrade head` works from the repo with EVALS_ORM_DATABASE_URL and with -x url."""
    up = _alembic("upgrade", "head", env=database.env())
    assert (0, "") == (up.returncode, up.stdout), up.stderr
    engine = database.engine()
    assert HEAD == migrations.current(engine)

    token_env = {k: v for k, v in database.env().items() if k == "EVALS_ORM_AUTH_TOKEN"}
    down = _alembic("-x", f"url={database.url}", "downgrade", "base", env=token_env)
    assert 0 == down.returncode, down.stderr
    assert migrations.current(engine) is None
    assert set() == _tables(engine) & OUR_TABLES
    engine.dispose()


@pytest.mark.slow
def test_alembic_without_a_url_explains_what_to_pass() -> None:
    """Without -x url or EVALS_ORM_DATABASE_URL the command fails naming both."""
    result = _alembic("upgrade", "head", env={})
    assert 0 != result.returncode
    assert "EVALS_ORM_DATABASE_URL" in result.stderr + result.stdout


def test_host_alembic_version_table_is_untouched(engine: sa.Engine) -> None:
    """Our version table is evals_orm_alembic_version; a host's alembic_version survives."""
    with engine.begin() as connection:
        connection.exec_driver_sql("CREATE TABLE alembic_version (version_num VARCHAR(32))")
        connection.exec_driver_sql("INSERT INTO alembic_version VALUES ('host_rev_1')")

    migrations.upgrade(engine)
    assert [(HEAD,)] == raw_rows(engine, "SELECT version_num FROM evals_orm_alembic_version")
    assert [("host_rev_1",)] == raw_rows(engine, "SELECT version_num FROM alembic_version")
    migrations.downgrade(engine, "base")
    assert [("host_rev_1",)] == raw_rows(engine, "SELECT version_num FROM alembic_version")
    assert {"alembic_version", migrations.VERSION_TABLE} >= _tables(engine)


def _diff(engine: sa.Engine) -> list[Any]:
    def include_name(name: str | None, type_: str, _parents: Any) -> bool:
        return type_ != "table" or name in metadata.tables

    with engine.connect() as connection:
        context = MigrationContext.configure(
            connection, opts={"compare_type": True, "include_name": include_name}
        )
        return list(compare_metadata(context, metadata))


def test_upgrade_matches_models_and_downgrade_reverses_it(engine: sa.Engine) -> None:
    """Upgrade head leaves no autogenerate diff; downgrade base removes our tables; again works."""
    assert migrations.current(engine) is None
    migrations.upgrade(engine)
    assert HEAD == migrations.current(engine)
    assert [] == _diff(engine)

    migrations.downgrade(engine, "base")
    assert migrations.current(engine) is None
    assert {migrations.VERSION_TABLE} >= _tables(engine)

    migrations.upgrade(engine)
    assert HEAD == migrations.current(engine)
    assert [] == _diff(engine)


def test_api_accepts_a_url_with_token_and_a_connection(database: Database) -> None:
    """upgrade/downgrade/current take a URL (+auth_token) or a Connection, as well as an Engine."""
    url, token = database.url, database.auth_token
    assert migrations.current(url, auth_token=token) is None
    migrations.upgrade(url, auth_token=token)
    assert HEAD == migrations.current(url, auth_token=token)
    migrations.downgrade(url, "base", auth_token=token)
    assert migrations.current(url, auth_token=token) is None

    engine = database.engine()
    with engine.begin() as connection:
        migrations.upgrade(connection)
        assert HEAD == migrations.current(connection)
    assert HEAD == migrations.current(engine)
    assert OUR_TABLES <= _tables(engine)
    with engine.begin() as connection:
        migrations.downgrade(connection, "base")
    assert migrations.current(engine) is None
    engine.dispose()


_UPGRADE_WHEN_TOLD = """
import os, sys, time
from pathlib import Path
from evals_orm import migrations
ready, go = Path(sys.argv[1]), Path(sys.argv[2])
ready.touch()
while not go.exists():
    time.sleep(0.005)
migrations.upgrade(os.environ["EVALS_ORM_DATABASE_URL"],
                   auth_token=os.environ.get("EVALS_ORM_AUTH_TOKEN"))
"""


@pytest.mark.slow
def test_concurrent_first_upgrades_all_succeed(database: Database, tmp_path: Path) -> None:
    """Four processes upgrading a fresh database at the same moment all succeed, once."""
    go = tmp_path / "go"
    env = {**os.environ, **database.env(), "PYTHONPATH": str(REPO)}
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", _UPGRADE_WHEN_TOLD, str(tmp_path / f"ready{i}"), str(go)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(4)
    ]
    deadline = time.monotonic() + 60
    while not all((tmp_path / f"ready{i}").exists() for i in range(4)):
        assert time.monotonic() < deadline, "the upgrading processes did not start"
        time.sleep(0.01)
    go.touch()
    outcomes = [(process.wait(timeout=120), process.communicate()[1]) for process in processes]

    assert [0, 0, 0, 0] == [code for code, _ in outcomes], [err for _, err in outcomes]
    engine = database.engine()
    assert [(HEAD,)] == raw_rows(engine, f"SELECT version_num FROM {migrations.VERSION_TABLE}")
    assert [] == _diff(engine)
    engine.dispose()


_BATCH_REVISION = '''
"""Test-only: rebuild studies and checkpoints in batch mode."""
import sqlalchemy as sa
from alembic import op

revision = "9002"
down_revision = "evals_orm_0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    for table in ("studies", "checkpoints"):
        with op.batch_alter_table(table, recreate="always") as batch:
            batch.add_column(sa.Column("note", sa.Text(), nullable=True))


def downgrade() -> None:
    for table in ("checkpoints", "studies"):
        with op.batch_alter_table(table, recreate="always") as batch:
            batch.drop_column("note")
'''


def test_batch_migration_keeps_every_row(engine: sa.Engine, tmp_path: Path) -> None:
    """A later batch-mode revision rebuilding both tables keeps every study and checkpoint."""
    scripts = tmp_path / "scripts"
    shutil.copytree(
        migrations.script_location(), scripts, ignore=shutil.ignore_patterns("__pycache__")
    )
    (scripts / "versions" / "9002_test_batch.py").write_text(textwrap.dedent(_BATCH_REVISION))
    config = Config()
    config.set_main_option("script_location", str(scripts))
    config.attributes["connection"] = engine
    config.attributes["configure_logger"] = False

    command.upgrade(config, HEAD)
    studies = [study_row(created_at=T0) for _ in range(3)]
    checkpoints = [checkpoint_row(study.id) for study in studies for _ in range(4)]
    seed(engine, [*studies, *checkpoints, checkpoint_row(uuid7())])
    before_studies = raw_rows(engine, "SELECT * FROM studies ORDER BY id")
    before_checkpoints = raw_rows(engine, "SELECT * FROM checkpoints ORDER BY id")

    command.upgrade(config, "head")
    assert "9002" == migrations.current(engine)
    after = raw_rows(engine, "SELECT * FROM checkpoints ORDER BY id")
    assert [(*row, None) for row in before_checkpoints] == after
    assert [(*row, None) for row in before_studies] == raw_rows(
        engine, "SELECT * FROM studies ORDER BY id"
    )

    command.downgrade(config, HEAD)
    assert before_checkpoints == raw_rows(engine, "SELECT * FROM checkpoints ORDER BY id")
    assert before_studies == raw_rows(engine, "SELECT * FROM studies ORDER BY id")
    index = [ix["name"] for ix in sa.inspect(engine).get_indexes("checkpoints")]
    assert ["idx_checkpoints_study_time"] == index


def test_a_database_stamped_with_the_old_revision_id_keeps_upgrading(engine: sa.Engine) -> None:
    """A database stamped ``0001`` (the id before the rename) reads and upgrades as the new id."""
    migrations.upgrade(engine, "evals_orm_0001")
    with engine.begin() as connection:
        connection.exec_driver_sql(f"UPDATE {migrations.VERSION_TABLE} SET version_num = '0001'")
    assert "evals_orm_0001" == migrations.current(engine)

    migrations.upgrade(engine)
    assert [(HEAD,)] == raw_rows(engine, f"SELECT version_num FROM {migrations.VERSION_TABLE}")
    migrations.downgrade(engine, "base")
    assert set() == _tables(engine) & OUR_TABLES


def test_the_migrations_carry_the_branch_label() -> None:
    """The package's history is the branch ``evals_orm`` and no revision id is a bare number."""
    scripts = ScriptDirectory(migrations.script_location())
    revisions = list(scripts.walk_revisions())
    assert {migrations.BRANCH} == {label for rev in revisions for label in rev.branch_labels}
    assert all(rev.revision.startswith("evals_orm_") for rev in revisions)
    assert HEAD == scripts.get_revision(f"{migrations.BRANCH}@head").revision


def test_upgrade_on_a_connection_commits_only_its_own_transaction(database: Database) -> None:
    """upgrade(connection) commits when no transaction is open, and joins an open one.

    Inside the caller's transaction nothing is committed: the caller's
    rollback undoes the upgrade (PostgreSQL, whose DDL is transactional).
    """
    engine = database.engine()
    if engine.dialect.name == "postgresql":
        with engine.connect() as connection:
            connection.begin()
            migrations.upgrade(connection)
            assert HEAD == migrations.current(connection)
            connection.rollback()
        assert migrations.current(engine) is None
    with engine.connect() as connection:
        migrations.upgrade(connection)
        assert not connection.in_transaction()
    assert HEAD == migrations.current(engine)
    engine.dispose()


def test_a_schema_is_a_configuration_error_without_postgresql(database: Database) -> None:
    """create_engine(url, schema=...) on SQLite or libSQL says in a sentence it needs PostgreSQL."""
    if database.backend == "postgresql":
        pytest.skip("PostgreSQL has schemas")
    with pytest.raises(ConfigurationError, match=r"^a schema is only supported on PostgreSQL"):
        database.engine(schema="evals")


def _studies_of(engine: sa.Engine) -> list[str]:
    return sorted(study.name for study in SqlEvalStorage(engine).list_studies())


def test_two_postgresql_schemas_are_independent_installations(database: Database) -> None:
    """Two schemas of one database hold two installations that never see each other.

    Upgrade, append (COPY), rebuild, reads and downgrade each stay in their
    schema, with its own version table; nothing lands in ``public``.
    """
    if database.backend != "postgresql":
        pytest.skip("schemas are PostgreSQL's")
    first = database.engine(schema="tenant_a")
    # The README's equivalent for an Engine the host makes itself.
    second = sa.create_engine(
        sa.make_url(database.url).set(drivername="postgresql+psycopg"),
        execution_options={"schema_translate_map": {None: "tenant_b"}},
    )
    events = sample_events()
    migrations.upgrade(first)
    migrations.upgrade(second)
    migrations.upgrade(first)  # the version table is found again in its schema
    assert HEAD == migrations.current(first) == migrations.current(second)
    public = database.engine()
    assert migrations.current(public) is None
    assert set() == _tables(public)

    created = [stored for stored in events if isinstance(stored.event, StudyCreated)]
    assert len(events) == SqlEventLog(first).append(events, projection=SqlEvalProjection(first))
    assert 1 == SqlEventLog(second).append(created[0], projection=SqlEvalProjection(second))
    every_study = _studies_of(first)
    assert len(created) == len(every_study)
    assert [created[0].event.name] == _studies_of(second)  # type: ignore[union-attr]

    assert len(events) == SqlEvalProjection(first).rebuild(SqlEventLog(first).read())
    assert every_study == _studies_of(first)
    assert [(len(events),), (1,)] == [
        *raw_rows(public, "SELECT count(*) FROM tenant_a.eval_events"),
        *raw_rows(public, "SELECT count(*) FROM tenant_b.eval_events"),
    ]

    migrations.downgrade(first, "base")
    assert migrations.current(first) is None
    assert {migrations.VERSION_TABLE} == set(sa.inspect(public).get_table_names("tenant_a"))
    assert [created[0].event.name] == _studies_of(second)  # type: ignore[union-attr]
    assert HEAD == migrations.current(second)
    for engine in (first, second, public):
        engine.dispose()


def test_the_autogenerate_filters_hide_only_our_objects() -> None:
    """include_name/include_object refuse our tables, indexes and version table, pass the host's."""
    # A host's env.py passes them to context.configure, typed as Alembic expects.
    filters: tuple[IncludeNameFn, IncludeObjectFn, RenderItemFn] = (
        migrations.include_name,
        migrations.include_object,
        migrations.render_item,
    )
    assert all(callable(function) for function in filters)
    host = sa.Table("host_items", sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True))
    studies = metadata.tables["studies"]
    (index,) = metadata.tables["checkpoints"].indexes
    assert [False, False, False, True, True] == [
        migrations.include_name("studies", "table", {}),
        migrations.include_name(migrations.VERSION_TABLE, "table", {}),
        migrations.include_name(index.name, "index", {"table_name": "checkpoints"}),
        migrations.include_name("host_items", "table", {}),
        migrations.include_name("evals", "schema", {}),
    ]
    assert [False, False, False, True] == [
        migrations.include_object(studies, "studies", "table", False, None),
        migrations.include_object(index, index.name, "index", False, None),
        migrations.include_object(studies.c.name, "name", "column", False, None),
        migrations.include_object(host, "host_items", "table", False, None),
    ]
