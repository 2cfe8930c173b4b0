-- Send the failed steps of task $1 back to `pending` with fresh budgets, recording $2
-- as the metadata.
WITH reset AS (
    UPDATE steps
    SET status = 'pending', attempts = 0, deferrals = 0, next_attempt_at = NULL,
        completed_at = NULL, updated_at = now(),
        ready_at = CASE WHEN remaining_parents = 0 THEN now() END
    WHERE task_id = $1 AND status = 'error'
    RETURNING step_id, task_id
)
INSERT INTO step_transitions (step_id, task_id, from_status, to_status, reason, metadata)
SELECT step_id, task_id, 'error', 'pending', 'retry_requested', $2 FROM reset
