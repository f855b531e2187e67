"""Where a tracing integration plugs into enqueueing.

The core imports no tracing library.  :mod:`sqla_pgotask.otel` installs a
provider here, a function returning the current trace context as a mapping
of propagation headers (``{"traceparent": ...}``, empty outside a span);
:func:`~sqla_pgotask.add_many` stores it in ``Task.trace_context``, and the
ORM listener that ``sqla_pgotask.otel`` registers on ``Task`` does the same
for ``session.add``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping

ContextProvider = Callable[[], Mapping[str, str]]

_provider: ContextProvider | None = None


def set_provider(provider: ContextProvider | None) -> None:
    """Install ``provider`` (``None``: record no trace context)."""
    global _provider  # noqa: PLW0603 - one process-wide setting, like a propagator
    _provider = provider


def current() -> dict[str, str] | None:
    """The trace context to record in a task enqueued now, or ``None``."""
    provider = _provider
    if provider is None:
        return None
    carrier = dict(provider())
    return carrier or None


def current_json() -> str | None:
    """:func:`current`, as JSON text (a statement parameter)."""
    carrier = current()
    return None if carrier is None else json.dumps(carrier)
