-- Fleet-wide limits: at most N running tasks, and at most N starts per
-- period, per kind ('kind:<name>') or per queue ('queue:<name>').
--
-- A claim of limited tasks is one short READ COMMITTED transaction of four
-- statements, sent together (psycopg pipeline mode, one round trip):
--
--   BEGIN ISOLATION LEVEL READ COMMITTED;
--   limits_ensure   -- the limit rows exist
--   limits_lock     -- lock them, in key order: claimers of a limit take turns
--   limits_claim    -- count, claim within the allowance, log the starts
--   COMMIT;
--
-- limits_claim is a later statement than the lock, so under READ COMMITTED
-- it takes a new snapshot, taken once the lock is held: it sees every
-- claim the previous holders of the lock committed.  Counting and claiming
-- in the statement that waits for the lock would not: a statement's snapshot
-- is taken before it waits.

-- name: limits_ensure
-- New limit rows, inserted in key order (two claimers creating the same
-- rows cannot deadlock).  A concurrent claimer inserting the same key waits
-- here for the first one's commit, then finds the row.
INSERT INTO pgotask_limit (key)
SELECT k.key FROM unnest(CAST(:keys AS text[])) AS k (key)
ORDER BY k.key
ON CONFLICT (key) DO NOTHING;

-- name: limits_lock
-- Lock this worker's limit rows, in key order (no deadlocks between workers
-- declaring overlapping limits).  Held until the claim commits.
SELECT key
FROM pgotask_limit
WHERE key = ANY(CAST(:keys AS text[]))
ORDER BY key
FOR UPDATE;

