-- A task's step transitions, in order: the newest $2 of them (NULL: all). $1: the task.
-- A dispatch's token fences its result: whoever holds it can complete the step,
-- so the history records it but never shows it.
SELECT step, from_status, to_status, reason, metadata, created_at
FROM (SELECT s.name AS step, t.from_status, t.to_status, t.reason,
             t.metadata - 'dispatch_token' AS metadata, t.created_at, t.transition_id
      FROM step_transitions t JOIN steps s USING (step_id)
      WHERE t.task_id = $1
      ORDER BY t.transition_id DESC
      LIMIT $2) newest
ORDER BY transition_id
