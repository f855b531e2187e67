-- The schema revision the database is at (sqla_pgotask.schema).

-- name: schema_revision
SELECT pgotask_schema_revision();