-- name: limits_claim
-- With the limit rows locked: the allowance of each limit (max_running
-- minus the tasks running now; rate count minus the starts logged within
-- the period), then due tasks subject to a limit, in claim order, at most
-- the allowance of each limit a task is subject to (kind and queue), at
-- most :limit in all.  A claimed task counts as running from its claim.
-- The starts are appended to each rate-limited row's log, which keeps only
-- the starts still within the period (at most the rate's count).
--
-- Returns the claimed rows, each with retry_in: seconds until the first
-- full rate window frees a start (NULL if none is full).  With nothing
-- claimed, one row of NULLs carries retry_in.
WITH lim AS (
    SELECT d.key, d.kind, d.queue, d.max_running, d.rate_count, d.rate_per,
           COALESCE(l.recent_starts, CAST('{}' AS timestamptz[])) AS recent_starts
    FROM unnest(CAST(:keys AS text[]), CAST(:key_kinds AS text[]), CAST(:key_queues AS text[]),
                CAST(:max_running AS integer[]), CAST(:rate_counts AS integer[]),
                CAST(:rate_pers AS float8[]))
        AS d (key, kind, queue, max_running, rate_count, rate_per)
    LEFT JOIN pgotask_limit AS l ON l.key = d.key
),
allow AS (
    SELECT lim.*,
           LEAST(
               CASE WHEN lim.max_running IS NULL THEN :limit
                    ELSE lim.max_running - (
                        SELECT count(*) FROM pgotask_task AS t
                        WHERE t.status = 'running'
                          AND (t.kind = lim.kind OR t.queue = lim.queue)) END,
               CASE WHEN lim.rate_count IS NULL THEN :limit
                    ELSE lim.rate_count - (
                        SELECT count(*) FROM unnest(lim.recent_starts) AS s (at)
                        WHERE s.at > statement_timestamp()
                                     - make_interval(secs => lim.rate_per)) END,
               :limit
           ) AS allowance
    FROM lim
),
-- For each limit with room, its first due tasks (no more than its
-- allowance) among those whose other limit, if any, has room too.
picks AS (
    SELECT p.id
    FROM allow AS a
    CROSS JOIN LATERAL (
        SELECT t.id
        FROM pgotask_task AS t
        WHERE {{claimable}}
          AND t.run_at <= statement_timestamp()
          AND (CAST(:queues AS text[]) IS NULL OR t.queue = ANY(CAST(:queues AS text[])))
          AND (t.kind = a.kind OR t.queue = a.queue)
          AND NOT EXISTS (
              SELECT 1 FROM allow AS x
              WHERE x.allowance <= 0 AND (x.kind = t.kind OR x.queue = t.queue))
        ORDER BY t.priority DESC, t.run_at, t.id
        LIMIT a.allowance
    ) AS p
    WHERE a.allowance > 0
),
locked AS (
    SELECT t.id, t.kind, t.queue, t.priority, t.run_at
    FROM pgotask_task AS t
    WHERE t.id IN (SELECT id FROM picks)
      AND t.status = 'pending'
    FOR UPDATE SKIP LOCKED
),
-- Within each kind limit's allowance, then within each queue limit's
-- allowance (a task subject to both must fit both).  A claim may take fewer
-- than the limits allow (never more); the next claim takes the rest.
by_kind AS (
    SELECT l.*,
           row_number() OVER (PARTITION BY l.kind ORDER BY l.priority DESC, l.run_at, l.id) AS n
    FROM locked AS l
),
kind_ok AS (
    SELECT b.id, b.kind, b.queue, b.priority, b.run_at
    FROM by_kind AS b
    WHERE b.n <= COALESCE((SELECT a.allowance FROM allow AS a WHERE a.kind = b.kind), b.n)
),
by_queue AS (
    SELECT k.*,
           row_number() OVER (PARTITION BY k.queue ORDER BY k.priority DESC, k.run_at, k.id) AS n
    FROM kind_ok AS k
),
chosen AS (
    SELECT q.id, q.kind
    FROM by_queue AS q
    WHERE q.n <= COALESCE((SELECT a.allowance FROM allow AS a WHERE a.queue = q.queue), q.n)
    ORDER BY q.priority DESC, q.run_at, q.id
    LIMIT :limit
),
claimed AS (
    UPDATE pgotask_task AS t
    SET {{claim_writes}}
    FROM chosen
    JOIN unnest(CAST(:kinds AS text[]), CAST(:max_attempts AS integer[])) AS h (kind, max_attempts)
        ON h.kind = chosen.kind
    WHERE t.id = chosen.id
    RETURNING t.*
),
started AS (
    SELECT a.key, count(*) AS n
    FROM allow AS a
    JOIN claimed AS c ON c.kind = a.kind OR c.queue = a.queue
    WHERE a.rate_count IS NOT NULL
    GROUP BY a.key
),
logged AS (
    UPDATE pgotask_limit AS l
    SET recent_starts = ARRAY(
            SELECT w.at
            FROM (
                SELECT s.at
                FROM (
                    SELECT u.at FROM unnest(a.recent_starts) AS u (at)
                    WHERE u.at > statement_timestamp() - make_interval(secs => a.rate_per)
                    UNION ALL
                    SELECT statement_timestamp() FROM generate_series(1, st.n)
                ) AS s (at)
                ORDER BY s.at DESC
                LIMIT a.rate_count
            ) AS w
            ORDER BY w.at),
        updated_at = statement_timestamp()
    FROM allow AS a
    JOIN started AS st ON st.key = a.key
    WHERE l.key = a.key
    RETURNING l.key, l.recent_starts
),
retry AS (
    SELECT min(EXTRACT(EPOCH FROM w.oldest + make_interval(secs => a.rate_per)
                                  - statement_timestamp())) AS retry_in
    FROM allow AS a
    LEFT JOIN logged AS g ON g.key = a.key
    CROSS JOIN LATERAL (
        SELECT min(u.at) AS oldest, count(*) AS n
        FROM unnest(COALESCE(g.recent_starts, a.recent_starts)) AS u (at)
        WHERE u.at > statement_timestamp() - make_interval(secs => a.rate_per)
    ) AS w
    WHERE a.rate_count IS NOT NULL AND w.n >= a.rate_count
)
SELECT c.*, retry.retry_in AS pgotask_retry_in
FROM retry
LEFT JOIN claimed AS c ON true;
