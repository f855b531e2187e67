"""The baseline: a minimal PostgreSQL job queue written directly on psycopg 3.

What a careful hand-written queue does, and nothing more, so it is the
practical upper bound on the machine:

* one ``bench_jobs`` table, a partial index on the runnable jobs (in claim
  order), a statement-level ``AFTER INSERT`` trigger that sends one
  ``NOTIFY``;
* enqueue: one ``INSERT ... RETURNING id`` per transaction, or a whole batch
  in one ``INSERT ... SELECT FROM jsonb_array_elements(...)``;
* worker (per process): ``loops`` claim loops, each on its own autocommit
  connection, plus one ``LISTEN`` connection whose thread wakes them; a loop
  polls every ``poll_interval`` seconds when no notification comes;
* claim: ``FOR UPDATE SKIP LOCKED`` picks up to ``batch`` jobs and marks them
  running; the same statement marks the previous batch succeeded (batched
  completion: one round trip and one commit per batch);
* W5 (``w5=True``): work and completion in one transaction per batch: the
  loop locks a batch with ``FOR UPDATE SKIP LOCKED``, runs every job's
  application SQL on the same connection, marks the batch succeeded and
  commits.  Work and claim then commit or roll back together.

It has no leases, heartbeats, retries with backoff or crash recovery: a job
whose handler raises goes back to ``pending`` (``failed`` after 3 attempts;
in W5 the batch rolls back and the worker stops with the error), and a worker
killed mid-batch leaves its claimed jobs ``running``.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from benchmarks.common import APP_READ_PSYCOPG, APP_WRITE_PSYCOPG, KIND, ref_key

Handler = Callable[[dict[str, Any]], None]

NAME = "raw SQL"
CHANNEL = "bench_jobs"
DEFAULTS: dict[str, Any] = {"batch": 100, "loops": 2, "poll_interval": 1.0}

SCHEMA = f"""
CREATE TABLE bench_jobs (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind        text        NOT NULL,
    payload     jsonb       NOT NULL DEFAULT '{{}}',
    status      text        NOT NULL DEFAULT 'pending'
                CHECK (status IN ('pending', 'running', 'succeeded', 'failed')),
    priority    integer     NOT NULL DEFAULT 0,
    run_at      timestamptz NOT NULL DEFAULT now(),
    attempts    integer     NOT NULL DEFAULT 0,
    locked_by   text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz
);
CREATE INDEX bench_jobs_runnable ON bench_jobs (priority DESC, run_at, id)
    WHERE status = 'pending';

CREATE FUNCTION bench_jobs_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('{CHANNEL}', '');
    RETURN NULL;
END $$;
CREATE TRIGGER bench_jobs_notify AFTER INSERT ON bench_jobs
    FOR EACH STATEMENT EXECUTE FUNCTION bench_jobs_notify();
"""

PENDING_SQL = "SELECT count(*) FROM bench_jobs WHERE status IN ('pending', 'running')"
SUCCEEDED_SQL = "SELECT count(*) FROM bench_jobs WHERE status = 'succeeded'"
TOTAL_SQL = "SELECT count(*) FROM bench_jobs"

INSERT_ONE = "INSERT INTO bench_jobs (kind, payload) VALUES (%(kind)s, %(payload)s) RETURNING id"
INSERT_BATCH = (
    "INSERT INTO bench_jobs (kind, payload)"
    " SELECT %(kind)s, p FROM jsonb_array_elements(%(payloads)s) AS p"
)

_PICK = """
    SELECT id FROM bench_jobs
    WHERE status = 'pending' AND run_at <= now() AND kind = %(kind)s
    ORDER BY priority DESC, run_at, id
    LIMIT %(batch)s
    FOR UPDATE SKIP LOCKED
"""

#: mark the previous batch succeeded and claim the next one, in one statement
CLAIM = f"""
WITH finished AS (
    UPDATE bench_jobs SET status = 'succeeded', finished_at = now(), locked_by = NULL
    WHERE id = ANY(%(finished)s::bigint[])
),
picked AS ({_PICK})
UPDATE bench_jobs AS j
SET status = 'running', attempts = j.attempts + 1, locked_by = %(me)s
FROM picked
WHERE j.id = picked.id
RETURNING j.id, j.payload
"""
FINISH = (
    "UPDATE bench_jobs SET status = 'succeeded', finished_at = now(), locked_by = NULL"
    " WHERE id = ANY(%(finished)s::bigint[])"
)
GIVE_BACK = (
    "UPDATE bench_jobs SET locked_by = NULL,"
    " status = CASE WHEN attempts >= 3 THEN 'failed' ELSE 'pending' END"
    " WHERE id = ANY(%(failed)s::bigint[])"
)

#: W5: lock a batch; the locks last until the batch's transaction commits
LOCK_BATCH = """
    SELECT id, payload FROM bench_jobs
    WHERE status = 'pending' AND run_at <= now() AND kind = %(kind)s
    ORDER BY priority DESC, run_at, id
    LIMIT %(batch)s
    FOR UPDATE SKIP LOCKED
"""
FINISH_LOCKED = (
    "UPDATE bench_jobs SET status = 'succeeded', attempts = attempts + 1, finished_at = now()"
    " WHERE id = ANY(%(finished)s::bigint[])"
)


def install(url: str) -> None:
    """Create the queue's schema in the (empty) database at ``url``."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(SCHEMA)


