"""A host application's Alembic project deploys evals_orm by each of the README's recipes.

The host project is built in a temporary directory with its own revision
``0001`` and driven by the real ``alembic`` and ``evals-orm`` commands.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import alembic
import pytest
import sqlalchemy as sa
from conftest import Database

from evals_orm import create_engine, migrations

from support import HEAD, OUR_TABLES, raw_rows

BIN = Path(sys.executable).parent

HOST_ENV = '''
"""The host's env.py, calling evals_orm's migrations where ``-x evals=`` says."""
import os

import sqlalchemy as sa
from alembic import context

from evals_orm import create_engine, migrations
from host_models import metadata

config = context.config
options = context.get_x_argument(as_dictionary=True)
evals = options.get("evals", "none")
filters = {} if options.get("filters") == "off" else {
    "include_name": migrations.include_name, "render_item": migrations.render_item,
}
url = config.get_main_option("sqlalchemy.url")

if context.is_offline_mode():
    context.configure(url=url, target_metadata=metadata, literal_binds=True, **filters)
    if evals == "before":
        migrations.upgrade(url, sql=True)
    with context.begin_transaction():
        context.run_migrations()
    if evals == "after":
        migrations.upgrade(url, sql=True)
else:
    engine = create_engine(
        url, auth_token=os.environ.get("EVALS_ORM_AUTH_TOKEN"), poolclass=sa.pool.NullPool
    )
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=metadata, **filters)
        if evals == "before":
            migrations.upgrade(connection)
        with context.begin_transaction():
            context.run_migrations()
            if evals == "inside":
                migrations.upgrade(connection)
        if evals == "after":
            migrations.upgrade(connection)
    engine.dispose()
'''

HOST_MODELS = """
import os

import sqlalchemy as sa

from evals_orm.types import GUID

metadata = sa.MetaData()
columns = [
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("name", sa.Text, nullable=False),
]
if os.environ.get("HOST_STUDY_REFERENCE"):
    columns.append(sa.Column("study_id", GUID(), nullable=True))
items = sa.Table("host_items", metadata, *columns)
"""

HOST_REVISION = '''
"""The host's own first revision."""
import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade():
    op.create_table(
        "host_items",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.Text, nullable=False),
    )


def downgrade():
    op.drop_table("host_items")
