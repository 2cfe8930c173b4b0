-- Per step of template $1/$2, over its tasks whose ids are $3 (included) to $4
-- (excluded): a fan-out's instances count for their step (the step itself never runs);
-- a step not run (skipped, never reached) counts in no rate. Run time is the last
-- attempt's, start to completion; wait is ready to started; done is ready to completion.
WITH s AS (
    SELECT COALESCE(f.name, s.name) AS step, s.position, s.status, s.attempts,
           extract(epoch FROM s.completed_at - s.started_at)::FLOAT8 * 1000 AS run_ms,
           extract(epoch FROM s.started_at - s.ready_at)::FLOAT8 * 1000 AS wait_ms,
           extract(epoch FROM s.completed_at - s.ready_at)::FLOAT8 * 1000 AS done_ms
    FROM tasks t
    JOIN steps s ON s.task_id = t.task_id
    LEFT JOIN steps f ON f.step_id = s.fan_out_of
    WHERE t.namespace = $1 AND t.name = $2 AND t.task_id >= $3 AND t.task_id < $4
      AND s.instances IS NULL
)
SELECT step, min(position) AS position,
       count(*) FILTER (WHERE attempts > 0) AS runs,
       (avg(attempts) FILTER (WHERE attempts > 0))::FLOAT8 AS mean_attempts,
       (count(*) FILTER (WHERE status = 'error'))::FLOAT8
           / NULLIF(count(*) FILTER (WHERE status IN ('complete', 'error')), 0) AS error_rate,
       (count(*) FILTER (WHERE attempts > 1))::FLOAT8
           / NULLIF(count(*) FILTER (WHERE attempts > 0), 0) AS retry_rate,
       percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP (ORDER BY run_ms)
           FILTER (WHERE status = 'complete' AND run_ms IS NOT NULL) AS run_ms,
       percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP (ORDER BY wait_ms)
           FILTER (WHERE wait_ms IS NOT NULL) AS wait_ms,
       avg(done_ms) FILTER (WHERE status = 'complete') AS mean_done_ms
FROM s
GROUP BY step
ORDER BY min(position), step
