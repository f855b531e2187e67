-- Statements of the metrics integrations (sqla_pgotask.otel, sqla_pgotask.prometheus).

-- name: metrics_queue_depth
-- The live tasks per (queue, kind): pending split into due and scheduled
-- later, running, and how long the oldest due task has waited past its
-- run_at (0 when none is due).  Each branch reads one partial index
-- (ix_pgotask_task_claim, ix_pgotask_task_lease), so the cost follows the
-- live tasks, not the finished ones kept for retention.
SELECT queue,
       kind,
       count(*) FILTER (WHERE status = 'pending' AND run_at <= now()) AS due,
       count(*) FILTER (WHERE status = 'pending' AND run_at > now()) AS scheduled,
       count(*) FILTER (WHERE status = 'running') AS running,
       COALESCE(extract(epoch FROM now() - min(run_at) FILTER (
           WHERE status = 'pending' AND run_at <= now()
       )), 0)::float8 AS oldest_due_seconds
FROM (
    SELECT queue, kind, status, run_at FROM pgotask_task WHERE status = 'pending'
    UNION ALL
    SELECT queue, kind, status, run_at FROM pgotask_task WHERE status = 'running'
) AS live
GROUP BY queue, kind
ORDER BY queue, kind

-- name: metrics_stuck_slots
-- Each registered worker's handler threads stuck in a handler far past its
-- timeout, as its latest heartbeat reported (0 for most).
SELECT id AS worker, stuck_slots FROM pgotask_worker ORDER BY id
