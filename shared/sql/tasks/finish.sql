-- Finish the tasks $1 that can finish (their rows already locked): `complete` when
-- every step is complete or resolved, `error` when a step failed and nothing can run.
-- A step that waits for its child task or its signal still runs: its task is not
-- finished under it (the child would go on, and what it makes ready would run in a
-- finished task).
WITH counts AS (
    SELECT task_id,
           count(*) AS total,
           count(*) FILTER (WHERE status IN ('complete', 'resolved_manually', 'skipped')) AS done,
           count(*) FILTER (WHERE status = 'error') AS failed,
           count(*) FILTER (WHERE status IN ('enqueued', 'in_progress', 'waiting_for_retry')
                               OR (status = 'pending'
                                   AND (remaining_parents = 0 OR wait_signal IS NOT NULL
                                        OR (child_task_id IS NOT NULL
                                            AND EXISTS (SELECT 1 FROM tasks c
                                                        WHERE c.task_id = s.child_task_id
                                                          AND c.status IN ('pending',
                                                                           'in_progress'))))))
               AS live
    FROM steps s
    WHERE task_id = ANY($1)
    GROUP BY task_id
),
outcome AS (
    SELECT task_id,
           CASE WHEN done = total THEN 'complete'
                WHEN failed > 0 AND live = 0 THEN 'error'
           END AS to_status
    FROM counts
),
-- Each task's status is read by its primary key. Written as a join, the
-- planner could start from tasks_by_status instead: after an ANALYZE taken
-- while no task ran, it expects one unfinished task, and it re-ran the counts
-- for each of the thousands there were (65,000 buffers per batch, and a third
-- less throughput with 100,000 tasks stored).
locked AS (
    SELECT l.task_id, l.from_status, l.to_status
    FROM (SELECT o.task_id, o.to_status,
                 (SELECT t.status FROM tasks t WHERE t.task_id = o.task_id)
                     AS from_status
          FROM outcome o
          WHERE o.to_status IS NOT NULL) l
    WHERE l.from_status IN ('pending', 'in_progress')
),
finished AS (
    UPDATE tasks t
    SET status = l.to_status, completed_at = now(), updated_at = now()
    FROM locked l
    WHERE t.task_id = l.task_id
    RETURNING t.task_id, t.namespace, t.status, l.from_status,
              t.concurrency_keys IS NOT NULL AS limited,
              t.parent_step_id IS NOT NULL AS has_parent, t.name,
              extract(epoch FROM t.completed_at - t.created_at)::FLOAT8 AS seconds
),
history AS (
    INSERT INTO task_transitions (task_id, from_status, to_status, reason)
    SELECT task_id, from_status, status,
           CASE WHEN status = 'complete' THEN 'all_steps_done' ELSE 'blocked_by_failures' END
    FROM finished
)
SELECT task_id, namespace, status, limited, has_parent, name, seconds FROM finished
