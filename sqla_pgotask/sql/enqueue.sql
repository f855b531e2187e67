-- Adding tasks in bulk (sqla_pgotask.enqueue.add_many).

-- name: bulk_insert
-- Many tasks in one statement and one round trip (add_many).  The payloads
-- come as one JSON array, serialised once.  Every other column comes either
-- as one value for all the rows (:kind, :queue, ...), or as an array with one
-- element per row (:kinds, :queues, ...), or as neither (both NULL): then it
-- takes the table's default, as does a NULL element or a JSON null payload.
-- ROWS FROM zips the payloads with the arrays, in order; a NULL array
-- yields no rows and is padded with NULLs.  The insert trigger fires once for
-- the statement: one NOTIFY per distinct queue, not one per row.
-- :trace_context (the enqueuing span's, with tracing on) is the same for all.
INSERT INTO pgotask_task (kind, queue, payload, priority, run_at, max_attempts, dedup_key,
                          on_duplicate, trace_context)
SELECT COALESCE(t.kind, CAST(:kind AS text)),
       COALESCE(t.queue, CAST(:queue AS text), 'default'),
       COALESCE(NULLIF(t.payload, CAST('null' AS jsonb)), CAST('{}' AS jsonb)),
       COALESCE(t.priority, CAST(:priority AS integer), 0),
       COALESCE(t.run_at, CAST(:run_at AS timestamptz), now()),
       COALESCE(t.max_attempts, CAST(:max_attempts AS integer)),
       t.dedup_key,
       t.on_duplicate,
       CAST(:trace_context AS jsonb)
FROM ROWS FROM (
         jsonb_array_elements(CAST(:payloads AS jsonb)),
         unnest(CAST(:kinds AS text[])),
         unnest(CAST(:queues AS text[])),
         unnest(CAST(:priorities AS integer[])),
         unnest(CAST(:run_ats AS timestamptz[])),
         unnest(CAST(:max_attempts_list AS integer[])),
         unnest(CAST(:dedup_keys AS text[])),
         unnest(CAST(:on_duplicates AS text[]))
     ) AS t (payload, kind, queue, priority, run_at, max_attempts, dedup_key, on_duplicate);
