-- Up to $1 children that ended while the `tasker.task` step that started them still
-- waits for them (the steps_waiting_for_child index): children that a claim cancelled as
-- the oldest of their template's concurrency key (`on_limit: cancel_oldest`).
SELECT s.child_task_id
FROM steps s
WHERE s.child_task_id IS NOT NULL AND s.remaining_parents = 1 AND s.status = 'pending'
  AND (SELECT c.status FROM tasks c WHERE c.task_id = s.child_task_id)
      IN ('complete', 'error', 'cancelled', 'resolved_manually')
ORDER BY s.child_task_id
LIMIT $1
