-- Move task $1 from $2 to $3 (if it is still in $2) and record why: $4, $5 metadata.
WITH moved AS (
    UPDATE tasks
    SET status = $3, updated_at = now(),
        completed_at = CASE WHEN $3 IN ('complete', 'error', 'cancelled', 'resolved_manually')
                            THEN now() END
    WHERE task_id = $1 AND status = $2
    RETURNING task_id
)
INSERT INTO task_transitions (task_id, from_status, to_status, reason, metadata)
SELECT task_id, $2, $3, $4, $5 FROM moved
