-- Send the failed steps of task $1 back to `pending` with fresh budgets, recording $2
-- as the metadata: those in `error`, and those its deadline cancelled. The retried task
-- has no deadline any more.
WITH old AS (
    SELECT s.step_id, s.status
    FROM steps s
    WHERE s.task_id = $1
      AND (s.status = 'error'
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
        ready_at = CASE WHEN s.remaining_parents = 0 THEN now() END
    FROM old
    WHERE s.step_id = old.step_id
    RETURNING s.step_id, s.task_id, old.status AS from_status
),
lifted AS (
    UPDATE tasks SET deadline_at = NULL WHERE task_id = $1 AND deadline_at IS NOT NULL
)
INSERT INTO step_transitions (step_id, task_id, from_status, to_status, reason, metadata)
SELECT step_id, task_id, from_status, 'pending', 'retry_requested', $2 FROM reset
ORDER BY step_id
