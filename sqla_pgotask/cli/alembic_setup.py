"""``pgotask alembic setup``: the application's Alembic project made ready for the library.

The work is :func:`sqla_pgotask.alembic_setup.setup`; this module parses the
arguments and prints what changed, then the commands that come next.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from sqla_pgotask._exit_codes import EXIT_ERROR, EXIT_OK
from sqla_pgotask.alembic_helpers import ALEMBIC_CONFIG_ENV, APP_BRANCH_LABEL, AlembicSetupError
from sqla_pgotask.cli.arguments import non_empty


def cmd_alembic_setup(args: argparse.Namespace) -> int:
    """Edit alembic.ini and env.py (made by 'alembic init') so that Alembic runs the library's
    revisions next to yours, and autogenerate your first revision on a branch of its own."""
    # Imported here: Alembic's commands are not worth loading for every other command.
    from sqla_pgotask.alembic_setup import setup

    try:
        result = setup(
            args.config,
            ini_section=args.name,
            branch_label=args.branch_label,
            message=args.message,
        )
    except AlembicSetupError as exc:
        print(f"pgotask: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    for change in result.changes:
        print(change)
    if not result.changes:
        print("nothing to change: alembic.ini, env.py and your branch are set up already")
    if result.revision is not None:
        print("next: check the revision, then run 'alembic upgrade heads'")
    print(f'for your next revisions: alembic revision --autogenerate --head {result.head} -m "..."')
    return EXIT_OK


def add_command(commands: Any) -> None:
    """Add ``pgotask alembic`` (with its one action, ``setup``) to ``commands``."""
    alembic = commands.add_parser(
        "alembic",
        help="set up your Alembic project for the library's revisions",
        description="Your Alembic project and the library's revisions.",
    )
    actions = alembic.add_subparsers(dest="alembic_action", required=True, metavar="ACTION")
    text = "edit alembic.ini and env.py, and make your first revision on a branch of its own"
    parser = actions.add_parser("setup", help=text, description=cmd_alembic_setup.__doc__)
    parser.add_argument(
        "-c",
        "--config",
        default=None,
        metavar="FILE",
        help=f"your alembic.ini (default: ${ALEMBIC_CONFIG_ENV}, else ./alembic.ini)",
    )
    parser.add_argument(
        "-n",
        "--name",
        type=non_empty("the section name"),
        default="alembic",
        help="its section (default: alembic)",
    )
    parser.add_argument(
        "--branch-label",
        type=non_empty("the branch label"),
        default=APP_BRANCH_LABEL,
        help=f"the label of your revisions' branch (default: {APP_BRANCH_LABEL})",
    )
    parser.add_argument(
        "-m",
        "--message",
        default="first revision",
        help="the first revision's message (default: 'first revision')",
    )
    parser.set_defaults(func=cmd_alembic_setup)
