"""Running the real ``pgotask`` command in tests: one-shot runs and worker processes.

A worker's stdout and stderr go to a log file in the test's ``tmp_path``;
it is printed at teardown (pytest shows it when the test fails), and the
process is always killed (SIGKILL if it is still alive) before the test ends.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from tests.helpers import wait_until

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DATABASE_URL_ENV = "PGOTASK_DATABASE_URL"
LEDGER_SCHEDULER = "tests.helpers.apps.ledger:scheduler"


def pgotask_executable() -> str:
    """The ``pgotask`` console script of the interpreter running the tests."""
    beside = Path(sys.executable).with_name("pgotask")
    if beside.exists():
        return str(beside)
    found = shutil.which("pgotask")
    if found is None:
        raise RuntimeError("the pgotask console script is not installed")
    return found


def pgotask_env(database_url: str | None) -> dict[str, str]:
    """The environment for a ``pgotask`` process: ours, with the database URL set or removed.

    ``None`` removes ``DATABASE_URL`` too, the command's second choice.
    """
    env = dict(os.environ)
    env.pop(DATABASE_URL_ENV, None)
    if database_url is not None:
        env[DATABASE_URL_ENV] = database_url
    else:
        env.pop("DATABASE_URL", None)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_pgotask(
    args: Sequence[str],
    database_url: str | None,
    *,
    timeout: float = 60.0,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``pgotask *args`` to completion from the project root and capture its output.

    ``env``: variables set on top of :func:`pgotask_env`.
    """
    return subprocess.run(
        [pgotask_executable(), *args],
        cwd=PROJECT_ROOT,
        env=pgotask_env(database_url) | dict(env or {}),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


class WorkerProcess:
    """A running ``pgotask worker`` and its log file."""

    def __init__(self, process: subprocess.Popen[bytes], log_path: Path) -> None:
        self.process = process
        self.log_path = log_path

    @property
    def pid(self) -> int:
        """The process id."""
        return self.process.pid

    def log(self) -> str:
        """Everything the process wrote so far (stdout and stderr)."""
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        """Whether the process is still running."""
        return self.process.poll() is None

    def send(self, signum: signal.Signals) -> None:
        """Send ``signum`` to the process."""
        self.process.send_signal(signum)

    def wait(self, timeout: float) -> int:
        """Wait for the process to exit and return its exit code."""
        return self.process.wait(timeout)

    def wait_for_log(self, text: str, timeout: float = 30.0) -> None:
        """Wait until ``text`` appears in the log; fail early if the process exits."""

        def seen() -> bool:
            if text in self.log():
                return True
            if not self.alive():
                raise AssertionError(
                    f"worker exited with {self.process.returncode} before logging {text!r}"
                )
            return False

        wait_until(seen, timeout, message=f"{text!r} in the worker log", interval=0.05)

    def wait_started(self, timeout: float = 30.0) -> None:
        """Wait until the worker checked the schema and began claiming."""
        self.wait_for_log(" starting: kinds=", timeout)


@contextlib.contextmanager
def pgotask_worker(
    database_url: str,
    log_dir: Path,
    *args: str,
    scheduler: str = LEDGER_SCHEDULER,
    name: str = "worker",
) -> Iterator[WorkerProcess]:
    """Start ``pgotask worker <scheduler> *args``; kill it (if still alive) on the way out."""
    log_path = log_dir / f"{name}.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [pgotask_executable(), "worker", scheduler, *args],
            cwd=PROJECT_ROOT,
            env=pgotask_env(database_url),
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    worker = WorkerProcess(process, log_path)
    try:
        yield worker
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
        print(f"----- {name} (pid {process.pid}, exit {process.returncode}) -----")
        print(worker.log())
