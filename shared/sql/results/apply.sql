-- Write what the decision made of a batch of results: per step ($1) the status it had
-- ($2, `enqueued` or `in_progress`) and gets ($3), why ($4), its results ($5, only with
-- a completion), last error ($6), the attempt that answered ($7), the attempts and deferrals
-- to store ($8, $9), the wait before the next attempt ($10, ms), and the run's start,
-- end and worker ($11–$13) and error code ($14). The caller holds the rows. Returns the
-- concurrency keys of the changed steps: each freed a slot of its key.
WITH input AS (
    SELECT *
    FROM unnest($1::UUID[], $2::TEXT[], $3::TEXT[], $4::TEXT[], $5::JSONB[], $6::JSONB[],
                $7::INT[], $8::INT[], $9::INT[], $10::FLOAT8[], $11::TIMESTAMPTZ[],
                $12::TIMESTAMPTZ[], $13::TEXT[], $14::TEXT[])
        AS i(step_id, from_status, to_status, reason, results, last_error, run_attempt,
             attempts, deferrals, delay_ms, started_at, finished_at, worker_id, error_code)
),
updated AS (
    UPDATE steps s
    SET status = i.to_status,
        results = COALESCE(i.results, s.results),
        last_error = i.last_error,
        attempts = i.attempts,
        deferrals = i.deferrals,
        next_attempt_at = now() + i.delay_ms * INTERVAL '1 millisecond',
        ready_at = COALESCE(now() + i.delay_ms * INTERVAL '1 millisecond', s.ready_at),
        started_at = i.started_at,
        -- A start its notice did not record counts against a rate limit.
        rate_starts = CASE WHEN s.rate_key IS NOT NULL THEN
                          tasker_rate_starts(s.rate_starts, s.started_at, i.started_at,
                                             s.rate_window_ms)
                      END,
        completed_at = CASE WHEN i.to_status IN ('complete', 'error') THEN i.finished_at END,
        lease_expires_at = NULL,
        updated_at = now()
    FROM input i
    -- One primary-key probe per result (the transitions module's "Plans"). The rows are
    -- locked since results/current.sql read the statuses decided on.
    WHERE s.step_id = i.step_id
    RETURNING s.step_id, s.task_id, s.next_attempt_at, i.from_status, i.to_status, i.reason,
              i.run_attempt, i.worker_id, i.error_code, i.started_at, i.finished_at,
              s.concurrency_key
),
-- A result that overtook its started notice also records the start, so the history (and
-- the events derived from it) always has step.started before the outcome. Rows are
-- inserted in (step, order) so their ids follow.
history AS (
    INSERT INTO step_transitions (step_id, task_id, from_status, to_status, reason, metadata)
    SELECT h.step_id, h.task_id, h.from_status, h.to_status, h.reason, h.metadata
    FROM (
        SELECT u.step_id, u.task_id, 1 AS n, 'enqueued' AS from_status,
               'in_progress' AS to_status, 'started' AS reason,
               jsonb_build_object('attempt', u.run_attempt, 'worker_id', u.worker_id) AS metadata
        FROM updated u WHERE u.from_status = 'enqueued'
        UNION ALL
        SELECT u.step_id, u.task_id, 2, 'in_progress', u.to_status, u.reason,
               jsonb_strip_nulls(jsonb_build_object(
                   'attempt', u.run_attempt, 'worker_id', u.worker_id, 'error_code', u.error_code,
                   'duration_ms', round(extract(epoch FROM u.finished_at - u.started_at) * 1000),
                   'next_attempt_at', u.next_attempt_at))
        FROM updated u
    ) h
    ORDER BY h.step_id, h.n
)
SELECT DISTINCT concurrency_key FROM updated WHERE concurrency_key IS NOT NULL
