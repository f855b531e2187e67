"""An application's Alembic ``env.py``: passing the library's ``include_name`` to it.

:func:`plan` recognises the ``env.py`` of Alembic's templates (``generic``,
``async``: one ``context.configure(...)`` call for offline mode, with ``url=``,
and one for online mode, with ``connection=``), and adds the import and the
``include_name=include_name`` argument to both calls, changing nothing else.
An ``env.py`` it does not recognise is refused with what to add by hand.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

from sqla_pgotask.alembic_helpers import AlembicSetupError

IMPORT = "from sqla_pgotask.alembic_helpers import include_name"
ARGUMENT = "include_name=include_name"
_HELPERS = "sqla_pgotask.alembic_helpers"
_COMBINE = "combine_include_name"

_BY_HAND = (
    f"add `{IMPORT}` near the top, and pass `{ARGUMENT}` to every context.configure(...) "
    "call (offline and online mode)"
)


@dataclass(frozen=True)
class EnvPlan:
    """What :func:`plan` would write, and why."""

    #: The new source (the old one if nothing needs to change).
    source: str
    #: One line per change, for the user.
    changes: tuple[str, ...]
    #: ``target_metadata`` is never set to anything but ``None``: autogenerate cannot work.
    no_metadata: bool


def plan(path: Path, source: str) -> EnvPlan:
    """The edit of ``env.py`` (at ``path``, holding ``source``) that passes ``include_name``."""
    try:
        tree = ast.parse(source, filename=str(path))
    except SyntaxError as exc:
        raise AlembicSetupError(f"{path} does not parse ({exc.msg}, line {exc.lineno})") from None
    calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call) and _is_configure(node)]
    _recognise(path, calls)
    bound = _module_binding(tree)
    if bound == "other":
        raise AlembicSetupError(
            f"{path} defines a name include_name of its own: keep it, and pass "
            f"`include_name=combine_include_name(<your hook>)` (from {_HELPERS} import "
            f"{_COMBINE}) to every context.configure(...) call instead"
        )
    encoded = source.encode("utf-8")
    starts = _line_starts(encoded)
    insertions: list[tuple[int, bytes]] = []
    changes: list[str] = []
    for call in calls:
        given = next((kw for kw in call.keywords if kw.arg == "include_name"), None)
        if given is None:
            insertions.extend(_argument_insertions(call, encoded, starts))
            changes.append(
                f"{path}: pass {ARGUMENT} to context.configure(...) (line {call.lineno})"
            )
        elif not _is_ours(given.value, bound):
            raise AlembicSetupError(
                f"{path} passes its own include_name hook to context.configure(...) "
                f"(line {call.lineno}): chain it with the library's, "
                f"`include_name=combine_include_name(<your hook>)` (from {_HELPERS} import "
                f"{_COMBINE}), so autogenerate never proposes to drop the library's tables"
            )
    if insertions and bound != "ours":
        insertions.append((starts[_import_line(tree)], (IMPORT + "\n").encode()))
        changes.insert(0, f"{path}: import include_name from {_HELPERS}")
    for offset, text in sorted(insertions, reverse=True):
        encoded = encoded[:offset] + text + encoded[offset:]
    new_source = encoded.decode("utf-8")
    if changes:
        # What was written must be what a second run finds nothing to do in.
        again = plan(path, new_source)
        assert not again.changes, again.changes
    return EnvPlan(new_source, tuple(changes), _no_metadata(tree))


def _is_configure(node: ast.Call) -> bool:
    return (
        isinstance(node.func, ast.Attribute)
        and node.func.attr == "configure"
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id == "context"
    )


def _recognise(path: Path, calls: list[ast.Call]) -> None:
    """Refuse an ``env.py`` that is not shaped like Alembic's templates."""
    keywords = [{kw.arg for kw in call.keywords} for call in calls]
    offline = [kws for kws in keywords if "url" in kws or "dialect_name" in kws]
    online = [kws for kws in keywords if "connection" in kws]
    odd = [call for call in calls if call.args or any(kw.arg is None for kw in call.keywords)]
    if odd:
        raise AlembicSetupError(
            f"{path}: context.configure(...) at line {odd[0].lineno} takes positional or "
            f"**keyword arguments, so include_name cannot be added safely: {_BY_HAND}"
        )
    if len(calls) != 2 or len(offline) != 1 or len(online) != 1:
        raise AlembicSetupError(
            f"{path} is not shaped like Alembic's env.py (found {len(calls)} "
            "context.configure(...) call(s), expected one with url= for offline mode and "
            f"one with connection= for online mode): {_BY_HAND}"
        )


