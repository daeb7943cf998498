-- The spec fields a list page shows (image, and the resources its price comes from),
-- kept beside the spec blob so `GET /v1/tasks` (summary view) reads columns only and
-- never the blob, which can be a mebibyte per task. Written with the task
-- (store::tasks::insert_task); a spec never changes once stored.
-- Keep in step with ../postgres/0013_task_summary_columns.sql.
ALTER TABLE tasks ADD COLUMN image TEXT NOT NULL DEFAULT '';
ALTER TABLE tasks ADD COLUMN resources TEXT NOT NULL DEFAULT '{}';
UPDATE tasks SET image = COALESCE(json_extract(spec, '$.image'), ''),
                 resources = COALESCE(json_extract(spec, '$.resources'), '{}');
