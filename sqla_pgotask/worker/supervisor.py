"""``pgotask worker --processes N``: one small supervisor, N ordinary worker processes.

Python runs one thread of Python code at a time per process (the GIL), so a
worker whose handlers spend their time in Python, not waiting on I/O, uses
one core however high its ``--concurrency``.  With ``--processes N`` the
``pgotask`` process becomes a supervisor that imports nothing of the
application and runs N complete ``pgotask worker`` processes, each of which
imports the application, checks the schema, registers in ``pgotask_worker``
and claims on its own, exactly as if started by hand.

The supervisor:

* restarts a worker process that exits while it is not stopping (a crash, an
  out-of-memory kill, ``kill -9``), after a delay that doubles with each quick
  failure of that process (:data:`RESTART_DELAY_MIN` up to
  :data:`RESTART_DELAY_MAX`) and starts again from the minimum once a process
  has run for :data:`STABLE_AFTER` seconds;
* gives up, stops the other processes and exits with the worker's own exit
  code when a process reports a bad configuration: exit code 2 (usage: a bad
  ``module:attribute``, an import error, a ``ConfigurationError``) or 4
  (schema missing or outdated) at any time, and any failure at all before the
  first worker process has started (so a wrong database URL, exit code 3,
  stops it at once instead of retrying for ever; once workers have run, 3
  means an outage and the process is restarted with the backoff);
* forwards the first SIGTERM or SIGINT to the worker processes, which shut
  down gracefully, waits for them and exits 0; a second signal kills them
  with SIGKILL and exits with ``128 + signal``.

Each worker process is tied to the supervisor: on Linux it gets SIGTERM from
the kernel when the supervisor dies, even by ``kill -9``
(``PR_SET_PDEATHSIG``), and, on every system, it notices within a second that
its parent process changed.  Either way it shuts down gracefully on its own.

The protocol between the two sides lives here too: the supervisor passes
``--supervisor-pid`` and ``--ready-fd`` (hidden options of ``pgotask
worker``); the worker process writes one byte to the ready pipe once it has
passed its start-up checks (:func:`watch_supervisor`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import FrameType

from sqla_pgotask._exit_codes import (
    EXIT_ERROR,
    EXIT_OK,
    EXIT_SCHEMA,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
)
from sqla_pgotask._proc import die_with_parent
from sqla_pgotask.scheduler import Scheduler

__all__ = ["ChildFailedError", "Supervisor", "describe_exit", "restart_delay", "watch_supervisor"]

# Hidden options of ``pgotask worker``, passed by the supervisor to its worker
# processes: the supervisor's pid, and the pipe to report readiness on.
SUPERVISOR_PID_OPTION = "--supervisor-pid"
READY_FD_OPTION = "--ready-fd"

#: ``--processes``: worker processes of one supervisor.
MAX_PROCESSES = 256

logger = logging.getLogger("sqla_pgotask.supervisor")

#: Seconds before restarting a worker process after its first quick exit.
RESTART_DELAY_MIN = 1.0
#: The longest wait between two restarts of a crash-looping worker process.
RESTART_DELAY_MAX = 30.0
#: A worker process that ran this long before exiting is restarted after
#: :data:`RESTART_DELAY_MIN` again.
STABLE_AFTER = 30.0
#: The supervisor checks its worker processes at least this often (it is
#: woken at once by SIGCHLD and by signals anyway).
_TICK = 1.0

# Exit codes a worker process uses for a configuration it cannot run with:
# restarting it would fail the same way.
_FATAL_CODES = {EXIT_USAGE, EXIT_SCHEMA}
_MEANINGS = {
    EXIT_ERROR: "an error",
    EXIT_USAGE: "a usage or configuration error",
    EXIT_UNREACHABLE: "the database is unreachable",
    EXIT_SCHEMA: "the database schema is missing or outdated",
}


def _tie_to_parent(parent_pid: int) -> Callable[[], None]:
    """The ``preexec_fn`` that has the kernel send SIGTERM to the child when we die.

    SIGTERM, not SIGKILL: the worker process then shuts down gracefully
    (running handlers finish, unstarted tasks are given back).  The signal is
    tied to the thread that forks, so only the supervisor's main thread
    starts worker processes.
    """

    return die_with_parent(parent_pid, signal.SIGTERM, EXIT_ERROR)


class ChildFailedError(Exception):
    """A worker process failed in a way restarting cannot fix; ``code`` is the exit code."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class _Child:
    """One worker process slot, numbered from 1; its process is replaced on restarts."""

    number: int
    process: subprocess.Popen[bytes] | None = None
    ready_fd: int | None = None
    started_at: float = 0.0
    ready: bool = False
    #: Quick exits in a row: the exponent of the restart delay.
    failures: int = 0
    #: When to start (again) a process in this slot; None: nothing scheduled.
    start_at: float | None = 0.0


