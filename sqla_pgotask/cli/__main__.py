"""``python -m sqla_pgotask.cli``: the ``pgotask`` command."""

import sys

from sqla_pgotask.cli import main

if __name__ == "__main__":
    sys.exit(main())