class Producer:
    """Enqueues on one autocommit connection: each statement is its own transaction."""

    def __init__(self, url: str, bulk: str = "") -> None:
        self.conn = psycopg.connect(url, autocommit=True)

    def enqueue_one(self, payload: dict[str, Any]) -> None:
        self.conn.execute(INSERT_ONE, {"kind": KIND, "payload": Jsonb(payload)}).fetchone()

    def enqueue_many(self, payloads: list[dict[str, Any]]) -> None:
        self.conn.execute(INSERT_BATCH, {"kind": KIND, "payloads": Jsonb(payloads)})

    def close(self) -> None:
        self.conn.close()


class Worker:
    """The baseline's worker: claim loops and a listener, in threads of this process."""

    def __init__(self, url: str, settings: dict[str, Any], handler: Handler, w5: bool) -> None:
        self.url = url
        self.batch = int(settings["batch"])
        self.loops = int(settings["loops"])
        self.poll = float(settings["poll_interval"])
        self.handler = handler
        self.w5 = w5
        self.me = f"{socket.gethostname()}:{os.getpid()}"
        self.conns: list[psycopg.Connection[Any]] = []
        self.wakes: list[threading.Event] = []
        self.listen_conn: psycopg.Connection[Any] | None = None
        self.errors: list[BaseException] = []
        self.stats: dict[str, int] = {}

    def prepare(self) -> None:
        """Connect and ``LISTEN``; nothing is claimed yet."""
        self.listen_conn = psycopg.connect(self.url, autocommit=True)
        self.listen_conn.execute(f"LISTEN {CHANNEL}")
        for _ in range(self.loops):
            self.conns.append(psycopg.connect(self.url, autocommit=True))
            self.wakes.append(threading.Event())

    def run(self, stop: threading.Event) -> None:
        """Claim and run jobs until ``stop`` is set; the last batch is completed."""
        loop = self._w5_loop if self.w5 else self._loop
        threads = [
            threading.Thread(target=self._guard, args=(loop, conn, wake, stop), daemon=True)
            for conn, wake in zip(self.conns, self.wakes, strict=True)
        ]
        listener = threading.Thread(target=self._guard, args=(self._listen, stop), daemon=True)
        for t in [*threads, listener]:
            t.start()
        stop.wait()
        for wake in self.wakes:
            wake.set()
        for t in [*threads, listener]:
            t.join()
        if self.errors:
            raise self.errors[0]

    def close(self) -> None:
        for conn in [*self.conns, *([self.listen_conn] if self.listen_conn else [])]:
            conn.close()

    # -- threads ------------------------------------------------------------

    def _guard(self, target: Callable[..., None], *args: Any) -> None:
        try:
            target(*args)
        except BaseException as exc:
            self.errors.append(exc)

    def _listen(self, stop: threading.Event) -> None:
        assert self.listen_conn is not None
        while not stop.is_set():
            for _ in self.listen_conn.notifies(timeout=0.2):
                for wake in self.wakes:
                    wake.set()

    def _loop(
        self, conn: psycopg.Connection[Any], wake: threading.Event, stop: threading.Event
    ) -> None:
        params: dict[str, Any] = {"kind": KIND, "batch": self.batch, "me": self.me, "finished": []}
        with conn.cursor() as cur:
            while not stop.is_set():
                wake.clear()
                rows = _retrying(lambda: cur.execute(CLAIM, params).fetchall())
                finished: list[int] = []
                failed: list[int] = []
                params["finished"] = finished
                for job_id, payload in rows:
                    try:
                        self.handler(payload)
                    except Exception:
                        failed.append(job_id)
                    else:
                        finished.append(job_id)
                if failed:
                    cur.execute(GIVE_BACK, {"failed": failed})
                if not rows:
                    wake.wait(self.poll)
            if params["finished"]:
                cur.execute(FINISH, params)

    def _w5_loop(
        self, conn: psycopg.Connection[Any], wake: threading.Event, stop: threading.Event
    ) -> None:
        params: dict[str, Any] = {"kind": KIND, "batch": self.batch}
        handler = self.handler
        with conn.cursor() as cur:
            while not stop.is_set():
                wake.clear()
                with conn.transaction():
                    rows = cur.execute(LOCK_BATCH, params).fetchall()
                    for _, payload in rows:
                        handler(payload)
                        seq = payload["seq"]
                        found = cur.execute(APP_READ_PSYCOPG, {"id": ref_key(seq)}).fetchone()
                        assert found is not None
                        cur.execute(APP_WRITE_PSYCOPG, {"seq": seq, "v": found[0]})
                    if rows:
                        cur.execute(FINISH_LOCKED, {"finished": [r[0] for r in rows]})
                if not rows:
                    wake.wait(self.poll)


def _retrying(statement: Callable[[], Any]) -> Any:
    """Run an autocommitted statement again if the server chose it as a deadlock victim.

    The two claim loops of a process can deadlock on the completion half of
    the combined statement; the victim's statement did nothing, so running it
    again is what a production queue would do.
    """
    for attempt in range(10):
        try:
            return statement()
        except psycopg.errors.DeadlockDetected:
            if attempt == 9:
                raise
    return None
