"""What the ``pgotask`` command prints: text safe for a terminal, and exact JSON.

Kinds, queues, error messages and tracebacks come from the database, where
anyone who can insert a task may have put an ANSI escape sequence, a
carriage return or a Unicode direction override.  On a terminal they are
printed as escapes (``\\x1b``, ``\\r``, ``\\u202e``) so that they cannot
rewrite the screen or disguise what is shown; ``--json`` prints them
exactly, as JSON string escapes.
"""

from __future__ import annotations

import json
import math
from typing import Any

from sqla_pgotask.cli.database import RawJSON

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
# C0 and C1 controls and DEL; line and paragraph separators; the bidirectional
# formatting characters (what "Trojan Source" text uses).
_ESCAPED = [
    *range(0x20),
    0x7F,
    *range(0x80, 0xA0),
    0x061C,
    0x200E,
    0x200F,
    0x2028,
    0x2029,
    *range(0x202A, 0x202F),
    *range(0x2066, 0x206A),
]
_ESCAPES = {
    code: _NAMED.get(chr(code), f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
    for code in _ESCAPED
}


def terminal_text(value: object) -> str:
    """``str(value)`` with its control and direction characters as visible escapes."""
    return str(value).translate(_ESCAPES)


def dump_json(value: Any, **options: Any) -> str:
    """``json.dumps(value)``, exact JSON: :class:`RawJSON` as its text, no NaN or Infinity.

    A non-finite float (an age measured from ``-infinity``) becomes ``null``,
    as JavaScript's ``JSON.stringify`` does.
    """
    raw: list[str] = []

    def placeholder(obj: object) -> str:
        if isinstance(obj, RawJSON):
            raw.append(obj.text)
            # No string read from PostgreSQL holds a NUL: the mark cannot collide.
            return f"\x00{len(raw) - 1}\x00"
        raise TypeError(f"{type(obj).__name__} is not JSON serializable")

    text = json.dumps(_finite(value), default=placeholder, allow_nan=False, **options)
    for number, original in enumerate(raw):
        text = text.replace(json.dumps(f"\x00{number}\x00"), original, 1)
    return text


def _finite(value: Any) -> Any:
    """``value`` with its non-finite floats as ``None`` (no deeper than :data:`MAX_JSON_DEPTH`)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite(item) for item in value]
    return value
