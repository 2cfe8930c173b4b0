-- A task's ($1) steps in template order (a `for_each` step followed by its instances in
-- element order), each with the names of its parents (a step's instances are not among
-- them), and a `tasker.task` step's child; only the step named $2 when it is not NULL.
-- With their results when $3; otherwise without (`results_omitted`), and with the size of
-- each one's results as JSON when $4, for the caller to choose which to read.
SELECT s.step_id, s.name, s.handler, s.status, s.attempts, s.retry_limit, s.deferrals,
       s.retryable,
       s.timeout_ms, CASE WHEN $3 THEN s.results END AS results,
       s.results IS NOT NULL AND NOT $3 AS results_omitted,
       CASE WHEN $4 AND NOT $3 THEN octet_length(s.results::text)::bigint END AS results_size,
       s.last_error, s.next_attempt_at, s.started_at,
       s.completed_at, s.instances,
       (SELECT f.name FROM steps f WHERE f.step_id = s.fan_out_of) AS instance_of,
       s.item_index AS index, s.child_task_id,
       ARRAY(SELECT p.name FROM step_edges e JOIN steps p ON p.step_id = e.from_step
             WHERE e.to_step = s.step_id AND p.fan_out_of IS NULL
             ORDER BY p.position) AS depends_on
FROM steps s
WHERE s.task_id = $1 AND ($2::text IS NULL OR s.name = $2)
ORDER BY s.position, s.item_index NULLS FIRST
