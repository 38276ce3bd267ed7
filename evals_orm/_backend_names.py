"""The names of the backends every test matrix runs on, in one place.

Read by ``evals_orm.testing``, the project's tests, benchmarks and ``noxfile.py``
(which loads this file by path before the package is installed, so it imports
nothing).
"""

BACKENDS = ("sqlite", "libsql", "libsql-remote", "postgresql", "mariadb")
