-- Started notices: per step ($1) its dispatch token ($2), start time ($3), whether the
-- message was redelivered ($4) and the worker ($7); lease grace ($5) and heartbeat lease
-- ($6) in ms; how many runs past its `retry_limit` a step restarted after redelivery may
-- count ($8). Answers each changed step's queue latency in seconds and its task's
-- namespace; then (latency and namespace NULL) each run withdrawn from its worker: the
-- step was cancelled, or is no longer under that dispatch (handed back and dispatched
-- again, or removed), as `heartbeat.sql` answers them, or a redelivered copy's step has
-- ended under it; then (with its task and attempts) each run lost to a crash loop: a
-- redelivered new run of a step whose attempts reached `retry_limit + $8`, not started
-- (the caller fails it).
WITH input AS (
    SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::timestamptz[], $4::bool[],
                         $7::text[])
        AS i(step_id, token, started_at, redelivered, worker_id)
),
-- One primary-key probe per notice (the module's "Plans"). The status is checked in
-- `moved`.
locked AS (
    SELECT s.step_id, s.task_id, s.dispatch_token AS token, s.status AS from_status,
           i.started_at, i.worker_id, i.redelivered, s.attempts,
           i.redelivered AND i.started_at IS DISTINCT FROM s.started_at AS new_run,
           s.attempts >= s.retry_limit + $8 AS spent
    FROM steps s JOIN input i ON i.step_id = s.step_id AND s.dispatch_token = i.token
    ORDER BY s.step_id
    FOR UPDATE OF s
),
moved AS (
    UPDATE steps s
    SET status = 'in_progress',
        started_at = l.started_at,
        -- Every start counts against a rate limit, a retry's too.
        rate_starts = CASE WHEN s.rate_key IS NOT NULL THEN
                          tasker_rate_starts(s.rate_starts, s.started_at, l.started_at,
                                             s.rate_window_ms)
                      END,
        worker_id = l.worker_id,
        attempts = s.attempts + CASE WHEN l.from_status = 'in_progress' THEN 1 ELSE 0 END,
        lease_expires_at = now() + least(s.timeout_ms + $5, $6) * interval '1 millisecond',
        updated_at = now()
    FROM locked l
    WHERE s.step_id = l.step_id
      AND (l.from_status = 'enqueued'
           OR (l.from_status = 'in_progress' AND l.new_run AND NOT l.spent))
    RETURNING s.step_id, s.task_id, s.attempts, l.from_status, l.worker_id,
              greatest(extract(epoch FROM l.started_at - s.ready_at), 0)::float8 AS latency
),
history AS (
    INSERT INTO step_transitions (step_id, task_id, from_status, to_status, reason, metadata)
    SELECT step_id, task_id, from_status, 'in_progress',
           CASE WHEN from_status = 'in_progress' THEN 'restarted_after_redelivery' ELSE 'started' END,
           jsonb_build_object('attempt', attempts, 'worker_id', worker_id)
    FROM moved
)
SELECT COALESCE(m.latency, 0) AS latency, t.namespace, NULL::uuid AS step_id,
       NULL::uuid AS token, NULL::uuid AS task_id, NULL::int AS attempts
FROM moved m JOIN tasks t ON t.task_id = m.task_id
UNION ALL
SELECT NULL, NULL, i.step_id, i.token, NULL, NULL
FROM input i
WHERE NOT EXISTS (SELECT 1 FROM locked l
                  WHERE l.step_id = i.step_id AND l.token = i.token
                    AND l.from_status <> 'cancelled'
                    AND NOT (i.redelivered
                             AND l.from_status IN ('complete', 'error', 'skipped',
                                                   'resolved_manually')))
UNION ALL
SELECT NULL, NULL, l.step_id, l.token, l.task_id, l.attempts
FROM locked l
WHERE l.from_status = 'in_progress' AND l.new_run AND l.spent
