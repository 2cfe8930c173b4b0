-- The `tasker.task` steps whose children, among the tasks $1, ended: their last parent
-- is done, so the claim hands them to the coordinator, which completes them, retries the
-- child or fails them. Returns the steps.
UPDATE steps s
SET remaining_parents = 0, ready_at = now(), updated_at = now()
FROM (SELECT c.task_id, c.parent_step_id FROM tasks c
      WHERE c.task_id = ANY ($1) AND c.parent_step_id IS NOT NULL) c
WHERE s.step_id = c.parent_step_id AND s.child_task_id = c.task_id
  AND (s.status = 'pending') IS TRUE AND s.remaining_parents = 1
RETURNING s.step_id