def _module_binding(tree: ast.Module) -> str | None:
    """How the module binds ``include_name``: ``"ours"`` (imported from the helpers or made
    by ``combine_include_name``), ``"combine"`` (only ``combine_include_name`` imported),
    ``"other"``, or ``None``."""
    found: str | None = None
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            for alias in node.names:
                name = alias.asname or alias.name
                if name == "include_name":
                    ours = node.module == _HELPERS and alias.name == "include_name"
                    found = "ours" if ours else "other"
                elif alias.name == _COMBINE and node.module == _HELPERS and found is None:
                    found = "combine"
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            if node.name == "include_name":
                found = "other"
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == "include_name" for t in targets):
                value = node.value
                found = "ours" if value is not None and _calls_combine(value) else "other"
    return found


def _calls_combine(node: ast.expr) -> bool:
    if not isinstance(node, ast.Call):
        return False
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
    return name == _COMBINE


def _is_ours(value: ast.expr, bound: str | None) -> bool:
    if isinstance(value, ast.Name) and value.id == "include_name":
        return bound == "ours"
    return _calls_combine(value)


def _no_metadata(tree: ast.Module) -> bool:
    values = [
        node.value
        for node in tree.body
        if isinstance(node, ast.Assign)
        and any(isinstance(t, ast.Name) and t.id == "target_metadata" for t in node.targets)
    ]
    return bool(values) and all(
        isinstance(value, ast.Constant) and value.value is None for value in values
    )


def _line_starts(encoded: bytes) -> list[int]:
    """Byte offset of each line (1-based, as ast numbers them; one past the end too)."""
    starts = [0, 0]
    for index, byte in enumerate(encoded):
        if byte == ord("\n"):
            starts.append(index + 1)
    starts.append(len(encoded))
    return starts


def _import_line(tree: ast.Module) -> int:
    """The line to put the import on: after ``from alembic import context``, or after the
    module's first imports."""
    for node in tree.body:
        names = node.names if isinstance(node, ast.ImportFrom) else []
        if getattr(node, "module", None) == "alembic" and any(a.name == "context" for a in names):
            return (node.end_lineno or node.lineno) + 1
    last_import = None
    for node in tree.body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            last_import = node
        elif last_import is not None or not _is_docstring(node):
            break
    return 1 if last_import is None else (last_import.end_lineno or last_import.lineno) + 1


def _is_docstring(node: ast.stmt) -> bool:
    return (
        isinstance(node, ast.Expr)
        and isinstance(node.value, ast.Constant)
        and isinstance(node.value.value, str)
    )


def _argument_insertions(
    call: ast.Call, encoded: bytes, starts: list[int]
) -> list[tuple[int, bytes]]:
    """Where and what to insert to pass ``include_name`` to ``call``, in its own style: on
    a line of its own when each argument has one, else after the last argument."""
    last = max(call.keywords, key=lambda kw: (kw.end_lineno or 0, kw.end_col_offset or 0))
    assert last.end_lineno is not None and last.end_col_offset is not None
    assert call.end_lineno is not None
    end = starts[last.end_lineno] + last.end_col_offset
    rest = encoded[end:]
    has_comma = rest.lstrip(b" \t").startswith(b",")
    indent = encoded[starts[last.lineno] : starts[last.lineno] + last.col_offset]
    argument = ARGUMENT.encode()
    if not indent.strip() and call.end_lineno > last.end_lineno:
        line = (starts[last.end_lineno + 1], indent + argument + b",\n")
        return [line] if has_comma else [(end, b","), line]
    if has_comma:
        return [(end + rest.index(b",") + 1, b" " + argument + b",")]
    return [(end, b", " + argument)]
