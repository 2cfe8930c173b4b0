-- Cancel every unfinished step of task $1, recording $2 as the metadata.
WITH cancelled AS (
    UPDATE steps s
    SET status = 'cancelled', lease_expires_at = NULL, next_attempt_at = NULL,
        completed_at = now(), updated_at = now()
    FROM (SELECT step_id, status FROM steps
          WHERE task_id = $1
            AND status IN ('pending', 'enqueued', 'in_progress', 'waiting_for_retry')
          ORDER BY step_id FOR UPDATE) old
    WHERE s.step_id = old.step_id
    RETURNING s.step_id, s.task_id, old.status AS from_status
)
INSERT INTO step_transitions (step_id, task_id, from_status, to_status, reason, metadata)
SELECT step_id, task_id, from_status, 'cancelled', 'task_cancelled', $2 FROM cancelled
