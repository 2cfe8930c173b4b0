-- The `tasker.task` steps that wait for their child task (`remaining_parents = 1` until
-- the child's end hands the step back). The sweeper looks through them for children
-- that ended without handing their step back: a child its template's concurrency
-- cancelled as the oldest of its key (`on_limit: cancel_oldest`), inside a claim.
CREATE INDEX steps_waiting_for_child ON steps (child_task_id)
    WHERE child_task_id IS NOT NULL AND remaining_parents = 1 AND status = 'pending';

-- The child tasks that run. The sweeper looks through them for children whose parent
-- task was cancelled without them (by a claim, as the oldest of its template's
-- concurrency key), to cancel them as an operator's cancel of the parent would have.
CREATE INDEX tasks_running_children ON tasks (parent_task_id)
    WHERE parent_task_id IS NOT NULL AND status IN ('pending', 'in_progress');

-- How far below its root a task is: 0 for a task created by a caller or a schedule, its
-- parent's plus one for a child task. A `tasker.task` step of a task at the deepest level
-- allowed fails instead of starting its child, so a template that starts itself stops.
ALTER TABLE tasks ADD COLUMN depth SMALLINT NOT NULL DEFAULT 0;
