"""An application's ``alembic.ini``: where Alembic looks for revisions, and mending it.

Alembic splits ``version_locations`` with the separator that ``path_separator``
names (``version_path_separator`` before Alembic 1.16).  ``alembic init`` writes
``os``, which is ``:`` on POSIX and cuts the library's package-resource entry
``sqla_pgotask:migrations/versions`` in two; Alembic then skips the pieces,
which are not folders, without a word.  :func:`read` sees the file as the
installed Alembic does, :func:`problem` names that mistake (and the others that
hide the library's revisions), and :func:`plan` computes the edit that mends
it, keeping the file's comments and layout.
"""

from __future__ import annotations

import configparser
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from alembic.config import Config

from sqla_pgotask.alembic_helpers import VERSION_LOCATION, AlembicSetupError

#: What each separator value means to Alembic.
SEPARATORS = {"space": " ", "newline": "\n", "os": os.pathsep, ":": ":", ";": ";"}

# Alembic 1.16 renamed version_path_separator to path_separator (which splits
# prepend_sys_path too) and added Config.get_version_locations_list with it.
NEW_SEPARATOR_OPTION = hasattr(Config, "get_version_locations_list")
SEPARATOR_OPTION = "path_separator" if NEW_SEPARATOR_OPTION else "version_path_separator"
_LEGACY_OPTION = "version_path_separator"

# Without a separator option Alembic falls back to these splits.
_LEGACY_SPLIT = re.compile(r", *|(?: +)")
_LEGACY_SYS_PATH_SPLIT = re.compile(r", *|(?: +)|\:")

# The value `alembic init` leaves in sqlalchemy.url.
PLACEHOLDER_URL = "driver://user:pass@localhost/dbname"

_OPTION_LINE = re.compile(r"(?P<option>[^=:\s][^=:]*?)\s*[=:]")


@dataclass(frozen=True)
class Separator:
    """The option that tells Alembic how to split ``version_locations``, as it stands."""

    option: str
    value: str

    @property
    def char(self) -> str | None:
        """The character Alembic splits at, or ``None`` for a value it rejects."""
        return SEPARATORS.get(self.value)

    def __str__(self) -> str:
        return f"{self.option} = {self.value}"


@dataclass(frozen=True)
class AlembicIni:
    """One section of an ``alembic.ini``, read as the installed Alembic reads it."""

    path: Path
    section: str
    text: str
    parser: configparser.ConfigParser

    def raw(self, option: str) -> str | None:
        """The option's text as written (``%(here)s`` not expanded)."""
        return self.parser.get(self.section, option, raw=True, fallback=None)

    def value(self, option: str) -> str | None:
        """The option's value, ``%(here)s`` expanded."""
        return self.parser.get(self.section, option, fallback=None)

    def separator(self) -> Separator | None:
        """The separator option Alembic applies to ``version_locations``, if any."""
        names = (SEPARATOR_OPTION, _LEGACY_OPTION) if NEW_SEPARATOR_OPTION else (_LEGACY_OPTION,)
        for name in names:
            value = self.value(name)
            if value is not None:
                return Separator(name, value)
        return None

    def version_locations(self) -> list[str] | None:
        """``version_locations`` split as Alembic splits it (``None`` if not set)."""
        value = self.value("version_locations")
        if not value:
            return None
        separator = self.separator()
        if separator is None:
            return _LEGACY_SPLIT.split(value)
        if separator.char is None:
            raise AlembicSetupError(
                f"{self.path}: {separator.option} = {separator.value!r} is not a separator "
                f"Alembic knows (it expects one of {', '.join(SEPARATORS)} alone on the line)"
            )
        return [part.strip() for part in value.split(separator.char) if part]

    def sys_paths(self) -> list[str] | None:
        """``prepend_sys_path`` split as Alembic splits it (``None`` if not set)."""
        value = self.value("prepend_sys_path")
        if not value:
            return None
        char = SEPARATORS.get(self.value(SEPARATOR_OPTION) or "")
        if not NEW_SEPARATOR_OPTION or char is None:
            return _LEGACY_SYS_PATH_SPLIT.split(value)
        return [part.strip() for part in value.split(char) if part]


