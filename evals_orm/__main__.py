"""``python -m evals_orm``: the ``evals-orm`` command line."""

import sys

from evals_orm.cli import main

if __name__ == "__main__":
    sys.exit(main())
