-- The operator's statements: statistics, repairs and health checks
-- (sqla_pgotask.admin, the `pgotask stats/list/show/retry/cancel/check`
-- commands).  Nothing here is on a worker's hot path.

-- name: admin_stats
-- One aggregate over the task table: counts per (queue, kind) and status,
-- the age of the oldest due task, and how many finished in the last
-- :window_seconds (throughput).  All times from the database clock.
-- Ages are differences of epochs, not of timestamps: a run_at of
-- '-infinity' (inserted by plain SQL) is an infinite age, where
-- now() - run_at would raise "cannot subtract infinite timestamps".
SELECT queue,
       kind,
       count(*) FILTER (WHERE status = 'pending' AND run_at <= now()) AS due,
       count(*) FILTER (WHERE status = 'pending' AND run_at > now()) AS scheduled,
       count(*) FILTER (WHERE status = 'running') AS running,
       count(*) FILTER (WHERE status = 'succeeded') AS succeeded,
       count(*) FILTER (WHERE status = 'failed') AS failed,
       count(*) FILTER (WHERE status = 'cancelled') AS cancelled,
       extract(epoch FROM now())::float8 - extract(epoch FROM min(run_at) FILTER (
           WHERE status = 'pending' AND run_at <= now()
       ))::float8 AS oldest_due_seconds,
       count(*) FILTER (
           WHERE status IN ('succeeded', 'failed', 'cancelled')
             AND finished_at >= now() - make_interval(secs => :window_seconds)
       ) AS finished_recently
FROM pgotask_task
GROUP BY queue, kind
ORDER BY queue, kind

-- name: admin_retry_lock_dedup
-- Before a retry batch: take the advisory locks the dedup trigger takes for
-- the (kind, dedup_key) of each task about to be retried, in a fixed order,
-- so a concurrent insert of a twin waits for this transaction, and the next
-- statement (a new snapshot) sees any twin committed before it.
SELECT count(pg_advisory_xact_lock(hashtext(kind), hashtext(dedup_key)))
FROM (
    SELECT DISTINCT kind, dedup_key
    FROM pgotask_task
    WHERE id = ANY(CAST(:ids AS bigint[]))
      AND dedup_key IS NOT NULL
      AND status IN ('failed', 'cancelled')
    ORDER BY kind, dedup_key
) AS keys

-- name: admin_retry
-- Put failed or cancelled tasks among :ids back to 'pending', due now, with
-- :extra_attempts more attempts than they used.  Pending and running tasks
-- are never touched.  A task whose (kind, dedup_key) has a live twin stays
-- as it is (uq_pgotask_task_dedup allows one live task per key), and of
-- several retried tasks sharing a key only the newest is revived.
WITH locked AS (
    SELECT id, kind, dedup_key
    FROM pgotask_task
    WHERE id = ANY(CAST(:ids AS bigint[]))
      AND status IN ('failed', 'cancelled')
    FOR UPDATE
),
eligible AS (
    SELECT DISTINCT ON (l.kind, l.dedup_key, CASE WHEN l.dedup_key IS NULL THEN l.id END) l.id
    FROM locked AS l
    WHERE l.dedup_key IS NULL
       OR NOT EXISTS (
           SELECT 1 FROM pgotask_task AS live
           WHERE live.kind = l.kind
             AND live.dedup_key = l.dedup_key
             AND live.status IN ('pending', 'running')
       )
    ORDER BY l.kind, l.dedup_key, CASE WHEN l.dedup_key IS NULL THEN l.id END, l.id DESC
),
retried AS (
    UPDATE pgotask_task AS t
    SET status = 'pending',
        run_at = now(),
        finished_at = NULL,
        started_at = NULL,
        result = NULL,
        locked_by = NULL,
        lease_expires_at = NULL,
        cancel_requested_at = NULL,
        -- Capped at the column's range rather than overflowing it.
        max_attempts = least(t.attempts::bigint + :extra_attempts, 2147483647)::integer
    FROM eligible
    WHERE t.id = eligible.id
    RETURNING t.id, t.queue
)
SELECT locked.id, (retried.id IS NOT NULL) AS retried, retried.queue
FROM locked LEFT JOIN retried ON retried.id = locked.id
ORDER BY locked.id