def read(path: Path, section: str = "alembic", text: str | None = None) -> AlembicIni:
    """The ``[section]`` of the ini file at ``path`` (or of ``text``, as if it were there)."""
    if text is None:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise AlembicSetupError(f"cannot read {path}: {exc.strerror}") from None
    # Alembic's own %(here)s: the folder of the ini file.
    parser = configparser.ConfigParser({"here": path.absolute().parent.as_posix()})
    try:
        parser.read_string(text, source=str(path))
    except configparser.Error as exc:
        raise AlembicSetupError(f"{path} is not a valid ini file: {exc}") from None
    if not parser.has_section(section):
        raise AlembicSetupError(f"{path} has no [{section}] section")
    return AlembicIni(path, section, text, parser)


@dataclass(frozen=True)
class IniPlan:
    """What :func:`plan` would write, and why."""

    #: The new text of the file (the old one if nothing needs to change).
    text: str
    #: One line per change, for the user.
    changes: tuple[str, ...]
    #: The application's own ``version_locations`` entries (``%(here)s`` expanded).
    app_locations: tuple[str, ...]
    #: The lines to set in the section, as a person would type them.
    lines: tuple[str, ...]


def problem(ini: AlembicIni) -> str | None:
    """What keeps Alembic from seeing the library's revisions with this file, or ``None``.

    The answer names the lines to set in the file.
    """
    if ini.value("script_location") is None:
        return None
    try:
        seen = ini.version_locations()
    except AlembicSetupError as exc:
        return f"{exc}: {_fix(ini)}"
    if seen is not None and VERSION_LOCATION in seen:
        return None
    named = VERSION_LOCATION in (ini.value("version_locations") or "")
    if seen is None:
        what = f"{ini.path} has no version_locations, so Alembic reads only the revisions in "
        what += "the versions folder of script_location"
    elif named:
        separator = ini.separator()
        split_by = (
            f"{separator} splits it at {separator.char!r}"
            if separator is not None
            else "Alembic splits it at spaces and commas"
        )
        what = (
            f"{ini.path} names {VERSION_LOCATION!r} in version_locations, but {split_by}, so "
            f"Alembic reads the entries {seen!r} and silently skips the ones that are not "
            "folders: it never sees the library's revisions"
        )
    else:
        what = f"{ini.path}: version_locations does not name {VERSION_LOCATION!r}"
    return f"{what}: {_fix(ini)}"


def _fix(ini: AlembicIni) -> str:
    try:
        lines = plan(ini).lines
    except AlembicSetupError as exc:
        return str(exc)
    return (
        f"in its [{ini.section}] section, set {'; '.join(repr(line) for line in lines)} "
        "(or run 'pgotask alembic setup')"
    )


def plan(ini: AlembicIni) -> IniPlan:
    """The edit that makes Alembic read the library's revisions next to the application's."""
    script_location = ini.raw("script_location")
    if script_location is None:
        pyproject = ini.path.parent / "pyproject.toml"
        if pyproject.is_file() and "[tool.alembic]" in pyproject.read_text(encoding="utf-8"):
            raise AlembicSetupError(
                f"{ini.path} has no script_location: this project keeps its Alembic settings "
                f"in {pyproject} ([tool.alembic]), which this command does not edit. Add "
                f'"{VERSION_LOCATION}" to the version_locations list there by hand (a TOML '
                "list has no separator to get wrong), next to your own versions folder"
            )
        raise AlembicSetupError(
            f"{ini.path} has no script_location in [{ini.section}]: not an Alembic "
            "configuration (run 'alembic init migrations' first, or name the right "
            "file and section)"
        )
    if _works(ini):
        seen = ini.version_locations() or []
        return IniPlan(
            text=ini.text,
            changes=(),
            app_locations=tuple(entry for entry in seen if entry != VERSION_LOCATION),
            lines=(),
        )
    entries = _own_entries(ini, script_location)
    separator = ini.separator()
    sys_paths = ini.sys_paths()
    for candidate in _candidates(separator):
        text, lines = _render(ini, entries, candidate, sys_paths)
        planned = read(ini.path, ini.section, text)
        expected = [*_expand(ini, entries), VERSION_LOCATION]
        if planned.version_locations() == expected and planned.sys_paths() == sys_paths:
            break
    else:
        raise AlembicSetupError(
            f"{ini.path}: no separator Alembic knows can list the version_locations entries "
            f"{[*entries, VERSION_LOCATION]!r} (and prepend_sys_path {sys_paths!r}): add "
            f"{VERSION_LOCATION!r} to version_locations by hand"
        )
    changes = _describe(ini, planned)
    return IniPlan(
        text=text if changes else ini.text,
        changes=tuple(changes),
        app_locations=tuple(_expand(ini, entries)),
        lines=tuple(lines),
    )


