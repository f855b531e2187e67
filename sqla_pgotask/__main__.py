"""``python -m sqla_pgotask``: the ``pgotask`` command (how the supervisor starts workers)."""

import sys

from sqla_pgotask.cli import main

if __name__ == "__main__":
    sys.exit(main())
