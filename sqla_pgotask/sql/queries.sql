-- The SQL that defines the concurrency contract, in one place.
--
-- A task is owned by the worker that claimed it for as long as the row says
-- status = 'running' with the attempt number that worker claimed.  Every state
-- change after the claim repeats that condition (the "fence"), so a worker
-- whose claim was taken over changes nothing: its statement matches no row and
-- it rolls its transaction back.

-- name: claim
-- Claim up to :limit due tasks of the kinds this worker handles, in priority
-- order.  SKIP LOCKED lets concurrent workers (and application inserts) pass
-- each other without waiting; the transaction is committed at once, so the
-- row locks last for this statement only.
WITH due AS (
    SELECT id
    FROM pgotask_task
    WHERE status = 'pending'
      AND run_at <= now()
      AND kind = ANY(CAST(:kinds AS text[]))
    ORDER BY priority DESC, run_at, id
    LIMIT :limit
    FOR UPDATE SKIP LOCKED
)
UPDATE pgotask_task AS t
SET status = 'running',
    attempts = t.attempts + 1,
    started_at = now(),
    locked_by = :worker,
    lease_expires_at = now() + make_interval(secs => :lease_seconds)
FROM due
WHERE t.id = due.id
RETURNING t.*;

-- name: claim_in_queues
-- The same claim, restricted to the queues this worker serves.
WITH due AS (
    SELECT id
    FROM pgotask_task
    WHERE status = 'pending'
      AND run_at <= now()
      AND kind = ANY(CAST(:kinds AS text[]))
      AND queue = ANY(CAST(:queues AS text[]))
    ORDER BY priority DESC, run_at, id
    LIMIT :limit
    FOR UPDATE SKIP LOCKED
)
UPDATE pgotask_task AS t
SET status = 'running',
    attempts = t.attempts + 1,
    started_at = now(),
    locked_by = :worker,
    lease_expires_at = now() + make_interval(secs => :lease_seconds)
FROM due
WHERE t.id = due.id
RETURNING t.*;

-- name: complete
-- Runs in the handler's own transaction, after the handler returned: the
-- handler's writes and this update commit together.  No row matched means
-- the claim was lost; the caller then rolls everything back.
UPDATE pgotask_task
SET status = 'succeeded',
    finished_at = clock_timestamp(),
    result = CAST(:result AS jsonb),
    locked_by = NULL,
    lease_expires_at = NULL
WHERE id = :id AND status = 'running' AND attempts = :attempt;

-- name: fail
-- After the handler's transaction was rolled back: record the attempt's error
-- and either schedule the next attempt (:status = 'pending', after :delay
-- seconds) or end the task (:status = 'failed').  The error row is written
-- only if the fence held.
WITH failed AS (
    UPDATE pgotask_task
    SET status = CAST(:status AS varchar),
        run_at = CASE WHEN CAST(:status AS varchar) = 'pending'
                      THEN clock_timestamp() + make_interval(secs => :delay)
                      ELSE run_at END,
        finished_at = CASE WHEN CAST(:status AS varchar) = 'pending'
                           THEN NULL ELSE clock_timestamp() END,
        locked_by = NULL,
        lease_expires_at = NULL
    WHERE id = :id AND status = 'running' AND attempts = :attempt
    RETURNING id
)
INSERT INTO pgotask_task_error (task_id, attempt, exception_type, message, traceback, worker)
SELECT id, :attempt, :exception_type, :message, :traceback, :worker
FROM failed;

-- name: release
-- Give back a claimed task that never started: no attempt is consumed.
UPDATE pgotask_task
SET status = 'pending',
    attempts = attempts - 1,
    started_at = NULL,
    locked_by = NULL,
    lease_expires_at = NULL
WHERE status = 'running'
  AND (id, attempts) IN (
      SELECT * FROM unnest(CAST(:ids AS bigint[]), CAST(:attempts AS integer[])));

-- name: schema_revision
SELECT pgotask_schema_revision();
