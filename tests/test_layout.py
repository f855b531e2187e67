"""The package's layers depend one way, and the old import paths keep working.

models and enqueue → engine → runners and maintenance (``worker/``) → admin
→ CLI; ``config/`` holds plain values any layer may use.  The graph is built
from each module's module-level imports (``if TYPE_CHECKING:`` blocks and
imports inside functions are left out: they run later, or never).
"""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "sqla_pgotask"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _top_level_imports(body: list[ast.stmt]) -> list[ast.Import | ast.ImportFrom]:
    found: list[ast.Import | ast.ImportFrom] = []
    for node in body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        elif isinstance(node, ast.If) and not _is_type_checking(node):
            found += _top_level_imports(node.body) + _top_level_imports(node.orelse)
        elif isinstance(node, ast.Try):
            found += _top_level_imports(node.body)
    return found


def _graph() -> dict[str, set[str]]:
    """Each sqla_pgotask module and the sqla_pgotask modules it imports when imported."""
    paths = [p for p in PACKAGE.rglob("*.py") if "migrations" not in p.parts]
    modules = {_module_name(p): p for p in paths}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets: set[str] = set()
        for node in _top_level_imports(ast.parse(path.read_text(encoding="utf-8")).body):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif node.module is not None and node.level == 0:
                targets.add(node.module)
                targets.update(f"{node.module}.{a.name}" for a in node.names)
        edges: set[str] = set()
        for target in targets:
            if not target.startswith("sqla_pgotask"):
                continue
            # Importing a.b.c runs a/__init__ and a/b/__init__ first.
            parts = target.split(".")
            for i in range(1, len(parts) + 1):
                prefix = ".".join(parts[:i])
                # A module's own packages are imported before it, not by it.
                if prefix in modules and not (name + ".").startswith(prefix + "."):
                    edges.add(prefix)
        graph[name] = edges
    return graph


GRAPH = _graph()


def _imports(prefix: str) -> dict[str, set[str]]:
    return {m: deps for m, deps in GRAPH.items() if m == prefix or m.startswith(prefix + ".")}


def _external_imports(module: str) -> set[str]:
    path = next(p for p in PACKAGE.rglob("*.py") if _module_name(p) == module)
    names: set[str] = set()
    for node in _top_level_imports(ast.parse(path.read_text(encoding="utf-8")).body):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif node.module is not None:
            names.add(node.module)
    return names


def test_there_are_no_import_cycles() -> None:
    # Depth-first search; a grey node met again closes a cycle.
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        stack.append(module)
        for dep in sorted(GRAPH[module]):
            if state.get(dep) == 1:
                cycle = [*stack[stack.index(dep) :], dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[module] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module)


def test_config_is_plain_values() -> None:
    allowed = {"sqla_pgotask.errors", "sqla_pgotask.models", "sqla_pgotask._validation"}
    for module, deps in _imports("sqla_pgotask.config").items():
        others = {d for d in deps if not d.startswith("sqla_pgotask.config")} - allowed
        assert not others, f"{module} imports {sorted(others)}"
        io = {
            n
            for n in _external_imports(module)
            if n.split(".")[0] == "psycopg"
            or (n.split(".")[0] == "sqlalchemy" and n != "sqlalchemy.orm")
        }
        assert not io, f"{module} imports {sorted(io)}"


def test_the_engine_knows_no_runner_admin_or_cli() -> None:
    above = (
        "sqla_pgotask.worker",
        "sqla_pgotask.admin",
        "sqla_pgotask.cli",
        "sqla_pgotask.scheduler",
    )
    for module, deps in _imports("sqla_pgotask.engine").items():
        wrong = {d for d in deps if d.startswith(above)}
        assert not wrong, f"{module} imports {sorted(wrong)}"


def test_admin_knows_no_runner_or_cli() -> None:
    above = ("sqla_pgotask.worker", "sqla_pgotask.cli", "sqla_pgotask.scheduler")
    for module, deps in _imports("sqla_pgotask.admin").items():
        wrong = {d for d in deps if d.startswith(above)}
        assert not wrong, f"{module} imports {sorted(wrong)}"


