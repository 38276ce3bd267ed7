"""Sessions: ``tests`` on each backend, ``example``, ``lint``, ``typecheck``, ``bench``, ``demo``.

``nox`` runs lint, typecheck, the tests on every backend and the example
host project; the package is installed from the source tree (not imported
from it) in every session.
"""

from __future__ import annotations

import runpy
from pathlib import Path

import nox

nox.options.sessions = ["lint", "typecheck", "tests", "example"]
nox.options.error_on_missing_interpreters = True

# The package is not installed where nox runs; its one list of backends is read
# from a file that imports nothing.
BACKENDS = list(
    runpy.run_path(str(Path(__file__).parent / "evals_orm" / "_backend_names.py"))["BACKENDS"]
)
# Tests that need no database run once, in the first backend's session.
ONCE = BACKENDS[0]
CODE = ["evals_orm", "tests", "benchmarks", "alembic", "examples", "noxfile.py"]


@nox.session
@nox.parametrize("backend", BACKENDS)
def tests(session: nox.Session, backend: str) -> None:
    """Run the test suite against one backend, on the installed package."""
    session.install(".[test]")
    selection = [] if backend == ONCE else ["-m", "not backend_independent"]
    # Every test has its own database (remote libSQL: its own sqld per worker),
    # so the tests run in parallel safely.
    session.run("pytest", "-n", "auto", "--evals-backend", backend, *selection, *session.posargs)


@nox.session
def example(session: nox.Session) -> None:
    """Run the example host project's own tests on every backend, as a host would."""
    session.install(".[testing]")
    session.chdir("examples/host_app")
    session.run("pytest", "-n", "2", "--evals-backend", ",".join(BACKENDS), *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """Check style and formatting with ruff."""
    session.install("ruff")
    session.run("ruff", "check", *CODE)
    session.run("ruff", "format", "--check", *CODE)


@nox.session
def typecheck(session: nox.Session) -> None:
    """Type-check everything with mypy --strict."""
    session.install(".[test]", "mypy", "nox")
    session.run("mypy", "--strict")


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmark the projection against the raw driver and a naive ORM loop, decoding, waits."""
    session.install(".[testing]")
    session.run("python", "benchmarks/bench.py", *session.posargs)
    session.run("python", "benchmarks/decode.py")
    session.run("python", "benchmarks/decode.py", "--nanoseconds")
    session.run("python", "benchmarks/rebuild_wait.py")
    # Issue 19: a follower's latency and idle CPU (its own script: it runs processes).
    session.run("python", "benchmarks/follow_latency.py")


@nox.session
def demo(session: nox.Session) -> None:
    """Run `evals-orm demo` on the embedded default database."""
    session.install(".")
    session.run("evals-orm", "demo", *session.posargs)
