-- Per step of template $1/$2, over its newest $5 tasks whose ids are $3 (included) to
-- $4 (excluded), and of those at most $6 steps, the newest tasks' first (a fan-out of
-- thousands of instances would otherwise make the call's cost unbounded): a fan-out's
-- instances (named `step[index]`) count for their step (the step itself never runs);
-- a step not run (skipped, never reached) counts in no rate. Run time is the last
-- attempt's, start to completion; wait is ready to started; done is ready to completion.
WITH s AS (
    SELECT split_part(s.name, '[', 1) AS step,
           s.position, s.status, s.attempts,
           extract(epoch FROM s.completed_at - s.started_at)::FLOAT8 * 1000 AS run_ms,
           extract(epoch FROM s.started_at - s.ready_at)::FLOAT8 * 1000 AS wait_ms,
           extract(epoch FROM s.completed_at - s.ready_at)::FLOAT8 * 1000 AS done_ms
    FROM (SELECT t.task_id FROM tasks t
          WHERE t.namespace = $1 AND t.name = $2 AND t.task_id >= $3 AND t.task_id < $4
          ORDER BY t.task_id DESC
          LIMIT $5) t
    -- One index probe per task (OFFSET 0 keeps the planner from hashing every step).
    CROSS JOIN LATERAL (SELECT * FROM steps s
                        WHERE s.task_id = t.task_id AND s.instances IS NULL OFFSET 0) s
    LIMIT $6
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
