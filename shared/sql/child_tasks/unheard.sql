-- Up to $1 children that ended while the `tasker.task` step that started them still
-- waits for them.
SELECT s.child_task_id
FROM steps s
WHERE {WAITING_FOR_ENDED_CHILD}
ORDER BY s.child_task_id
LIMIT $1
