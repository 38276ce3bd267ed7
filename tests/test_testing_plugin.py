"""The pytest plugin evals_orm.testing, run as a host project would run it (pytester)."""

from __future__ import annotations

import json
import socket
from collections import Counter
from pathlib import Path

import pytest
import sqlalchemy as sa

import evals_orm
from evals_orm import create_engine
from evals_orm.testing import BACKENDS

ALL = ",".join(BACKENDS)
README = Path(__file__).resolve().parent.parent / "README.md"

# A host test module: every test records what it saw into RECORD (one JSON line),
# so the outer test can check databases, servers and workers afterwards.
HOST_TESTS = """
import json, os
import sqlalchemy as sa
from evals_orm import create_engine

def _record(**fields):
    fields["worker"] = os.environ.get("PYTEST_XDIST_WORKER", "main")
    with open(os.environ["RECORD"], "a") as stream:
        stream.write(json.dumps(fields) + "\\n")

def _note_database(evals_backend, evals_url):
    url = sa.make_url(evals_url)
    _record(backend=evals_backend, database=url.database, port=url.port)

def test_writes_a_row(evals_backend, evals_url):
    _note_database(evals_backend, evals_url)
    engine = create_engine(evals_url)
    with engine.begin() as connection:
        connection.exec_driver_sql("CREATE TABLE note (body TEXT)")
        connection.exec_driver_sql("INSERT INTO note VALUES ('left behind?')")
    engine.dispose()

def test_starts_empty(evals_backend, evals_url):
    _note_database(evals_backend, evals_url)
    engine = create_engine(evals_url)
    assert [] == sa.inspect(engine).get_table_names()
    engine.dispose()

def test_engine_is_migrated(evals_engine):
    assert {"studies", "checkpoints"} <= set(sa.inspect(evals_engine).get_table_names())

def test_needs_no_database():
    pass
"""


