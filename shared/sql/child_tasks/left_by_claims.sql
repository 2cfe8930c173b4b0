-- Whether a claim that cancelled tasks as the oldest of their template's concurrency key
-- left work behind: a `tasker.task` step still waiting for a child that ended
-- (`unheard.sql`), or a running child of such a task (`orphans.sql`). One read, so that
-- a sweep with nothing to do costs one statement.
SELECT EXISTS (
           SELECT 1 FROM steps s
           WHERE s.child_task_id IS NOT NULL AND s.remaining_parents = 1
             AND s.status = 'pending'
             AND (SELECT c.status FROM tasks c WHERE c.task_id = s.child_task_id)
                 IN ('complete', 'error', 'cancelled', 'resolved_manually'))
       OR EXISTS (
           SELECT 1 FROM tasks c
           WHERE c.parent_task_id IS NOT NULL AND c.status IN ('pending', 'in_progress')
             AND (SELECT p.status FROM tasks p WHERE p.task_id = c.parent_task_id)
                 = 'cancelled'
             AND (SELECT h.reason FROM task_transitions h
                  WHERE h.task_id = c.parent_task_id
                  ORDER BY h.transition_id DESC LIMIT 1) = 'cancelled_by_concurrency_limit')
