-- An unfinished child task `c` (the tasks_running_children index) whose parent task a
-- claim cancelled without it, as the oldest of its template's concurrency key
-- (`on_limit: cancel_oldest`; an operator's cancel takes the children with it).
c.parent_task_id IS NOT NULL AND c.status IN ('pending', 'in_progress')
AND (SELECT p.status FROM tasks p WHERE p.task_id = c.parent_task_id) = 'cancelled'
AND (SELECT h.reason FROM task_transitions h
     WHERE h.task_id = c.parent_task_id
     ORDER BY h.transition_id DESC LIMIT 1) = 'cancelled_by_concurrency_limit'
