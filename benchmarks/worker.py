"""Worker processes: the child's body (``python -m benchmarks.worker SPEC``) and the
orchestrator's :class:`WorkerPool`.

Each worker is a fresh interpreter that imports only its implementation
(``benchmarks.rawsql``: psycopg; ``benchmarks.library``: sqla_pgotask and
SQLAlchemy), so its peak RSS is that implementation's.  Protocol, by lines on
the child's stdin/stdout:

1. the child builds its worker and connects (``Worker.prepare()``), then
   prints ``ready``;
2. the orchestrator, once every child is ready, writes ``go`` to each: they
   start consuming together;
3. ``stop`` (or end of input) makes the child stop its worker gracefully;
   it then writes a JSON result file: the ``seq`` of every handler call and
   its start time (``CLOCK_MONOTONIC`` ns), peak RSS (``VmHWM``), CPU times,
   and the error, if any.

Handler calls are also counted in a shared memory-mapped file (one 64-bit
slot per worker), so the orchestrator sees progress without querying the
database.
"""

from __future__ import annotations

import importlib
import json
import mmap
import os
import resource
import select
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from array import array
from pathlib import Path
from typing import IO, Any

from benchmarks.common import now_ns, vm_hwm_kib

ROOT = Path(__file__).resolve().parent.parent

#: implementation key -> module with ``Worker``, ``Producer``, ``install``, SQL counts
MODULES = {"raw": "benchmarks.rawsql", "sqla_pgotask": "benchmarks.library"}

_SLOT = struct.Struct("q")


# --------------------------------------------------------------------------
# the child


def _child(spec: dict[str, Any]) -> dict[str, Any]:
    seqs = array("q")
    starts = array("q")
    lock = threading.Lock()
    slot = int(spec["slot"]) * _SLOT.size
    result: dict[str, Any] = {"worker": spec["slot"], "error": None, "pid": os.getpid()}
    with open(spec["counters"], "r+b") as f:
        counters = mmap.mmap(f.fileno(), 0)

    def handler(payload: dict[str, Any]) -> None:
        started = now_ns()
        with lock:
            seqs.append(payload["seq"])
            starts.append(started)
            _SLOT.pack_into(counters, slot, len(seqs))

    try:
        module = importlib.import_module(MODULES[spec["impl"]])
        worker = module.Worker(spec["url"], spec["settings"], handler, bool(spec["w5"]))
        worker.prepare()
        print("ready", flush=True)
        if sys.stdin.readline().strip() == "go":
            result["go_ns"] = now_ns()
            usage0 = resource.getrusage(resource.RUSAGE_SELF)
            stop = threading.Event()

            def wait_for_stop() -> None:
                sys.stdin.readline()  # "stop", or EOF if the orchestrator died
                stop.set()

            threading.Thread(target=wait_for_stop, daemon=True).start()
            try:
                worker.run(stop)
            finally:
                usage1 = resource.getrusage(resource.RUSAGE_SELF)
                result["cpu_s"] = (usage1.ru_utime - usage0.ru_utime) + (
                    usage1.ru_stime - usage0.ru_stime
                )
                result["stats"] = worker.stats
        worker.close()
    except BaseException:
        result["error"] = traceback.format_exc()
    result["vm_hwm_kib"] = vm_hwm_kib()
    result["seqs"] = seqs.tolist()
    result["starts_ns"] = starts.tolist()
    counters.close()
    return result


def main(argv: list[str]) -> None:
    spec = json.loads(argv[1])
    result = _child(spec)
    Path(spec["result"]).write_text(json.dumps(result))


# --------------------------------------------------------------------------
# the orchestrator's side


class WorkerError(RuntimeError):
    pass


class WorkerPool:
    """``count`` worker processes of implementation ``impl`` on the database at ``url``."""

    def __init__(
        self, impl: str, url: str, settings: dict[str, Any], count: int, w5: bool = False
    ) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="pgotask-bench-"))
        counters = self.tmp / "counters"
        counters.write_bytes(b"\0" * _SLOT.size * count)
        self._counters_file = open(counters, "rb")  # noqa: SIM115 - closed in finish()
        self._counters = mmap.mmap(self._counters_file.fileno(), 0, access=mmap.ACCESS_READ)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        self.procs: list[subprocess.Popen[bytes]] = []
        self.results_paths: list[Path] = []
        self.stderr_paths: list[Path] = []
        self._stderr: list[IO[bytes]] = []
        for i in range(count):
            result = self.tmp / f"worker-{i}.json"
            stderr = self.tmp / f"worker-{i}.stderr"
            spec = {
                "impl": impl,
                "url": url,
                "settings": settings,
                "slot": i,
                "w5": w5,
                "counters": str(counters),
                "result": str(result),
            }
            err = open(stderr, "wb")  # noqa: SIM115 - closed in finish()
            self._stderr.append(err)
            self.procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "benchmarks.worker", json.dumps(spec)],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=err,
                    cwd=ROOT,
                    env=env,
                )
            )
            self.results_paths.append(result)
            self.stderr_paths.append(stderr)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Block until every worker has connected and printed ``ready``."""
        deadline = time.monotonic() + timeout
        for i, proc in enumerate(self.procs):
            assert proc.stdout is not None
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise WorkerError(f"worker {i} was not ready within {timeout:g} s")
                readable, _, _ = select.select([proc.stdout], [], [], remaining)
                if not readable:
                    continue
                line = proc.stdout.readline()
                if not line:  # the child ended before it was ready
                    proc.wait(10)
                    raise WorkerError(f"worker {i} failed to start: {self._failure(i)}")
                if line.strip() == b"ready":
                    break

    def go(self) -> None:
        """Release every worker (one short write each)."""
        self._tell_all(b"go\n")

    def handled(self) -> int:
        """Handler calls so far, summed over the workers."""
        return sum(v for (v,) in _SLOT.iter_unpack(self._counters))

    def alive(self) -> bool:
        return all(p.poll() is None for p in self.procs)

    def finish(self, timeout: float = 60.0) -> list[dict[str, Any]]:
        """Stop the workers gracefully, wait for them and return their results."""
        self._tell_all(b"stop\n")
        results: list[dict[str, Any]] = []
        for i, proc in enumerate(self.procs):
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()  # our own child, by its Popen handle
                proc.wait(10)
            if proc.stdout is not None:
                proc.stdout.close()
            try:
                results.append(json.loads(self.results_paths[i].read_text()))
            except (OSError, ValueError):
                results.append(
                    {
                        "worker": i,
                        "error": f"no result (exit code {proc.returncode}): {self._failure(i)}",
                        "seqs": [],
                        "starts_ns": [],
                    }
                )
        self._counters.close()
        self._counters_file.close()
        for err in self._stderr:
            err.close()
        for path in self.tmp.iterdir():
            path.unlink()
        self.tmp.rmdir()
        return results

    def _tell_all(self, line: bytes) -> None:
        for proc in self.procs:
            if proc.stdin is None or proc.stdin.closed:
                continue
            try:
                proc.stdin.write(line)
                proc.stdin.flush()
                if line == b"stop\n":
                    proc.stdin.close()
            except (BrokenPipeError, OSError):
                pass

    def _failure(self, i: int) -> str:
        try:
            error = json.loads(self.results_paths[i].read_text()).get("error")
        except (OSError, ValueError):
            error = None
        if error:
            return str(error).strip()
        self._stderr[i].flush()
        tail = self.stderr_paths[i].read_bytes()[-2000:].decode(errors="replace").strip()
        return tail or "no output"


if __name__ == "__main__":
    main(sys.argv)
