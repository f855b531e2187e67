"""The exit codes of the ``pgotask`` command (docs/worker.md, "Exit codes").

Shared by the command, its subcommands and the supervisor of ``--processes``,
which acts on its worker processes' codes.
"""

from __future__ import annotations

EXIT_OK = 0
#: A problem: a failed check, an unexpected error, a role without privileges.
EXIT_ERROR = 1
#: Bad input: arguments, a module path, data the database refuses.
EXIT_USAGE = 2
#: The database cannot be reached (or turned the connection away).
EXIT_UNREACHABLE = 3
#: The library's schema is missing or not at the revision this version expects.
EXIT_SCHEMA = 4


class UsageError(Exception):
    """Bad command-line input: exit code 2."""
