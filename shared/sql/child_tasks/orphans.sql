-- Up to $1 unfinished child tasks whose parent task was cancelled without them (the
-- tasks_running_children index): by a claim, as the oldest of its template's concurrency
-- key (`on_limit: cancel_oldest`). Locked; rows another coordinator holds are left to it.
SELECT c.task_id, c.parent_task_id, c.status
FROM tasks c
WHERE c.parent_task_id IS NOT NULL AND c.status IN ('pending', 'in_progress')
  AND (SELECT p.status FROM tasks p WHERE p.task_id = c.parent_task_id) = 'cancelled'
ORDER BY c.task_id
LIMIT $1
FOR UPDATE SKIP LOCKED
