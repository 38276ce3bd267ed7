"""The built wheel ships the migrations: it upgrades a database with no source tree around."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(args), cwd=cwd, capture_output=True, text=True, timeout=300, check=False
    )


@pytest.mark.slow
def test_installed_wheel_migrates_without_a_source_tree(tmp_path: Path) -> None:
    """A wheel built from the repo, in a fresh venv, migrates by API and as evals_orm:_alembic."""
    dist = tmp_path / "dist"
    # --no-isolation uses the hatchling already installed, so the build works offline.
    built = _run(
        sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist),
        str(REPO), cwd=tmp_path,
    )  # fmt: skip
    assert 0 == built.returncode, built.stdout + built.stderr
    (wheel,) = dist.glob("evals_orm-*.whl")

    venv = tmp_path / "venv"
    assert 0 == _run(sys.executable, "-m", "venv", str(venv), cwd=tmp_path).returncode
    python = venv / "bin" / "python"
    # The package comes only from the wheel (the repo is not on the venv's path);
    # its dependencies from the test environment, added after the install so pip
    # does not take the test environment's own evals_orm for the wheel.
    installed = _run(
        str(python), "-m", "pip", "install", "--no-deps", "--no-index", "--quiet", str(wheel),
        cwd=tmp_path,
    )  # fmt: skip
    assert 0 == installed.returncode, installed.stdout + installed.stderr
    site = Path(_run(str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))",
                     cwd=tmp_path).stdout.strip())  # fmt: skip
    (site / "test-deps.pth").write_text(sysconfig.get_path("purelib") + "\n")

    work = tmp_path / "work"
    work.mkdir()
    upgraded = _run(
        str(python),
        "-c",
        "import evals_orm; from evals_orm import migrations;"
        "print(evals_orm.__file__, migrations.script_location(), migrations.SCRIPT_LOCATION);"
        "migrations.upgrade('sqlite+libsql:///x.db')",
        cwd=work,
    )
    assert 0 == upgraded.returncode, upgraded.stderr
    module, scripts, location = upgraded.stdout.split()
    assert Path(module).is_relative_to(site)
    assert site / "evals_orm" / "_alembic" == Path(scripts)
    assert "evals_orm:_alembic" == location
    with sqlite3.connect(work / "x.db") as connection:
        tables = {name for (name,) in connection.execute("SELECT name FROM sqlite_master")}
        version = connection.execute("SELECT version_num FROM evals_orm_alembic_version").fetchall()
    assert {"studies", "checkpoints", "eval_events", "eval_tracking"} <= tables
    assert [("evals_orm_0002",)] == version

    # A host's ini section names the installed scripts as the README shows.
    (work / "alembic.ini").write_text(
        "[evals_orm]\nscript_location = evals_orm:_alembic\nsqlalchemy.url = sqlite:///y.db\n"
    )
    for command in (("upgrade", "head"), ("check",)):
        ran = _run(str(python), "-m", "alembic", "-n", "evals_orm", *command, cwd=work)
        assert 0 == ran.returncode, ran.stdout + ran.stderr
    with sqlite3.connect(work / "y.db") as connection:
        version = connection.execute("SELECT version_num FROM evals_orm_alembic_version").fetchall()
    assert [("evals_orm_0002",)] == version
