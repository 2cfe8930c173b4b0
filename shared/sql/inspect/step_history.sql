-- A task's step transitions, in order. $1: the task.
-- A dispatch's token fences its result: whoever holds it can complete the step,
-- so the history records it but never shows it.
SELECT s.name AS step, t.from_status, t.to_status, t.reason,
       t.metadata - 'dispatch_token' AS metadata, t.created_at
FROM step_transitions t JOIN steps s USING (step_id)
WHERE t.task_id = $1 ORDER BY t.transition_id
