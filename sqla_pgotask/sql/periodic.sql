-- Periodic schedules: one task per (schedule, slot), however many workers
-- enqueue it.  A worker's enqueue step is one short transaction:
-- periodic_create_schedules, periodic_lock_schedules, periodic_now, then
-- periodic_insert_tasks and periodic_save_schedules for what is due.  The
-- row lock keeps workers from doing the same work at the same moment; the
-- unique index uq_pgotask_task_slot is the guarantee.

-- name: periodic_create_schedules
-- Rows for the schedules the database does not know yet.  last_slot stays
-- NULL: the worker that locks the row starts the schedule from now.  Sorted
-- by name, so that workers creating several rows never wait on each other
-- in a cycle.
INSERT INTO pgotask_schedule (name, kind, expression, timezone)
SELECT s.name, s.kind, s.expression, s.timezone
FROM unnest(
    CAST(:names AS text[]),
    CAST(:kinds AS text[]),
    CAST(:expressions AS text[]),
    CAST(:timezones AS text[])
) AS s (name, kind, expression, timezone)
ORDER BY s.name
ON CONFLICT (name) DO NOTHING;

-- name: periodic_lock_schedules
-- The rows of these schedules that no other worker is handling right now.
SELECT name, kind, expression, timezone, last_slot
FROM pgotask_schedule
WHERE name = ANY(CAST(:names AS text[]))
ORDER BY name
FOR UPDATE SKIP LOCKED;

-- name: periodic_now
-- The database clock (slots are due by it, whatever the hosts' clocks say),
-- and the paused queues: a schedule whose queue is paused enqueues nothing,
-- and its missed policy decides what runs once the queue is resumed.
SELECT clock_timestamp(), ARRAY(SELECT name FROM pgotask_queue WHERE paused_at IS NOT NULL);

-- name: periodic_insert_tasks
-- The fence: a slot already enqueued (by another worker, or before its row
-- was reset) is left alone.  The insert trigger wakes the workers.
INSERT INTO pgotask_task (kind, queue, payload, priority, schedule, slot)
SELECT t.kind, t.queue, CAST(t.payload AS jsonb), COALESCE(t.priority, 0), t.schedule, t.slot
FROM unnest(
    CAST(:kinds AS text[]),
    CAST(:queues AS text[]),
    CAST(:payloads AS text[]),
    CAST(:priorities AS integer[]),
    CAST(:schedules AS text[]),
    CAST(:slots AS timestamptz[])
) AS t (kind, queue, payload, priority, schedule, slot)
ON CONFLICT (schedule, slot) WHERE schedule IS NOT NULL DO NOTHING
RETURNING id, schedule, slot;

-- name: periodic_save_schedules
-- The new last_slot (and the definition, when it changed) of locked rows.
-- The worker only ever moves last_slot forwards.
UPDATE pgotask_schedule AS s
SET kind = u.kind,
    expression = u.expression,
    timezone = u.timezone,
    last_slot = u.last_slot,
    updated_at = clock_timestamp()
FROM unnest(
    CAST(:names AS text[]),
    CAST(:kinds AS text[]),
    CAST(:expressions AS text[]),
    CAST(:timezones AS text[]),
    CAST(:last_slots AS timestamptz[])
) AS u (name, kind, expression, timezone, last_slot)
WHERE s.name = u.name;