-- name: admin_notify_queues
-- Wake the workers of :queues, as the insert trigger does for new tasks:
-- one NOTIFY per queue, delivered when the transaction commits.
SELECT count(pg_notify('pgotask', q))
FROM (SELECT DISTINCT unnest(CAST(:queues AS text[])) AS q ORDER BY 1) AS queues

-- name: admin_cancel
-- Request the cancellation of the live tasks among :ids, as pgotask_cancel()
-- does: the pgotask_task_cancel_request trigger cancels a pending task at
-- once and notifies the worker of a running one, which ends 'cancelled' when
-- its handler returns.  Returns each task's status after the request.
UPDATE pgotask_task
SET cancel_requested_at = coalesce(cancel_requested_at, clock_timestamp())
WHERE id = ANY(CAST(:ids AS bigint[]))
  AND status IN ('pending', 'running')
RETURNING id, status::text AS status

-- name: admin_live_workers
-- Registered workers whose last heartbeat is at most :timeout_seconds old
-- (ages as differences of epochs: see admin_stats).
SELECT id, host, pid, last_heartbeat_at,
       extract(epoch FROM now())::float8
           - extract(epoch FROM last_heartbeat_at)::float8 AS heartbeat_age_seconds
FROM pgotask_worker
WHERE last_heartbeat_at >= now() - make_interval(secs => :timeout_seconds)
ORDER BY id

-- name: admin_stuck_slots
-- Live workers with handler threads stuck in a handler far past its timeout
-- (as their latest heartbeat reported), and for how long every one of
-- their threads has been (NULL while one is free).
SELECT id, stuck_slots, concurrency,
       extract(epoch FROM now())::float8
           - extract(epoch FROM all_stuck_since)::float8 AS all_stuck_seconds
FROM pgotask_worker
WHERE last_heartbeat_at >= now() - make_interval(secs => :timeout_seconds)
  AND stuck_slots > 0
ORDER BY id

-- name: admin_stuck_tasks
-- Running tasks whose lease expired more than :stuck_seconds ago: no worker
-- renews them, and no maintenance pass has rescued them.
SELECT id, kind, queue, locked_by,
       extract(epoch FROM now())::float8
           - extract(epoch FROM lease_expires_at)::float8 AS expired_seconds,
       count(*) OVER () AS total
FROM pgotask_task
WHERE status = 'running'
  AND lease_expires_at < now() - make_interval(secs => :stuck_seconds)
ORDER BY lease_expires_at, id
LIMIT :limit

-- name: admin_oldest_due
-- The oldest due pending task (by run_at) and how long it has waited.
SELECT id, kind, queue,
       extract(epoch FROM now())::float8 - extract(epoch FROM run_at)::float8 AS age_seconds
FROM pgotask_task
WHERE status = 'pending' AND run_at <= now()
ORDER BY run_at, id
LIMIT 1

-- name: admin_unhandled_due
-- Due pending tasks that no live worker claims: no worker with a heartbeat
-- in the last :timeout_seconds has a handler for the task's kind while
-- serving its queue (NULL queues: every queue).  Counted per (kind, queue),
-- at most :limit of them, the largest first.
WITH due AS (
    SELECT kind, queue, count(*) AS due
    FROM pgotask_task
    WHERE status = 'pending' AND run_at <= now()
    GROUP BY kind, queue
)
SELECT kind, queue, due, count(*) OVER () AS total
FROM due
WHERE NOT EXISTS (
    SELECT 1
    FROM pgotask_worker AS w
    WHERE w.last_heartbeat_at >= now() - make_interval(secs => :timeout_seconds)
      AND due.kind = ANY (w.kinds)
      AND (w.queues IS NULL OR due.queue = ANY (w.queues))
)
ORDER BY due DESC, kind, queue
LIMIT :limit
