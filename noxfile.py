"""Sessions: ``tests`` on each backend, ``lint``, ``typecheck``, ``bench``, ``demo``.

``nox`` runs lint, typecheck and the tests on all four backends; the package
is installed from the source tree (not imported from it) in every session.
"""

from __future__ import annotations

import nox

nox.options.sessions = ["lint", "typecheck", "tests"]
nox.options.error_on_missing_interpreters = True

BACKENDS = ["sqlite", "libsql", "libsql-remote", "postgresql"]
# Tests that need no database run once, in the first backend's session.
ONCE = "sqlite"
CODE = ["evals_orm", "tests", "benchmarks", "alembic", "noxfile.py"]


@nox.session
@nox.parametrize("backend", BACKENDS)
def tests(session: nox.Session, backend: str) -> None:
    """Run the test suite against one backend, on the installed package."""
    session.install(".[test]")
    selection = [] if backend == ONCE else ["-m", "not backend_independent"]
    # Every test has its own database, so the tests run in parallel safely.
    session.run("pytest", "-n", "auto", "--backend", backend, *selection, *session.posargs)


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
    """Benchmark the projection against the raw driver and a naive ORM loop."""
    session.install(".")
    session.run("python", "benchmarks/bench.py", *session.posargs)


@nox.session
def demo(session: nox.Session) -> None:
    """Run `evals-orm demo` on the embedded default database."""
    session.install(".")
    session.run("evals-orm", "demo", *session.posargs)
