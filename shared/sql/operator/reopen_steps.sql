-- Send steps of task $1 back to `pending` with fresh budgets, recording the reason $4 and
-- the metadata $2: those its deadline cancelled, and with $3 those in `error` (a retry;
-- a resolve leaves its other failed steps as they are). A `tasker.task` step whose child
-- ended meanwhile is handed to the coordinator at once: that end, while the step was
-- cancelled, handed nothing back. The task has no deadline any more.
WITH old AS (
    SELECT s.step_id, s.status,
           s.child_task_id IS NOT NULL AND s.remaining_parents = 1
           AND (SELECT c.status FROM tasks c WHERE c.task_id = s.child_task_id)
               IN ('complete', 'error', 'cancelled', 'resolved_manually') AS child_ended
    FROM steps s
    WHERE s.task_id = $1
      AND (s.status = 'error' AND $3
           OR s.status = 'cancelled'
              AND (SELECT h.reason FROM step_transitions h
                   WHERE h.step_id = s.step_id
                   ORDER BY h.transition_id DESC LIMIT 1) = 'deadline_exceeded')
    ORDER BY s.step_id
    FOR UPDATE
),
reset AS (
    UPDATE steps s
    SET status = 'pending', attempts = 0, deferrals = 0, next_attempt_at = NULL,
        completed_at = NULL, updated_at = now(),
        remaining_parents = CASE WHEN old.child_ended THEN 0 ELSE s.remaining_parents END,
        ready_at = CASE WHEN s.remaining_parents = 0 OR old.child_ended THEN now() END
    FROM old
    WHERE s.step_id = old.step_id
    RETURNING s.step_id, s.task_id, old.status AS from_status
),
lifted AS (
    UPDATE tasks SET deadline_at = NULL WHERE task_id = $1 AND deadline_at IS NOT NULL
)
INSERT INTO step_transitions (step_id, task_id, from_status, to_status, reason, metadata)
SELECT step_id, task_id, from_status, 'pending', $4, $2 FROM reset
ORDER BY step_id
