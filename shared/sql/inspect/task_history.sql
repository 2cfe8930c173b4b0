-- A task's own transitions, in order. $1: the task.
SELECT NULL::text AS step, from_status, to_status, reason, metadata, created_at
FROM task_transitions WHERE task_id = $1 ORDER BY transition_id
