"""The runnable examples in ``docs/``: every Python block whose first line is ``# example: NAME``.

Each runs as a script in a process of its own, with ``PGOTASK_DATABASE_URL``
naming a fresh migrated database, and must exit 0.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.processes import PROJECT_ROOT, pgotask_env

DOCS = PROJECT_ROOT / "docs"
_BLOCK = re.compile(r"^```python\n(# example: ([\w-]+)\n.*?)^```$", re.MULTILINE | re.DOTALL)


def _examples() -> list[tuple[str, str]]:
    found = []
    for page in sorted(DOCS.glob("*.md")):
        for match in _BLOCK.finditer(page.read_text(encoding="utf-8")):
            found.append((f"{page.stem}:{match.group(2)}", match.group(1)))
    return found


EXAMPLES = _examples()


def test_the_docs_have_runnable_examples() -> None:
    names = {name for name, _ in EXAMPLES}
    assert "deduplication:deduplication" in names
    assert len(names) == len(EXAMPLES), "two examples share a name"


@pytest.mark.parametrize(("name", "source"), EXAMPLES, ids=[name for name, _ in EXAMPLES])
def test_example_runs(name: str, source: str, database_url: str, tmp_path: Path) -> None:
    script = tmp_path / f"{name.replace(':', '_')}.py"
    script.write_text(source, encoding="utf-8")
    done = subprocess.run(
        [sys.executable, str(script)],
        cwd=PROJECT_ROOT,
        env=pgotask_env(database_url),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, f"{name} failed:\n{done.stdout}\n{done.stderr}"