def describe_exit(returncode: int) -> str:
    """``exited with code 4 (the database schema is missing or outdated)`` or
    ``was killed by SIGKILL``."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"was killed by {name}"
    meaning = _MEANINGS.get(returncode)
    return f"exited with code {returncode}" + (f" ({meaning})" if meaning else "")


class Supervisor:
    """Runs ``processes`` copies of ``pgotask <worker_args>`` and keeps them running.

    ``worker_args`` are the arguments of one worker process after ``pgotask``
    (global options, ``worker``, the scheduler and its options, without
    ``--processes``).  :meth:`run` blocks until the processes are stopped by
    a signal and returns the exit code, or raises :class:`ChildFailedError`.
    It must be called from the main thread: it installs signal handlers for
    SIGTERM, SIGINT and SIGCHLD, and restores the previous ones on return.
    ``on_exit(pid)`` is called after each worker process exits (the
    metrics endpoint forgets its live gauges).
    """

    def __init__(
        self,
        worker_args: Sequence[str],
        processes: int,
        *,
        restart_delay_min: float = RESTART_DELAY_MIN,
        restart_delay_max: float = RESTART_DELAY_MAX,
        stable_after: float = STABLE_AFTER,
        on_exit: Callable[[int], None] | None = None,
    ) -> None:
        if not 1 <= processes <= MAX_PROCESSES:
            raise ValueError(f"processes must be from 1 to {MAX_PROCESSES}, not {processes!r}")
        self.worker_args = list(worker_args)
        self.processes = processes
        self.restart_delay_min = restart_delay_min
        self.restart_delay_max = restart_delay_max
        self.stable_after = stable_after
        self.on_exit = on_exit
        self._children = [_Child(n) for n in range(1, processes + 1)]
        self._selector = selectors.DefaultSelector()
        self._signals: list[int] = []
        self._signal_count = 0
        self._stopping = False
        self._ever_ready = False
        self._fatal: ChildFailedError | None = None
        self._unclean: list[str] = []

    # -- the loop -----------------------------------------------------------

    def run(self) -> int:
        """Start the worker processes and supervise them until they are stopped."""
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        self._selector.register(wake_r, selectors.EVENT_READ, None)
        previous = {
            signum: signal.signal(signum, self._on_signal)
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD)
        }
        previous_wakeup = signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        logger.info(
            "supervisor (pid %d) starting %d worker processes: pgotask %s",
            os.getpid(),
            self.processes,
            " ".join(self.worker_args),
        )
        try:
            return self._loop()
        finally:
            signal.set_wakeup_fd(previous_wakeup)
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            # Only after an unexpected error: the worker processes stop gracefully
            # (as when we die, but without waiting for the kernel to tell them).
            for child in self._children:
                if child.process is not None and child.process.poll() is None:
                    with contextlib.suppress(OSError):
                        child.process.send_signal(signal.SIGTERM)
                self._close_ready_fd(child)
            self._selector.close()
            os.close(wake_r)
            os.close(wake_w)

    def _loop(self) -> int:
        while True:
            code = self._handle_signals()
            if code is not None:
                return code
            self._reap()
            if self._stopping:
                if all(child.process is None for child in self._children):
                    break
            else:
                self._start_due()
            for key, _ in self._selector.select(self._timeout()):
                if key.data is None:
                    with contextlib.suppress(BlockingIOError):
                        os.read(key.fd, 512)  # signal numbers: handled above
                else:
                    self._read_ready(key.data)
        if self._fatal is not None:
            raise self._fatal
        if self._unclean:
            logger.error("worker processes that did not stop cleanly: %s", "; ".join(self._unclean))
            return EXIT_ERROR
        logger.info("all %d worker processes stopped", self.processes)
        return EXIT_OK

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # Only record it: the loop, woken through the wake-up fd, acts on it.
        if signum != signal.SIGCHLD:
            self._signals.append(signum)

    def _handle_signals(self) -> int | None:
        while self._signals:
            signum = self._signals.pop(0)
            name = signal.Signals(signum).name
            self._signal_count += 1
            if self._signal_count == 1:
                logger.warning(
                    "%s: stopping the worker processes after their in-flight tasks "
                    "(send it again to kill them now)",
                    name,
                )
                self._stop(signum)
                continue
            live = [child for child in self._children if child.process is not None]
            logger.warning("second %s: killing %d worker processes now (SIGKILL)", name, len(live))
            for child in live:
                assert child.process is not None
                with contextlib.suppress(OSError):
                    child.process.kill()
            for child in live:
                assert child.process is not None
                child.process.wait()
                child.process = None
            return 128 + signum
        return None

    def _stop(self, signum: int) -> None:
        """Stop every worker process gracefully (with ``signum``) and start no more."""
        self._stopping = True
        for child in self._children:
            child.start_at = None
            if child.process is not None:
                with contextlib.suppress(OSError):
                    child.process.send_signal(signum)

    def _timeout(self) -> float:
        timeout = _TICK
        if not self._stopping:
            now = time.monotonic()
            for child in self._children:
                if child.start_at is not None:
                    timeout = min(timeout, max(0.0, child.start_at - now))
        return timeout

    # -- starting -----------------------------------------------------------

    def _start_due(self) -> None:
        now = time.monotonic()
        for child in self._children:
            if child.process is None and child.start_at is not None and child.start_at <= now:
                if self._signals or self._stopping:  # start nothing more
                    return
                self._start(child)

    def _start(self, child: _Child) -> None:
        ready_r, ready_w = os.pipe()
        command = [
            sys.executable,
            "-m",
            "sqla_pgotask",
            *self.worker_args,
            f"{SUPERVISOR_PID_OPTION}={os.getpid()}",
            f"{READY_FD_OPTION}={ready_w}",
        ]
        try:
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                pass_fds=(ready_w,),
                # Only two system calls through a function resolved beforehand:
                # nothing that could block on a lock between fork and exec.
                preexec_fn=_tie_to_parent(os.getpid()),  # noqa: PLW1509
            )
        except OSError as exc:
            os.close(ready_r)
            what = f"could not start worker process {child.number}: {exc}"
            if not self._ever_ready:
                logger.error("%s; stopping the other worker processes", what)
                self._fatal = ChildFailedError(
                    EXIT_ERROR, f"{what}: all worker processes were stopped"
                )
                self._stop(signal.SIGTERM)
                return
            child.failures += 1
            delay = self._delay(child)
            logger.error("%s; trying again in %.1fs", what, delay)
            child.start_at = time.monotonic() + delay
            return
        finally:
            os.close(ready_w)
        os.set_blocking(ready_r, False)
        self._selector.register(ready_r, selectors.EVENT_READ, child)
        child.process = process
        child.ready_fd = ready_r
        child.ready = False
        child.started_at = time.monotonic()
        child.start_at = None
        logger.info(
            "worker process %d/%d started (pid %d)", child.number, self.processes, process.pid
        )

    def _read_ready(self, child: _Child) -> None:
        """Read what the worker process wrote on its ready pipe: one byte once started."""
        if child.ready_fd is None:
            return
        try:
            data = os.read(child.ready_fd, 64)
        except BlockingIOError:
            return
        if data:
            child.ready = True
            if not self._ever_ready:
                logger.debug("worker process %d is the first to have started", child.number)
            self._ever_ready = True
        else:  # EOF: it closed its end (after writing, or by exiting)
            self._close_ready_fd(child)

    def _close_ready_fd(self, child: _Child) -> None:
        if child.ready_fd is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(child.ready_fd)
            os.close(child.ready_fd)
            child.ready_fd = None

    # -- exits --------------------------------------------------------------

    def _reap(self) -> None:
        for child in self._children:
            if child.process is None:
                continue
            returncode = child.process.poll()
            if returncode is not None:
                self._exited(child, returncode)

    def _exited(self, child: _Child, returncode: int) -> None:
        process = child.process
        assert process is not None
        self._read_ready(child)  # it may have started just before exiting
        self._close_ready_fd(child)
        child.process = None
        if self.on_exit is not None:
            try:
                self.on_exit(process.pid)
            except Exception:
                logger.exception("on_exit failed for worker process %d", process.pid)
        ran = time.monotonic() - child.started_at
        what = f"worker process {child.number} (pid {process.pid}) {describe_exit(returncode)}"
        if self._stopping:
            # A child that died of our own signal before installing its handlers
            # stopped as asked, too.
            if returncode in (0, -signal.SIGTERM, -signal.SIGINT):
                logger.info("worker process %d (pid %d) stopped", child.number, process.pid)
            else:
                logger.warning("%s while stopping", what)
                self._unclean.append(what)
            return
        fatal = returncode in _FATAL_CODES or (returncode > 0 and not self._ever_ready)
        if fatal:
            if returncode in _FATAL_CODES:
                reason = "restarting it would not help"
            else:
                reason = "before any worker process had started, so it is not restarted"
            message = f"{what}; {reason}: all worker processes were stopped"
            logger.error("%s; %s: stopping the other worker processes", what, reason)
            self._fatal = ChildFailedError(returncode, message)
            self._stop(signal.SIGTERM)
            return
        if ran >= self.stable_after:
            child.failures = 0
        child.failures += 1
        delay = self._delay(child)
        child.start_at = time.monotonic() + delay
        logger.warning("%s after %.1fs; restarting it in %.1fs", what, ran, delay)

    def _delay(self, child: _Child) -> float:
        return restart_delay(child.failures, self.restart_delay_min, self.restart_delay_max)


def restart_delay(
    failures: int, minimum: float = RESTART_DELAY_MIN, maximum: float = RESTART_DELAY_MAX
) -> float:
    """Seconds to wait before restarting after ``failures`` quick exits in a row:
    ``minimum``, doubling with each further one, at most ``maximum``."""
    exponent = min(max(failures - 1, 0), 30)
    return float(min(maximum, minimum * 2**exponent))


# -- the worker process's side ----------------------------------------------


def watch_supervisor(
    supervisor_pid: int,
    ready_fd: int | None,
    scheduler: Callable[[], Scheduler | None],
) -> None:
    """In a supervised worker process: report readiness, and stop if the supervisor dies.

    Starts a daemon thread that writes one byte to ``ready_fd`` once
    ``scheduler()`` has a running worker (it passed the schema check), and
    that sends SIGTERM to this process (a graceful stop, through the
    ``pgotask worker`` signal handler) as soon as the parent process is no
    longer ``supervisor_pid``: the fallback of ``PR_SET_PDEATHSIG``, and the
    only guard where that does not exist.
    """
    if ready_fd is not None:
        # Not for the handlers' own subprocesses.
        with contextlib.suppress(OSError):
            os.set_inheritable(ready_fd, False)

    def watch() -> None:
        pending_fd = ready_fd
        while True:
            if os.getppid() != supervisor_pid:
                logger.warning(
                    "the supervisor (pid %d) is gone: stopping this worker process",
                    supervisor_pid,
                )
                if pending_fd is not None:
                    _close_quietly(pending_fd)
                os.kill(os.getpid(), signal.SIGTERM)
                return
            if pending_fd is not None:
                current = scheduler()
                if current is not None and current.running_worker is not None:
                    with contextlib.suppress(OSError):
                        os.write(pending_fd, b"R")
                    _close_quietly(pending_fd)
                    pending_fd = None
            time.sleep(0.05 if pending_fd is not None else 1.0)

    threading.Thread(target=watch, name="pgotask-supervised", daemon=True).start()


def _close_quietly(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)
