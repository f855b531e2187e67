-- The SQL that defines the concurrency contract, in one place.
--
-- A task is owned by the worker that claimed it for as long as the row says
-- status = 'running' with the attempt number that worker claimed.  Every state
-- change after the claim repeats that condition (the "fence"), so a worker
-- whose claim was taken over changes nothing: its statement matches no row and
-- it rolls its transaction back.

-- fragment: claimable
-- What makes a task claimable, for every claim of every runner and for
-- next_due (each adds its own run_at and queue conditions): pending, of a
-- kind the claimer handles (:kinds), and not in a paused queue.  The
-- table's alias is t.
--
-- The paused-queue filter is guarded ("no queue is paused OR ..."): on its
-- own, `queue <> ALL (<an array unknown at planning>)` is estimated to keep
-- almost no row when most tasks share one queue, and the planner then reads
-- every pending task and sorts them (7x slower at 40,000 pending) instead
-- of walking ix_pgotask_task_claim.  The guard keeps the estimate at half
-- the rows, and costs one lookup in the small pgotask_queue table
-- (tests/test_models.py checks the plans).
t.status = 'pending'
AND t.kind = ANY(CAST(:kinds AS text[]))
AND (NOT EXISTS (SELECT FROM pgotask_queue WHERE paused_at IS NOT NULL)
     OR t.queue <> ALL (ARRAY(SELECT name FROM pgotask_queue WHERE paused_at IS NOT NULL)))

-- fragment: claim_writes
-- What a claim writes to each task it takes (every claim: the plain ones
-- below and the limited one of limits.sql), the task's handler settings
-- joined as h: running for :worker, one more attempt, a lease of
-- :lease_seconds.  A task without max_attempts takes its handler's here, so
-- any worker can later tell whether a lost attempt was its last.
-- statement_timestamp(): the limited claim's transaction may have waited
-- for its locks; in a statement of its own it is now().
status = 'running',
attempts = t.attempts + 1,
max_attempts = COALESCE(t.max_attempts, h.max_attempts),
started_at = statement_timestamp(),
locked_by = :worker,
lease_expires_at = statement_timestamp() + make_interval(secs => :lease_seconds)

-- name: claim
-- Claim up to :limit due tasks of the kinds this worker handles, in priority
-- order, from queues that are not paused (nor in :excluded_queues, the
-- queues with a fleet-wide limit, which only the limited claim of
-- sql/limits.sql takes; usually empty).
--
-- SKIP LOCKED lets concurrent workers (and application inserts) pass
-- each other without waiting; the transaction is committed at once, so the
-- row locks last for this statement only.
WITH due AS (
    SELECT t.id, t.kind
    FROM pgotask_task AS t
    WHERE {{claimable}}
      AND t.run_at <= now()
      AND (cardinality(CAST(:excluded_queues AS text[])) = 0
           OR t.queue <> ALL (CAST(:excluded_queues AS text[])))
    ORDER BY t.priority DESC, t.run_at, t.id
    LIMIT :limit
    FOR UPDATE SKIP LOCKED
)
UPDATE pgotask_task AS t
SET {{claim_writes}}
FROM due
JOIN unnest(CAST(:kinds AS text[]), CAST(:max_attempts AS integer[])) AS h (kind, max_attempts)
    ON h.kind = due.kind
WHERE t.id = due.id
RETURNING t.*;

-- name: claim_in_queues
-- The same claim, restricted to the queues this worker serves.
WITH due AS (
    SELECT t.id, t.kind
    FROM pgotask_task AS t
    WHERE {{claimable}}
      AND t.run_at <= now()
      AND t.queue = ANY(CAST(:queues AS text[]))
    ORDER BY t.priority DESC, t.run_at, t.id
    LIMIT :limit
    FOR UPDATE SKIP LOCKED
)
UPDATE pgotask_task AS t
SET {{claim_writes}}
FROM due
JOIN unnest(CAST(:kinds AS text[]), CAST(:max_attempts AS integer[])) AS h (kind, max_attempts)
    ON h.kind = due.kind
WHERE t.id = due.id
RETURNING t.*;

