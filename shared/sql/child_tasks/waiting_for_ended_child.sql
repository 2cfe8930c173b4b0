-- A `tasker.task` step `s` still waiting for its child (the steps_waiting_for_child
-- index) that has ended: an end no path handed back to it (a claim cancelled the child
-- as the oldest of its template's concurrency key).
s.child_task_id IS NOT NULL AND s.remaining_parents = 1 AND s.status = 'pending'
AND (SELECT c.status FROM tasks c WHERE c.task_id = s.child_task_id)
    IN ('complete', 'error', 'cancelled', 'resolved_manually')
