"""A griffe extension that lets Markdown render the library's reST-flavoured docstrings.

The docstrings use Sphinx roles (``:meth:`run```, ``:class:`~sqla_pgotask.Task```)
and literal blocks introduced by ``::``.  Markdown already renders the
double-backtick code and the indented blocks; this turns each role into plain
code (the last component when the target starts with ``~``) and each ``::``
into ``:``.  The docstrings themselves stay as they are for ``help()``.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(?:attr|class|data|exc|func|meth|mod|obj):`(~?)([^`]+)`")
_LITERAL = re.compile(r"(\S)::$|^\s*::$", re.MULTILINE)


def _role(match: re.Match[str]) -> str:
    target = match.group(2)
    if match.group(1):
        target = target.rsplit(".", 1)[-1]
    return f"`{target}`"


def _literal(match: re.Match[str]) -> str:
    return f"{match.group(1)}:" if match.group(1) else ""


def convert(text: str) -> str:
    """The docstring ``text`` with its Sphinx roles and ``::`` markers made Markdown."""
    return _LITERAL.sub(_literal, _ROLE.sub(_role, text))


class RestDocstrings(griffe.Extension):
    """Rewrite each loaded object's docstring with :func:`convert`."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = convert(obj.docstring.value)
