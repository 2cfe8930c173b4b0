-- Per template of namespace $1 (NULL: every namespace), the tasks created in the window
-- whose ids are $2 (included) to $3 (excluded): task ids are UUIDv7, so a time window is
-- an id range of `tasks_by_template`, read per template. How many there are is counted
-- over the whole window; the outcomes and durations are those of its newest $4 tasks
-- (`considered`). Durations are of the complete tasks, creation to completion.
SELECT tp.namespace, tp.name,
       (SELECT count(*) FROM tasks c
        WHERE c.namespace = tp.namespace AND c.name = tp.name
          AND c.task_id >= $2 AND c.task_id < $3) AS tasks,
       count(*) AS considered,
       count(*) FILTER (WHERE t.status = 'complete') AS complete,
       count(*) FILTER (WHERE t.status = 'error') AS error,
       count(*) FILTER (WHERE t.status = 'cancelled') AS cancelled,
       count(*) FILTER (WHERE t.status IN ('complete', 'error')) AS finished,
       (array_agg(t.task_id ORDER BY t.task_id))[1] AS oldest,
       percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP (ORDER BY t.ms)
           FILTER (WHERE t.status = 'complete') AS duration_ms
FROM (SELECT DISTINCT n.name AS namespace, tm.name
      FROM templates tm JOIN namespaces n ON n.namespace_id = tm.namespace_id
      WHERE $1::TEXT IS NULL OR n.name = $1) tp
CROSS JOIN LATERAL (
    SELECT t.task_id, t.status,
           extract(epoch FROM t.completed_at - t.created_at)::FLOAT8 * 1000 AS ms
    FROM tasks t
    WHERE t.namespace = tp.namespace AND t.name = tp.name
      AND t.task_id >= $2 AND t.task_id < $3
    ORDER BY t.task_id DESC
    LIMIT $4
) t
GROUP BY tp.namespace, tp.name
ORDER BY tp.namespace, tp.name