@pytest.fixture
def host(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    """A host project with HOST_TESTS and a clean environment for the plugin."""
    for name in (
        "EVALS_ORM_TEST_BACKENDS",
        "EVALS_ORM_TEST_POSTGRES_URL",
        "EVALS_ORM_TEST_MYSQL_URL",
        "EVALS_ORM_SQLD",
    ):
        monkeypatch.delenv(name, raising=False)
    # Unavailable backends fail the inner runs too, so "passed" means it ran.
    monkeypatch.setenv("EVALS_ORM_REQUIRE_BACKENDS", "1")
    monkeypatch.setenv("RECORD", str(pytester.path / "record.jsonl"))
    pytester.makepyfile(test_host=HOST_TESTS)
    return pytester


def _records(pytester: pytest.Pytester) -> list[dict[str, object]]:
    path = pytester.path / "record.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def test_inactive_without_a_selection(host: pytest.Pytester) -> None:
    """With no backend selected nothing is announced or parametrized; the fixtures use sqlite."""
    host.makepyfile(
        test_which="def test_which(evals_backend):\n    assert 'sqlite' == evals_backend\n"
    )

    result = host.runpytest_subprocess("-v")

    result.assert_outcomes(passed=5)
    result.stdout.fnmatch_lines(["*::test_writes_a_row PASSED*"])
    result.stdout.no_fnmatch_line("*evals_orm backends*")
    result.stdout.no_fnmatch_line("*[[]*[]] PASSED*")


def test_unrelated_run_is_unchanged(pytester: pytest.Pytester) -> None:
    """A suite that uses no fixture of the plugin collects and runs exactly as without it."""
    pytester.makepyfile(test_plain="def test_one():\n    pass\n")

    with_plugin = pytester.runpytest_subprocess("--collect-only", "-q")
    without = pytester.runpytest_subprocess("--collect-only", "-q", "-p", "no:evals_orm.testing")

    assert with_plugin.outlines[0] == without.outlines[0] == "test_plain.py::test_one"


def test_loads_with_dash_p(host: pytest.Pytester) -> None:
    """`-p evals_orm.testing` is accepted next to the entry point of the same name."""
    result = host.runpytest_subprocess("-p", "evals_orm.testing", "--evals-backend", "libsql")

    result.assert_outcomes(passed=4)


def test_each_backend_is_a_parametrization_with_its_name(host: pytest.Pytester) -> None:
    """Every test using a fixture runs once per backend, ids are the backend names."""
    result = host.runpytest_subprocess("-v", "--evals-backend", ALL)

    result.assert_outcomes(passed=3 * len(BACKENDS) + 1)
    result.stdout.fnmatch_lines([f"evals_orm backends: {', '.join(BACKENDS)}"])
    for backend in BACKENDS:
        result.stdout.fnmatch_lines([f"*test_engine_is_migrated[[]{backend}[]] PASSED*"])
    result.stdout.fnmatch_lines(["*test_needs_no_database PASSED*"])


@pytest.mark.parametrize(
    ("arguments", "ini", "env"),
    [
        (["--evals-backend", "sqlite", "--evals-backend", "libsql"], "", ""),
        (["--evals-backend", "sqlite,libsql"], "", ""),
        ([], "", "sqlite, libsql"),
        ([], "sqlite,libsql", ""),
        (["--evals-backend", "sqlite,libsql"], "postgresql", "libsql-remote"),
    ],
    ids=["repeated", "comma-list", "env", "ini", "option-wins"],
)
def test_backends_are_chosen_by_option_env_or_ini(
    host: pytest.Pytester,
    monkeypatch: pytest.MonkeyPatch,
    arguments: list[str],
    ini: str,
    env: str,
) -> None:
    """The option (repeatable, comma list), the environment and the ini key select backends."""
    if ini:
        host.makeini(f"[pytest]\nevals_backends = {ini}\n")
    if env:
        monkeypatch.setenv("EVALS_ORM_TEST_BACKENDS", env)

    result = host.runpytest_subprocess("--collect-only", "-q", *arguments)

    ids = [line for line in result.outlines if line.startswith("test_host.py::test_starts_empty")]
    assert [
        "test_host.py::test_starts_empty[sqlite]",
        "test_host.py::test_starts_empty[libsql]",
    ] == ids


def test_unknown_backend_is_a_usage_error(host: pytest.Pytester) -> None:
    """An unknown name stops the run with one line listing the valid ones."""
    result = host.runpytest_subprocess("--evals-backend", "sqlite,oracle")

    assert pytest.ExitCode.USAGE_ERROR == result.ret
    result.stderr.fnmatch_lines(
        [f"*unknown evals_orm backend(s) oracle; choose from {', '.join(BACKENDS)}*"]
    )


@pytest.mark.parametrize(
    ("backend", "option"),
    [
        ("postgresql", "--evals-postgres-url=postgresql://postgres@127.0.0.1:{port}/x"),
        ("libsql-remote", "--evals-sqld=/bin/false"),
        ("mariadb", "--evals-mysql-url=mysql://root@127.0.0.1:{port}/"),
    ],
    ids=["postgresql", "libsql-remote", "mariadb"],
)
def test_unavailable_backend_skips_or_fails_when_strict(
    host: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, backend: str, option: str
) -> None:
    """A backend that cannot run skips its tests loudly, and errors them under strictness."""
    monkeypatch.delenv("EVALS_ORM_REQUIRE_BACKENDS")
    arguments = ["-rs", "--evals-backend", f"sqlite,{backend}", option.format(port=_closed_port())]

    lenient = host.runpytest_subprocess(*arguments)
    strict = host.runpytest_subprocess(*arguments, "--evals-strict")
    monkeypatch.setenv("EVALS_ORM_REQUIRE_BACKENDS", "1")
    strict_by_env = host.runpytest_subprocess(*arguments)

    lenient.assert_outcomes(passed=4, skipped=3)
    assert 3 == lenient.stdout.str().count(f"BACKEND UNAVAILABLE - {backend}: ")
    for result in (strict, strict_by_env):
        result.assert_outcomes(passed=4, errors=3)
        reports = [
            line for line in result.outlines if line.startswith("evals_orm backend unavailable")
        ]
        assert 3 == len(reports)
        assert reports[0].startswith(f"evals_orm backend unavailable (strict): {backend}: ")


def test_databases_are_isolated_and_removed(host: pytest.Pytester) -> None:
    """A row written by one test is absent from the next; no database or sqld outlives the run."""
    result = host.runpytest_subprocess("--evals-backend", ALL)

    result.assert_outcomes(passed=3 * len(BACKENDS) + 1)
    records = _records(host)
    _assert_nothing_left(host, records)
    postgres = [r["database"] for r in records if r["backend"] == "postgresql"]
    assert 2 == len(set(postgres))
    mariadb = [r["database"] for r in records if r["backend"] == "mariadb"]
    assert 2 == len(set(mariadb))


def test_xdist_workers_run_every_backend(host: pytest.Pytester) -> None:
    """Under xdist each worker has its own sqld for all its tests; every test passes once."""
    host.makepyfile(
        test_more="\n".join(
            f"def test_more_{n}(evals_backend, evals_url):\n"
            f"    from test_host import _note_database\n"
            f"    _note_database(evals_backend, evals_url)\n"
            for n in range(6)
        )
    )
    result = host.runpytest_subprocess("-n", "3", "--evals-backend", ALL)

    result.assert_outcomes(passed=(3 + 6) * len(BACKENDS) + 1)
    records = _records(host)
    assert dict.fromkeys(BACKENDS, 8) == Counter(str(r["backend"]) for r in records)
    assert 1 < len({r["worker"] for r in records})
    remote = [r for r in records if r["backend"] == "libsql-remote"]
    ports: dict[object, set[object]] = {}
    for record in remote:
        ports.setdefault(record["worker"], set()).add(record["port"])
    assert all(1 == len(used) for used in ports.values())
    assert len(ports) == len({r["port"] for r in remote})
    _assert_nothing_left(host, records)


def test_failing_test_shows_the_sqld_log(host: pytest.Pytester) -> None:
    """A failing remote libSQL test carries the server's log as a report section."""
    host.makepyfile(test_fails="def test_fails(evals_url):\n    assert False, 'host bug'\n")

    result = host.runpytest_subprocess("test_fails.py", "--evals-backend", "sqlite,libsql-remote")

    result.assert_outcomes(passed=0, failed=2)
    result.stdout.fnmatch_lines(["*- sqld log (*sqld.log) -*", "*sqld*"])
    assert 1 == result.stdout.str().count("sqld log (")


@pytest.mark.skipif(
    not hasattr(evals_orm, "create_async_engine"), reason="evals_orm has no async API yet"
)
def test_async_engine_is_migrated(host: pytest.Pytester) -> None:
    """evals_async_engine reaches a migrated database on every backend, from any event loop."""
    host.makepyfile(
        test_async="""
import asyncio

def test_async(evals_async_engine):
    async def count():
        async with evals_async_engine.connect() as connection:
            result = await connection.exec_driver_sql("SELECT count(*) FROM studies")
            return result.scalar()
    assert 0 == asyncio.run(count())
    assert 0 == asyncio.run(count())
"""
    )

    result = host.runpytest_subprocess("test_async.py", "--evals-backend", ALL)

    result.assert_outcomes(passed=len(BACKENDS))


def test_readme_example_passes_on_every_backend(host: pytest.Pytester) -> None:
    """The README's conftest-free host test runs once per backend and passes."""
    section = README.read_text().split("## Testing your application on every backend")[1]
    example = section.split("```python\n")[1].split("```")[0]
    assert example.startswith("# tests/test_studies.py\n")
    host.makepyfile(test_studies=example)

    result = host.runpytest_subprocess("-v", "test_studies.py", "--evals-backend", ALL)

    result.assert_outcomes(passed=len(BACKENDS))
    for backend in BACKENDS:
        result.stdout.fnmatch_lines([f"*test_a_created_study_can_be_read[[]{backend}[]] PASSED*"])


def _assert_nothing_left(host: pytest.Pytester, records: list[dict[str, object]]) -> None:
    postgres = {str(r["database"]) for r in records if r["backend"] == "postgresql"}
    admin = sa.create_engine("postgresql+psycopg://postgres@127.0.0.1:5432/test")
    with admin.connect() as connection:
        left = connection.execute(
            sa.text("SELECT datname FROM pg_database WHERE datname = ANY(:names)"),
            {"names": sorted(postgres)},
        ).all()
    admin.dispose()
    assert [] == left
    assert postgres
    mariadb = {str(r["database"]) for r in records if r["backend"] == "mariadb"}
    mysql_admin = create_engine("mysql://root@127.0.0.1:3306/")
    with mysql_admin.connect() as connection:
        left = connection.execute(
            sa.text("SELECT schema_name FROM information_schema.schemata"),
        ).all()
    mysql_admin.dispose()
    assert set() == mariadb & {name for (name,) in left}
    assert mariadb
    # Every sqld of the run was started with its --db-path under the host's directory.
    assert [] == [cmd for cmd in _command_lines() if str(host.path) in cmd]


def _command_lines() -> list[str]:
    lines = []
    for entry in Path("/proc").iterdir():
        try:
            lines.append((entry / "cmdline").read_bytes().replace(b"\0", b" ").decode())
        except (OSError, NotADirectoryError):
            continue
    return lines
