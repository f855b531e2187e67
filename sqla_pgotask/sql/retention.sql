-- Deleting finished tasks in the workers' maintenance loop
-- (sqla_pgotask.worker.pruning).

-- name: retention_batch
-- One batch of the maintenance loop's retention: finished tasks whose status
-- has a retention period and that finished longer ago than it, walking the
-- primary key up from :after (so a pass reads the table about once).  Each
-- batch is its own short transaction; locked rows are left for the next
-- pass; the tasks' errors go by ON DELETE CASCADE.
WITH policy AS (
    SELECT *
    FROM unnest(CAST(:statuses AS text[]), CAST(:keep_seconds AS float8[])) AS p (status, keep)
),
doomed AS (
    SELECT t.id
    FROM pgotask_task AS t
    JOIN policy AS p ON t.status = p.status
    WHERE t.id > :after
      AND t.finished_at < now() - make_interval(secs => p.keep)
    ORDER BY t.id
    LIMIT :batch_size
    FOR UPDATE OF t SKIP LOCKED
),
deleted AS (
    DELETE FROM pgotask_task AS t
    USING doomed
    WHERE t.id = doomed.id
    RETURNING t.id
)
SELECT count(*), max(id) FROM deleted;