def _works(ini: AlembicIni) -> bool:
    """Alembic reads the library's entry and one of the application's, and (from 1.16 on)
    no deprecation warning says that ``path_separator`` is missing."""
    try:
        seen = ini.version_locations()
    except AlembicSetupError:
        return False
    explicit = not NEW_SEPARATOR_OPTION or ini.value(SEPARATOR_OPTION) is not None
    own = [entry for entry in seen or () if entry != VERSION_LOCATION]
    return seen is not None and VERSION_LOCATION in seen and bool(own) and explicit


def _own_entries(ini: AlembicIni, script_location: str) -> list[str]:
    """The application's entries of ``version_locations``, as written."""
    raw = ini.raw("version_locations")
    if not raw or not raw.strip():
        # What Alembic reads when version_locations is not set.
        return [script_location.rstrip("/") + "/versions"]
    rest = raw.replace(VERSION_LOCATION, " ")
    separator = ini.separator()
    char = None if separator is None else separator.char
    if separator is not None and char is None:
        # Alembic 1.13's template: "version_path_separator = os  # Use os.pathsep. ...",
        # an inline comment Alembic takes as part of the value.
        char = SEPARATORS.get(separator.value.split("#", 1)[0].strip())
        if char is None:
            raise AlembicSetupError(
                f"{ini.path}: {separator.option} = {separator.value!r} is not a separator "
                f"Alembic knows: set {SEPARATOR_OPTION} = space and list version_locations "
                f"separated by spaces, {VERSION_LOCATION!r} among them"
            )
    parts = _LEGACY_SPLIT.split(rest) if char is None else rest.split(char)
    entries = [part.strip() for part in parts if part.strip()]
    # version_locations replaces the default folder: keep the application's own.
    return entries or [script_location.rstrip("/") + "/versions"]


def _candidates(current: Separator | None) -> list[str]:
    """Separator values to try, the one in place first (if it is the right option)."""
    values = ["space", ";"]
    if NEW_SEPARATOR_OPTION:
        values.append("newline")
    if current is not None and current.option == SEPARATOR_OPTION and current.char is not None:
        values.insert(0, current.value)
    return list(dict.fromkeys(values))


def _expand(ini: AlembicIni, entries: Sequence[str]) -> list[str]:
    """``entries`` with ``%(...)s`` expanded, as they would be in the file's section."""
    probe = configparser.ConfigParser({"here": ini.path.absolute().parent.as_posix()})
    probe.read_string(ini.text)
    names = [f"pgotask probe {i}" for i in range(len(entries))]
    probe.read_dict({ini.section: dict(zip(names, entries, strict=True))})
    try:
        return [probe.get(ini.section, name) for name in names]
    except configparser.Error as exc:
        raise AlembicSetupError(f"{ini.path}: cannot read version_locations: {exc}") from None