'''

HOST_INI = """
[alembic]
script_location = %(here)s/migrations
prepend_sys_path = .
path_separator = os
sqlalchemy.url = {url}

[evals_orm]
script_location = {location}
sqlalchemy.url = {url}
{evals_options}
"""


def _host_project(tmp_path: Path, url: str, evals_options: str = "") -> Path:
    """Write a host Alembic project whose database is ``url``; return its directory."""
    project = tmp_path / "host"
    versions = project / "migrations" / "versions"
    versions.mkdir(parents=True)
    escaped = url.replace("%", "%%")
    location = migrations.SCRIPT_LOCATION
    ini = HOST_INI.format(url=escaped, location=location, evals_options=evals_options)
    (project / "alembic.ini").write_text(ini)
    (project / "host_models.py").write_text(HOST_MODELS)
    (project / "migrations" / "env.py").write_text(HOST_ENV)
    (versions / "0001_host.py").write_text(HOST_REVISION)
    template = Path(alembic.__file__).parent / "templates" / "generic" / "script.py.mako"
    shutil.copy(template, project / "migrations" / "script.py.mako")
    return project


def _run(
    program: str, *args: str, cwd: Path, database: Database, extra_env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run one of the venv's commands in ``cwd``; only the auth token comes from the environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVALS_ORM_")}
    if database.auth_token:
        env["EVALS_ORM_AUTH_TOKEN"] = database.auth_token
    return subprocess.run(
        [str(BIN / program), *args],
        cwd=cwd,
        env={**env, **(extra_env or {})},
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def _alembic(
    project: Path, database: Database, *args: str, env: dict[str, str] | None = None
) -> str:
    """Run the host project's `alembic` command; return its stdout, failing on an error."""
    return _ok(_run("alembic", *args, cwd=project, database=database, extra_env=env))


def _ok(result: subprocess.CompletedProcess[str]) -> str:
    assert 0 == result.returncode, result.stdout + result.stderr
    return result.stdout


def _versions(engine: sa.Engine) -> tuple[list[tuple[object, ...]], list[tuple[object, ...]]]:
    """Return the host's and evals_orm's version rows."""
    host = raw_rows(engine, "SELECT version_num FROM alembic_version")
    ours = raw_rows(engine, f"SELECT version_num FROM {migrations.VERSION_TABLE}")
    return host, ours


def _tables(engine: sa.Engine) -> set[str]:
    return set(sa.inspect(engine).get_table_names())


def test_recipe_separate_step(database: Database, tmp_path: Path) -> None:
    """`evals-orm db upgrade` or `alembic -n evals_orm` next to the host's own `alembic upgrade`.

    Both version tables coexist, `alembic -n evals_orm check` finds the models
    and migrations equal, and the package's downgrade leaves the host alone.
    """
    project = _host_project(tmp_path, database.url)
    _ok(_run("evals-orm", "--url", database.url, "db", "upgrade", cwd=project, database=database))
    _alembic(project, database, "upgrade", "head")
    engine = database.engine()
    assert ([("0001",)], [(HEAD,)]) == _versions(engine)

    assert f"{HEAD} (head)" in _alembic(project, database, "-n", "evals_orm", "current")
    _alembic(project, database, "-n", "evals_orm", "check")
    _alembic(project, database, "-n", "evals_orm", "downgrade", "base")
    assert set() == OUR_TABLES & _tables(engine)
    _alembic(project, database, "-n", "evals_orm", "upgrade", "evals_orm@head")
    assert ([("0001",)], [(HEAD,)]) == _versions(engine)
    assert {"host_items", *OUR_TABLES} <= _tables(engine)
    engine.dispose()


def test_recipe_separate_step_in_a_postgresql_schema(database: Database, tmp_path: Path) -> None:
    """An ini section with ``schema = evals`` migrates, reports and checks the package there."""
    if database.backend != "postgresql":
        pytest.skip("schemas are PostgreSQL's")
    project = _host_project(tmp_path, database.url, "schema = evals")
    _alembic(project, database, "-n", "evals_orm", "upgrade", "head")
    _alembic(project, database, "upgrade", "head")
    assert f"{HEAD} (head)" in _alembic(project, database, "-n", "evals_orm", "current")
    _alembic(project, database, "-n", "evals_orm", "check")
    engine = database.engine()
    assert {"alembic_version", "host_items"} == _tables(engine)
    assert {migrations.VERSION_TABLE, *OUR_TABLES} == set(
        sa.inspect(engine).get_table_names("evals")
    )
    in_schema = database.engine(schema="evals")
    assert HEAD == migrations.current(in_schema)
    in_schema.dispose()
    engine.dispose()


@pytest.mark.parametrize("where", ["before", "inside", "after"])
def test_recipe_one_host_upgrade(database: Database, tmp_path: Path, where: str) -> None:
    """The host's env.py calls migrations.upgrade(connection) and its own run still works.

    Before, inside or after the host's ``context.run_migrations()``, both
    histories are applied by one `alembic upgrade head`, each with its own
    version table; the host's downgrade then undoes only the host's tables.
    """
    project = _host_project(tmp_path, database.url)
    _alembic(project, database, "-x", f"evals={where}", "upgrade", "head")
    engine = database.engine()
    assert ([("0001",)], [(HEAD,)]) == _versions(engine)
    assert {"host_items", *OUR_TABLES} <= _tables(engine)

    _alembic(project, database, "-x", f"evals={where}", "downgrade", "base")
    assert ([], [(HEAD,)]) == _versions(engine)
    assert "host_items" not in _tables(engine)
    assert OUR_TABLES <= _tables(engine)
    engine.dispose()


def test_recipe_versions_inside_the_host_tree(database: Database, tmp_path: Path) -> None:
    """The package's versions in the host's version_locations: one tree, two branches.

    `alembic upgrade heads` applies both histories and records both revisions
    in the host's own alembic_version; `evals_orm@head` names the package's.
    """
    project = _host_project(tmp_path, database.url)
    ini = project / "alembic.ini"
    versions = f"{migrations.SCRIPT_LOCATION}/versions"  # evals_orm:_alembic/versions, installed
    ini.write_text(
        ini.read_text().replace(
            "path_separator = os\n",
            "path_separator = newline\n"
            f"version_locations =\n    %(here)s/migrations/versions\n    {versions}\n",
        )
    )
    _alembic(project, database, "upgrade", "evals_orm@head")
    _alembic(project, database, "upgrade", "heads")
    engine = database.engine()
    assert [("0001",), (HEAD,)] == sorted(
        raw_rows(engine, "SELECT version_num FROM alembic_version")
    )
    assert {"host_items", *OUR_TABLES} <= _tables(engine)
    assert migrations.VERSION_TABLE not in _tables(engine)
    engine.dispose()


def _apply_script(database: Database, script: str, tmp_path: Path) -> sa.Engine:
    """Run an SQL script with the backend's own command line client; return an Engine on it."""
    if database.backend == "postgresql":
        subprocess.run(
            ["psql", "-q", "-v", "ON_ERROR_STOP=1", database.url],
            input=script,
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        )
        return database.engine()
    if database.backend == "mariadb":
        url = sa.make_url(database.url)
        client = ["mysql", f"--user={url.username}", f"--host={url.host}", f"--port={url.port}"]
        subprocess.run(
            [*client, str(url.database)],
            input=script,
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        )
        return database.engine()
    target = tmp_path / "offline.db"
    subprocess.run(
        ["sqlite3", "-bail", str(target)],
        input=script,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return create_engine(f"sqlite:///{target}")


def _offline_capable(database: Database) -> None:
    if database.backend == "libsql-remote":
        pytest.skip("a script is applied with the sqlite3/psql clients, not to a remote server")


@pytest.mark.parametrize("where", ["before", "after"])
def test_recipe_one_host_upgrade_offline(database: Database, tmp_path: Path, where: str) -> None:
    """`alembic upgrade head --sql` of the host also prints the package's script.

    Applied to an empty database with sqlite3/psql, it creates both
    applications' tables and version rows, and nothing is connected to.
    """
    _offline_capable(database)
    project = _host_project(tmp_path, database.url)
    args = ("-x", f"evals={where}", "upgrade", "head", "--sql")
    script = _alembic(project, database, *args)
    assert not (tmp_path / "test.db").exists()

    engine = _apply_script(database, script, tmp_path)
    assert ([("0001",)], [(HEAD,)]) == _versions(engine)
    assert {"host_items", *OUR_TABLES} <= _tables(engine)
    engine.dispose()


def _schema(engine: sa.Engine, schema: str | None = None) -> list[tuple[object, ...]]:
    """Describe every evals_orm table, column, index and constraint, whatever the schema."""
    if engine.dialect.name == "sqlite":
        rows = raw_rows(
            engine,
            "SELECT type, name, tbl_name, sql FROM sqlite_master "
            "WHERE name NOT LIKE 'sqlite_%' ORDER BY name",
        )
        # A script is indented with spaces where the online DDL has tabs.
        return [(*row[:3], " ".join(str(row[3]).split())) for row in rows]
    if engine.dialect.name in ("mysql", "mariadb"):
        return _mysql_schema(engine)
    where = {"schema": schema or "public"}
    columns = raw_rows(
        engine,
        "SELECT table_name, column_name, data_type, numeric_precision, is_nullable, "
        "replace(column_default, :schema || '.', '') "
        "FROM information_schema.columns WHERE table_schema = :schema "
        "ORDER BY table_name, ordinal_position",
        where,
    )
    indexes = raw_rows(
        engine,
        "SELECT indexname, replace(indexdef, :schema || '.', '') FROM pg_indexes "
        "WHERE schemaname = :schema ORDER BY indexname",
        where,
    )
    constraints = raw_rows(
        engine,
        "SELECT conname, contype FROM pg_constraint c JOIN pg_namespace n "
        "ON n.oid = c.connamespace WHERE n.nspname = :schema ORDER BY conname",
        where,
    )
    return [*columns, *indexes, *constraints]


def _mysql_schema(engine: sa.Engine) -> list[tuple[object, ...]]:
    """Describe the tables, columns, indexes and constraints of a MariaDB/MySQL database."""
    queries = (
        "SELECT table_name, engine, table_collation FROM information_schema.tables",
        "SELECT table_name, column_name, column_type, is_nullable, column_default, extra "
        "FROM information_schema.columns",
        "SELECT table_name, index_name, non_unique, seq_in_index, column_name "
        "FROM information_schema.statistics",
        "SELECT table_name, constraint_name, constraint_type "
        "FROM information_schema.table_constraints",
        "SELECT table_name, constraint_name, check_clause "
        "FROM information_schema.check_constraints",
    )
    return [
        row
        for query in queries
        for row in sorted(
            raw_rows(
                engine,
                f"{query} WHERE {'constraint' if 'check_clause' in query else 'table'}"
                "_schema = DATABASE()",
            ),
            key=repr,
        )
    ]


@contextmanager
def _twin_mysql_database(database: Database) -> Iterator[sa.Engine]:
    """Yield an Engine on a second, empty database of the MariaDB server, dropped afterwards."""
    url = sa.make_url(database.url)
    twin = f"{url.database}_twin"
    with database.engine().connect() as connection:
        connection.exec_driver_sql(
            f"CREATE DATABASE `{twin}` CHARACTER SET utf8mb4 COLLATE utf8mb4_bin"
        )
    engine = create_engine(url.set(database=twin))
    try:
        yield engine
    finally:
        engine.dispose()
        with database.engine().connect() as connection:
            connection.exec_driver_sql(f"DROP DATABASE `{twin}`")


def test_offline_sql_gives_the_online_schema(database: Database, tmp_path: Path) -> None:
    """`evals-orm db upgrade --sql` prints only SQL, connects to nothing, and builds the schema.

    The script is one transaction (not on MariaDB, whose DDL commits each
    statement); applied with sqlite3/psql/mysql to an empty database it
    gives the same tables, columns, indexes and version row as an online
    upgrade. For remote libSQL it is SQLite's script, made without reaching
    the server.
    """
    args = ("--url", database.url, "db", "upgrade", "--sql")
    script = _ok(_run("evals-orm", *args, cwd=tmp_path, database=database))
    assert not (tmp_path / "test.db").exists()
    assert "CREATE TABLE studies" in script
    if database.backend != "mariadb":
        # One transaction: a script that fails halfway leaves nothing behind.
        assert (True, True) == (script.startswith("BEGIN;"), script.rstrip().endswith("COMMIT;"))

    if database.backend == "libsql-remote":
        unreachable = ("--url", "http://127.0.0.1:9", "db", "upgrade", "--sql")
        assert script == _ok(_run("evals-orm", *unreachable, cwd=tmp_path, database=database))
        local = Database("sqlite", f"sqlite:///{tmp_path / 'local.db'}")
        args = ("--url", local.url, "db", "upgrade", "--sql")
        assert script == _ok(_run("evals-orm", *args, cwd=tmp_path, database=local))
        return
    offline = _apply_script(database, script, tmp_path)
    if database.backend == "postgresql":
        # The online twin goes to a schema of the same database, to compare with.
        online = create_engine(database.url, schema="online")
        migrations.upgrade(online)
        assert _schema(online, "online") == _schema(offline)
    elif database.backend == "mariadb":
        with _twin_mysql_database(database) as online:
            migrations.upgrade(online)
            assert _schema(online) == _schema(offline)
            assert [(HEAD,)] == _versions_of(offline) == _versions_of(online)
        offline.dispose()
        return
    else:
        online = database.engine()
        migrations.upgrade(online)
        assert _schema(online) == _schema(offline)
    assert [(HEAD,)] == _versions_of(offline) == _versions_of(online)
    offline.dispose()
    online.dispose()


def test_offline_sql_for_a_postgresql_schema(database: Database, tmp_path: Path) -> None:
    """upgrade(engine_in_schema, sql=True, output=...) writes a script that builds the schema."""
    if database.backend != "postgresql":
        pytest.skip("schemas are PostgreSQL's")
    in_schema = database.engine(schema="dba")
    script = io.StringIO()
    migrations.upgrade(in_schema, sql=True, output=script)
    public = _apply_script(database, script.getvalue(), tmp_path)
    assert set() == _tables(public)
    assert {migrations.VERSION_TABLE, *OUR_TABLES} == set(sa.inspect(public).get_table_names("dba"))
    assert HEAD == migrations.current(in_schema)
    migrations.upgrade(in_schema)  # online, the offline-made schema is found at head
    assert [(HEAD,)] == _versions_of(in_schema)
    in_schema.dispose()
    public.dispose()


def _versions_of(engine: sa.Engine) -> list[tuple[object, ...]]:
    # A Table, not a lightweight table(): only a Table follows the schema_translate_map.
    version = sa.Table(migrations.VERSION_TABLE, sa.MetaData(), sa.Column("version_num", sa.Text))
    with engine.connect() as connection:
        return [tuple(row) for row in connection.execute(sa.select(version.c.version_num))]


def _autogenerate(
    project: Path, database: Database, *options: str, env: dict[str, str] | None = None
) -> str:
    """Run the host's `alembic revision --autogenerate`; return the new script, removed."""
    versions = project / "migrations" / "versions"
    before = set(versions.glob("*.py"))
    args = (*options, "revision", "--autogenerate", "-m", "auto")
    _alembic(project, database, *args, env=env)
    (script,) = set(versions.glob("*.py")) - before
    text = script.read_text()
    script.unlink()
    return text


def _body(script: str, function: str) -> str:
    match = re.search(rf"def {function}\(\) -> None:\n(.*?)(?=\n\ndef |\Z)", script, re.DOTALL)
    assert match is not None, script
    return textwrap.dedent(match.group(1)).strip()


def test_host_autogenerate_leaves_our_tables_alone(database: Database, tmp_path: Path) -> None:
    """With migrations.include_name the host's autogenerate proposes nothing about our tables.

    Without it, autogenerate proposes to drop them (the README's warning);
    a host column of an evals_orm type is rendered with its import, and the
    generated migration runs.
    """
    project = _host_project(tmp_path, database.url)
    _alembic(project, database, "-x", "evals=after", "upgrade", "head")

    script = _autogenerate(project, database)
    for function in ("upgrade", "downgrade"):
        assert "pass" in _body(script, function)
        assert "op." not in _body(script, function)
    unfiltered = _autogenerate(project, database, "-x", "filters=off")
    for table in (*OUR_TABLES, migrations.VERSION_TABLE):
        assert f"op.drop_table('{table}')" in unfiltered

    versions = project / "migrations" / "versions"
    reference = {"HOST_STUDY_REFERENCE": "1"}
    script = _autogenerate(project, database, env=reference)
    assert "import evals_orm.types" in script
    assert "sa.Column('study_id', evals_orm.types.GUID(), nullable=True)" in script
    (versions / "0002_study_reference.py").write_text(script)
    _alembic(project, database, "upgrade", "head", env=reference)
    engine = database.engine()
    columns = [column["name"] for column in sa.inspect(engine).get_columns("host_items")]
    assert ["id", "name", "study_id"] == columns
    engine.dispose()