def test_nothing_outside_the_cli_imports_it() -> None:
    for module, deps in GRAPH.items():
        if module.startswith("sqla_pgotask.cli") or module == "sqla_pgotask.__main__":
            continue
        wrong = {d for d in deps if d.startswith("sqla_pgotask.cli")}
        assert not wrong, f"{module} imports {sorted(wrong)}"


#: Public module paths from before the package's layout had sub-packages,
#: with names each one exported then.
OLD_PATHS = {
    "sqla_pgotask.handlers": ["DEFAULT_MAX_ATTEMPTS", "Handler", "HandlerFunc", "make_handler"],
    "sqla_pgotask.limits": [
        "MAX_RATE_COUNT",
        "QueueLimit",
        "RateLimit",
        "RateLimitSpec",
        "as_rate_limit",
        "check_max_running",
    ],
    "sqla_pgotask.retry": [
        "CallableBackoff",
        "ConstantBackoff",
        "ExponentialBackoff",
        "RetrySpec",
        "RetryStrategy",
        "as_strategy",
    ],
    "sqla_pgotask.retention": [
        "FINISHED_STATUSES",
        "RETENTION_LOCK",
        "Retention",
        "apply_retention",
        "prune_tasks",
    ],
    "sqla_pgotask.periodic": [
        "MissedPolicy",
        "Schedule",
        "Tick",
        "enqueue_due",
        "enqueue_periodic",
        "for_handler",
        "make_schedule",
        "runnable_schedules",
    ],
    "sqla_pgotask.queues": ["pause_queue", "paused_queues", "resume_queue"],
    "sqla_pgotask.supervisor": [
        "ChildFailedError",
        "Supervisor",
        "describe_exit",
        "restart_delay",
        "watch_supervisor",
    ],
    "sqla_pgotask.worker": [
        "STUCK_MARGIN",
        "Worker",
        "WorkerSettings",
        "WorkerStats",
        "new_worker_id",
    ],
    "sqla_pgotask.admin": [
        "LIVE_STATUSES",
        "CancelResult",
        "HealthCheck",
        "HealthReport",
        "QueueKindStats",
        "QueueStats",
        "RetryResult",
        "TaskFilter",
        "cancel_tasks",
        "get_task",
        "health",
        "list_tasks",
        "queue_stats",
        "retry_tasks",
    ],
    "sqla_pgotask.cli": [
        "EXIT_ERROR",
        "EXIT_OK",
        "EXIT_SCHEMA",
        "EXIT_UNREACHABLE",
        "EXIT_USAGE",
        "UsageError",
        "build_parser",
        "load_scheduler",
        "main",
    ],
}


@pytest.mark.parametrize("path", sorted(OLD_PATHS))
def test_old_import_paths_still_work(path: str) -> None:
    module = importlib.import_module(path)
    missing = [name for name in OLD_PATHS[path] if not hasattr(module, name)]
    assert not missing, f"{path} lacks {missing}"
    if hasattr(module, "__all__"):
        assert set(OLD_PATHS[path]) <= set(module.__all__)


def test_the_console_script_entry_point_is_main() -> None:
    from sqla_pgotask import cli
    from sqla_pgotask.cli.pgotask import main

    assert cli.main is main


def test_no_test_module_imports_another_or_a_conftest() -> None:
    tests = Path(__file__).resolve().parent
    for path in tests.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module is not None:
                names = [node.module]
            else:
                continue
            for name in names:
                leaf = name.rpartition(".")[2]
                assert not (leaf.startswith("test_") or leaf == "conftest"), (
                    f"{path.relative_to(tests)} imports {name}"
                )


def test_a_worker_without_schedules_loads_no_cron_library() -> None:
    """Memory a worker does not need: croniter (and dateutil) load with the first schedule."""
    code = (
        "import sys\n"
        "from sqlalchemy.orm import sessionmaker\n"
        "from sqla_pgotask import Scheduler\n"
        "scheduler = Scheduler(sessionmaker())\n"
        "scheduler.handler('k')(lambda session, task: None)\n"
        "assert 'croniter' not in sys.modules, 'croniter loaded'\n"
        "scheduler.periodic('0 * * * *', kind='k')\n"
        "assert 'croniter' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