-- name: next_due
-- Seconds until the next delayed task of these kinds (and queues) becomes
-- due, or NULL: an idle claim loop sleeps until then instead of polling.
-- Only tasks in the future count, so a due task another worker holds never
-- makes it spin.
SELECT EXTRACT(EPOCH FROM min(t.run_at) - now())
FROM pgotask_task AS t
WHERE {{claimable}}
  AND t.run_at > now()
  AND (CAST(:queues AS text[]) IS NULL OR t.queue = ANY(CAST(:queues AS text[])));

-- name: claimable_by_kind
-- Claimable tasks left, by kind: those due, or also those scheduled later
-- (:include_future).  testing.drain() checks with it what it left behind.
SELECT t.kind, count(*)
FROM pgotask_task AS t
WHERE {{claimable}}
  AND (CAST(:queues AS text[]) IS NULL OR t.queue = ANY(CAST(:queues AS text[])))
  AND (CAST(:include_future AS boolean) OR t.run_at <= now())
GROUP BY t.kind
ORDER BY t.kind;

-- name: advance_earliest
-- Make the earliest claimable tasks scheduled later due now; returns how
-- many (testing.drain(include_future=True), when nothing else is due).
WITH earliest AS (
    SELECT min(t.run_at) AS run_at
    FROM pgotask_task AS t
    WHERE {{claimable}}
      AND (CAST(:queues AS text[]) IS NULL OR t.queue = ANY(CAST(:queues AS text[])))
      AND t.run_at > now()
)
UPDATE pgotask_task AS t
SET run_at = now()
FROM earliest
WHERE {{claimable}}
  AND (CAST(:queues AS text[]) IS NULL OR t.queue = ANY(CAST(:queues AS text[])))
  AND t.run_at = earliest.run_at;

-- fragment: fence
-- The fence of every state change after a claim (and of the heartbeat's
-- check of what is still its own): the row t is still running in the
-- attempt d.attempt that this worker claimed (d: the statement's unnest of
-- ids and attempts).
--
-- Written so that the planner looks each row up by its primary key: with
-- plain `t.status = 'running'` it may instead read every running task
-- through ix_pgotask_task_lease into a hash (when its statistics count few
-- running tasks, as after a drain began), which costs twice the time with
-- 900 tasks running (benchmarks in docs/performance.md; tests/test_models.py
-- checks the plans).
t.id = d.id AND (t.status = 'running') IS TRUE AND t.attempts = d.attempt

-- name: complete
-- A batch's completion, in the batch's own transaction after its handlers
-- returned, so their writes and these updates commit together: one
-- statement for every task of the batch that succeeded.  It returns the ids
-- it completed; an id missing means that claim was lost (or cancellation was
-- requested at the last moment), and the caller rolls the batch back.
UPDATE pgotask_task AS t
SET status = 'succeeded',
    finished_at = clock_timestamp(),
    result = d.result,
    locked_by = NULL,
    lease_expires_at = NULL
FROM unnest(CAST(:ids AS bigint[]), CAST(:attempts AS integer[]),
            CAST(:results AS jsonb[])) AS d (id, attempt, result)
WHERE {{fence}}
  AND t.cancel_requested_at IS NULL
RETURNING t.id;

-- name: finish_cancelled
-- Tasks whose handler's writes were rolled back because cancellation was
-- requested, or whose handler cancelled its own task: they end 'cancelled'.
UPDATE pgotask_task AS t
SET status = 'cancelled',
    cancel_requested_at = COALESCE(t.cancel_requested_at, clock_timestamp()),
    finished_at = clock_timestamp(),
    locked_by = NULL,
    lease_expires_at = NULL
FROM unnest(CAST(:ids AS bigint[]), CAST(:attempts AS integer[])) AS d (id, attempt)
WHERE {{fence}}
RETURNING t.id;

-- name: snooze
-- Handlers that raised Snooze: back to pending at their own delay, the
-- attempt given back, no error recorded (a task cancelled meanwhile ends
-- 'cancelled').
UPDATE pgotask_task AS t
SET status = CASE WHEN t.cancel_requested_at IS NOT NULL THEN 'cancelled' ELSE 'pending' END,
    attempts = t.attempts - 1,
    run_at = clock_timestamp() + make_interval(secs => d.delay),
    started_at = NULL,
    finished_at = CASE WHEN t.cancel_requested_at IS NOT NULL THEN clock_timestamp() END,
    locked_by = NULL,
    lease_expires_at = NULL
FROM unnest(CAST(:ids AS bigint[]), CAST(:attempts AS integer[]),
            CAST(:delays AS float8[])) AS d (id, attempt, delay)
