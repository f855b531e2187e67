-- A worker's registry row, its heartbeat, and the rescue of other workers'
-- tasks (sqla_pgotask.worker.maintenance).  The heartbeat uses the fence
-- of tasks.sql.

-- name: register_worker
INSERT INTO pgotask_worker (id, host, pid, node, kinds, queues, concurrency)
VALUES (:worker, :host, :pid, :node, CAST(:kinds AS text[]), CAST(:queues AS text[]),
        :concurrency)
ON CONFLICT (id) DO UPDATE SET last_heartbeat_at = now();

-- name: unregister_worker
DELETE FROM pgotask_worker WHERE id = :worker;

-- name: heartbeat
-- One statement per interval for all of a worker's tasks: extend the leases
-- of the attempts it still owns, refresh its registry row (re-creating it if
-- it was pruned; with its count of handler threads stuck past a timeout,
-- and since when all of them are), and report which of its tasks are still its own and which
-- have a cancellation request.  Ids missing from the result are no longer
-- this worker's.  A row another transaction holds locked (say, an
-- application's uncommitted cancel) is skipped, not waited for: one busy row
-- must not hold up the leases of all the others.
WITH me AS (
    INSERT INTO pgotask_worker (id, host, pid, node, kinds, queues, concurrency, stuck_slots)
    VALUES (:worker, :host, :pid, :node, CAST(:kinds AS text[]), CAST(:queues AS text[]),
            :concurrency, :stuck_slots)
    ON CONFLICT (id) DO UPDATE
    SET last_heartbeat_at = now(),
        stuck_slots = EXCLUDED.stuck_slots,
        all_stuck_since = CASE WHEN EXCLUDED.stuck_slots >= EXCLUDED.concurrency
                               THEN COALESCE(pgotask_worker.all_stuck_since, now()) END
),
mine AS (
    SELECT t.id, t.cancel_requested_at
    FROM pgotask_task AS t,
         unnest(CAST(:ids AS bigint[]), CAST(:attempts AS integer[])) AS d (id, attempt)
    WHERE {{fence}}
),
extended AS (
    UPDATE pgotask_task AS t
    SET lease_expires_at = now() + make_interval(secs => :lease_seconds)
    FROM (SELECT id FROM pgotask_task WHERE id IN (SELECT id FROM mine)
          FOR UPDATE SKIP LOCKED) AS free
    WHERE t.id = free.id
)
SELECT id, cancel_requested_at IS NOT NULL AS cancel_requested FROM mine;

-- name: node_peers
-- Other workers on this node (same kernel boot and pid namespace): their
-- pids can be checked directly.
SELECT id, pid FROM pgotask_worker WHERE node = :node AND id <> :worker;

-- name: prune_workers
-- Forget workers that stopped heart-beating, or whose process is known gone.
DELETE FROM pgotask_worker
WHERE id <> :worker
  AND (last_heartbeat_at < now() - make_interval(secs => :dead_after)
       OR id = ANY(CAST(:dead AS text[])))
RETURNING id;

-- name: rescue
-- Give back running tasks whose lease expired or whose worker is gone
-- (:gone, pruned in this same transaction).  The lost attempt counts and is
-- recorded; a task out of attempts ends 'failed', so a task that kills its
-- worker every time stops.  run_at is kept: a rescued task keeps its place in
-- the queue instead of going behind everything due meanwhile.  SKIP LOCKED and the status guard make concurrent
-- rescuers, and a completion racing with a rescue, harmless.
WITH lost AS (
    SELECT id, locked_by,
           CASE WHEN lease_expires_at < now() THEN 'its lease expired'
                ELSE 'its worker is gone' END AS reason
    FROM pgotask_task
    WHERE status = 'running'
      AND (lease_expires_at < now() OR locked_by = ANY(CAST(:gone AS text[])))
    ORDER BY id
    LIMIT :limit
    FOR UPDATE SKIP LOCKED
),
rescued AS (
    UPDATE pgotask_task AS t
    SET status = CASE WHEN t.cancel_requested_at IS NOT NULL THEN 'cancelled'
                      WHEN t.attempts >= COALESCE(t.max_attempts, :default_max_attempts)
                      THEN 'failed'
                      ELSE 'pending' END,
        finished_at = CASE WHEN t.cancel_requested_at IS NOT NULL
                                OR t.attempts >= COALESCE(t.max_attempts, :default_max_attempts)
                           THEN clock_timestamp() END,
        locked_by = NULL,
        lease_expires_at = NULL
    FROM lost
    WHERE t.id = lost.id
    RETURNING t.id, t.attempts, t.status, lost.locked_by, lost.reason
)
INSERT INTO pgotask_task_error (task_id, attempt, exception_type, message, worker)
SELECT id, attempts, 'sqla_pgotask.WorkerLost',
       format('worker %s was lost during attempt %s: %s; task is now %s',
              locked_by, attempts, reason, status),
       :worker
FROM rescued
RETURNING task_id;
