-- The retried task $1 takes back a slot of each of its template-concurrency keys (none
-- without a `concurrency`): it is not held by the limit, but counts against it while it
-- runs.
INSERT INTO task_slots (key, task_id)
SELECT k.key, t.task_id
FROM tasks t CROSS JOIN LATERAL unnest(t.concurrency_keys) AS k(key)
WHERE t.task_id = $1
ON CONFLICT DO NOTHING
