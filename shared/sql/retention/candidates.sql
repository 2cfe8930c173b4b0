-- Not a statement: the prunable tasks' condition, which lock_batch.sql and
-- count_prunable.sql take in place of their CANDIDATES placeholder. $1: the finished
-- statuses, $2: the task id bound, $3: the cutoff, $4: whether to keep unrelayed history.
-- A task of a tree of child tasks (`tasker.task`) goes only once every task of its tree
-- is finished before the cutoff: a retry of the parent needs its child's row, and a
-- child its parent's (the sweeper cancels the children of a parent a claim cancelled).
FROM tasks t
WHERE t.status = ANY($1) AND t.task_id < $2 AND t.completed_at < $3
  AND NOT EXISTS (SELECT 1 FROM tasks o
                  WHERE o.task_id = t.root_task_id
                    AND NOT (o.status = ANY($1) AND o.completed_at < $3))
  AND NOT EXISTS (SELECT 1 FROM tasks o
                  WHERE o.root_task_id = COALESCE(t.root_task_id, t.task_id)
                    AND NOT (o.status = ANY($1) AND o.completed_at < $3))
  AND NOT ($4 AND (
      EXISTS (SELECT 1 FROM task_transitions x, event_relay r
              WHERE r.id = 1 AND x.task_id = t.task_id
                AND x.transition_id > r.last_transition_id)
      OR EXISTS (SELECT 1 FROM step_transitions x, event_relay r
              WHERE r.id = 1 AND x.task_id = t.task_id
                AND x.transition_id > r.last_transition_id)))
