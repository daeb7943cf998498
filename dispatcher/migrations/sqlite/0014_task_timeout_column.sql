-- The last spec field the watcher decides from (a task past its timeout is ended),
-- kept beside the spec blob with the summary columns of 0013, so the sweeps of the
-- watcher, the launcher and the orphan pass read columns only and never the blob.
-- Written with the task (store::tasks::insert_task); a spec never changes once stored.
-- Keep in step with ../postgres/0014_task_timeout_column.sql.
ALTER TABLE tasks ADD COLUMN timeout_seconds BIGINT NOT NULL DEFAULT 0;
UPDATE tasks SET timeout_seconds = COALESCE(json_extract(spec, '$.timeout_seconds'), 0);
