-- Fail up to $1 `tasker.wait` steps whose timeout passed without their signal
-- (`wait_timeout`, for good); they are judged again, and wait again, when an operator
-- retries their task. Rows another coordinator holds are left to it. Returns the steps
-- and their tasks.
WITH due AS (
    SELECT s.step_id
    FROM steps s
    WHERE s.wait_until <= now() AND s.status = 'pending'
    ORDER BY s.wait_until
    LIMIT $1
    FOR UPDATE SKIP LOCKED
),
failed AS (
    UPDATE steps s
    SET status = 'error', remaining_parents = 0, wait_until = NULL, completed_at = now(),
        updated_at = now(),
        last_error = jsonb_build_object('kind', 'permanent', 'code', 'wait_timeout',
                                        'message', 'no signal `' || s.wait_signal
                                                   || '` came in time')
    FROM due d
    WHERE s.step_id = d.step_id
    RETURNING s.step_id, s.task_id, s.wait_signal
),
history AS (
    INSERT INTO step_transitions (step_id, task_id, from_status, to_status, reason, metadata)
    SELECT step_id, task_id, 'pending', 'error', 'failed',
           jsonb_build_object('error_code', 'wait_timeout', 'signal', wait_signal)
    FROM failed
    ORDER BY step_id
)
SELECT step_id, task_id FROM failed
