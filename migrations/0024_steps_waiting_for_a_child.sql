-- The `tasker.task` steps that wait for their child task (`remaining_parents = 1` until
-- the child's end hands the step back). The sweeper looks through them for children
-- that ended without handing their step back: a child its template's concurrency
-- cancelled as the oldest of its key (`on_limit: cancel_oldest`), inside a claim.
CREATE INDEX steps_waiting_for_child ON steps (child_task_id)
    WHERE child_task_id IS NOT NULL AND remaining_parents = 1 AND status = 'pending';