WHERE {{fence}}
RETURNING t.id;

-- name: fail
-- After a handler's writes were rolled back: record each attempt's error and
-- either schedule the next attempt (status 'pending', after its delay in
-- seconds) or end the task (status 'failed').  An error row is written only
-- where the fence held; the ids recorded are returned.
WITH d AS (
    SELECT *
    FROM unnest(CAST(:ids AS bigint[]), CAST(:attempts AS integer[]),
                CAST(:statuses AS varchar[]), CAST(:delays AS float8[]),
                CAST(:exception_types AS text[]), CAST(:messages AS text[]),
                CAST(:tracebacks AS text[]))
        AS d (id, attempt, status, delay, exception_type, message, traceback)
),
failed AS (
    UPDATE pgotask_task AS t
    SET status = CASE WHEN t.cancel_requested_at IS NOT NULL THEN 'cancelled'
                      ELSE d.status END,
        run_at = CASE WHEN d.status = 'pending'
                      THEN clock_timestamp() + make_interval(secs => d.delay)
                      ELSE t.run_at END,
        finished_at = CASE WHEN d.status = 'pending' AND t.cancel_requested_at IS NULL
                           THEN NULL ELSE clock_timestamp() END,
        locked_by = NULL,
        lease_expires_at = NULL
    FROM d
    WHERE {{fence}}
    RETURNING t.id
)
INSERT INTO pgotask_task_error (task_id, attempt, exception_type, message, traceback, worker)
SELECT d.id, d.attempt, d.exception_type, d.message, d.traceback, :worker
FROM failed JOIN d ON d.id = failed.id
RETURNING task_id;

-- name: release
-- Give back a claimed task that never started: no attempt is consumed.
UPDATE pgotask_task AS t
SET status = 'pending',
    attempts = t.attempts - 1,
    started_at = NULL,
    locked_by = NULL,
    lease_expires_at = NULL
FROM unnest(CAST(:ids AS bigint[]), CAST(:attempts AS integer[])) AS d (id, attempt)
WHERE {{fence}};

-- name: release_orphans
-- After a claim statement failed in flight: the claim may have committed
-- without its reply reaching the worker.  Its rows are 'running' under this
-- worker's id, yet no handler of it will run them; give them back now,
-- attempt refunded (they never started), rather than after their lease.
-- :known lists the tasks the worker does hold.  Only this worker's claim
-- loop claims under its id, and it runs this before claiming again.
UPDATE pgotask_task
SET status = 'pending',
    attempts = attempts - 1,
    started_at = NULL,
    locked_by = NULL,
    lease_expires_at = NULL
WHERE status = 'running'
  AND locked_by = :worker
  AND id <> ALL (CAST(:known AS bigint[]))
RETURNING id;

-- name: release_interrupted
-- Shutdown after the grace period: tasks whose handlers are still running
-- are given back now, not after their lease; the attempt counts (the handler
-- did run), and the error says why.
WITH released AS (
    UPDATE pgotask_task AS t
    SET status = CASE WHEN t.cancel_requested_at IS NOT NULL THEN 'cancelled'
                      WHEN t.attempts >= t.max_attempts THEN 'failed'
                      ELSE 'pending' END,
        finished_at = CASE WHEN t.cancel_requested_at IS NOT NULL
                                OR t.attempts >= t.max_attempts
                           THEN clock_timestamp() END,
        locked_by = NULL,
        lease_expires_at = NULL
    FROM unnest(CAST(:ids AS bigint[]), CAST(:attempts AS integer[])) AS d (id, attempt)
    WHERE {{fence}}
    RETURNING t.id, t.attempts
)
INSERT INTO pgotask_task_error (task_id, attempt, exception_type, message, worker)
SELECT id, attempts, 'sqla_pgotask.WorkerShutdown',
       'the worker shut down before the handler finished (grace period exceeded)', :worker
FROM released;

-- name: cancel_requested
-- The listener's check of a cancellation notification, which anyone who can
-- connect may send: only a running task whose row requests cancellation
-- (set by someone allowed to update it) is cancelled, in the attempt the
-- row names.
SELECT id, attempts
FROM pgotask_task
WHERE id = ANY (CAST(:ids AS bigint[]))
  AND status = 'running'
  AND cancel_requested_at IS NOT NULL;
