-- Resolve step $2 of task $1 with results $3 (it was in $4; $5 metadata), and count it
-- as done for its dependents.
WITH resolved AS (
    UPDATE steps
    SET status = 'resolved_manually', results = $3, lease_expires_at = NULL,
        next_attempt_at = NULL, completed_at = now(), updated_at = now()
    WHERE task_id = $1 AND name = $2
    RETURNING step_id, task_id
),
history AS (
    INSERT INTO step_transitions (step_id, task_id, from_status, to_status, reason, metadata)
    SELECT step_id, task_id, $4, 'resolved_manually', 'resolved_by_operator', $5 FROM resolved
)
UPDATE steps c
SET remaining_parents = c.remaining_parents - 1,
    ready_at = CASE WHEN c.remaining_parents = 1 THEN now() ELSE c.ready_at END
FROM step_edges e JOIN resolved r ON r.step_id = e.from_step
WHERE c.step_id = e.to_step