def _render(
    ini: AlembicIni, entries: Sequence[str], separator: str, sys_paths: list[str] | None
) -> tuple[str, list[str]]:
    """The file with ``version_locations``, the separator and (if needed) ``prepend_sys_path``
    set; and the lines set, for the user."""
    char = SEPARATORS[separator]
    lines = ini.text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    edit = _Section(lines, ini.section)
    values = [*entries, VERSION_LOCATION]
    if separator == "newline":
        location_lines = ["version_locations =\n", *(f"    {value}\n" for value in values)]
    else:
        location_lines = [f"version_locations = {char.join(values)}\n"]
    shown = [f"{SEPARATOR_OPTION} = {separator}", "".join(location_lines).rstrip("\n")]
    after = edit.set("version_locations", location_lines, after_comment="version_locations")
    edit.set(SEPARATOR_OPTION, [f"{SEPARATOR_OPTION} = {separator}\n"], after=after)
    if NEW_SEPARATOR_OPTION:
        # Superseded by path_separator; left in place it would only mislead.
        edit.remove(_LEGACY_OPTION)
        raw_paths = ini.raw("prepend_sys_path")
        if sys_paths is not None and raw_paths is not None and len(sys_paths) > 1:
            # path_separator splits prepend_sys_path too: keep its entries apart.
            joined = char.join(_split_raw_sys_paths(ini, raw_paths))
            edit.set("prepend_sys_path", [f"prepend_sys_path = {joined}\n"])
            shown.append(f"prepend_sys_path = {joined}")
    return "".join(edit.lines), shown


def _split_raw_sys_paths(ini: AlembicIni, raw: str) -> list[str]:
    char = SEPARATORS.get(ini.value(SEPARATOR_OPTION) or "")
    parts = _LEGACY_SYS_PATH_SPLIT.split(raw) if char is None else raw.split(char)
    return [part.strip() for part in parts if part.strip()]


def _describe(ini: AlembicIni, planned: AlembicIni) -> list[str]:
    """What differs between the file and the plan, one line each."""
    changes = []
    for option in ("version_locations", SEPARATOR_OPTION, _LEGACY_OPTION, "prepend_sys_path"):
        before, after = ini.raw(option), planned.raw(option)
        if before == after:
            continue
        after_text = " ".join((after or "").split())
        if before is None:
            changes.append(f"{ini.path}: set {option} = {after_text}")
        elif after is None:
            changes.append(f"{ini.path}: removed {option} = {before} (path_separator replaces it)")
        else:
            changes.append(f"{ini.path}: {option} = {' '.join(before.split())} -> {after_text}")
    return changes


class _Section:
    """Line-level edits of one section of an ini file, as :mod:`configparser` reads it."""

    def __init__(self, lines: list[str], section: str) -> None:
        self.lines = lines
        self.section = section

    def _bounds(self) -> tuple[int, int]:
        start = None
        for index, line in enumerate(self.lines):
            stripped = line.strip()
            header = stripped.startswith("[") and stripped.endswith("]") and line[:1] == "["
            if header and start is None and stripped[1:-1] == self.section:
                start = index + 1
            elif header and start is not None:
                return start, index
        if start is None:
            raise AlembicSetupError(f"no [{self.section}] section")
        return start, len(self.lines)

    def _find(self, option: str) -> tuple[int, int] | None:
        """The lines of ``option`` (with its continuation lines), as ``[first, end)``."""
        start, stop = self._bounds()
        for index in range(start, stop):
            line = self.lines[index]
            found = _OPTION_LINE.match(line)
            if line[:1].isspace() or found is None or line.lstrip()[:1] in "#;":
                continue
            if found.group("option").strip().lower() != option:
                continue
            end = index + 1
            for follow in range(index + 1, stop):
                text = self.lines[follow]
                if not text.strip() or text.lstrip()[:1] in "#;":
                    continue
                if not text[:1].isspace():
                    break
                end = follow + 1
            return index, end
        return None

    def set(
        self,
        option: str,
        new: list[str],
        *,
        after: int | None = None,
        after_comment: str | None = None,
    ) -> int:
        """Replace ``option`` or add it; return the index past its last line."""
        found = self._find(option)
        if found is not None:
            first, end = found
            if self.lines[first:end] != new:
                self.lines[first:end] = new
            return first + len(new)
        start, stop = self._bounds()
        where = after
        if where is None and after_comment is not None:
            commented = re.compile(rf"#\s*{re.escape(after_comment)}\s*=")
            for index in range(start, stop):
                if commented.match(self.lines[index]):
                    where = index + 1
                    break
        if where is None:
            script = self._find("script_location")
            where = script[1] if script is not None else start
        self.lines[where:where] = new
        return where + len(new)

    def remove(self, option: str) -> None:
        """Remove ``option`` (with its continuation lines), if present."""
        found = self._find(option)
        if found is not None:
            del self.lines[found[0] : found[1]]
