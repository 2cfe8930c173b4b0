-- Steps the coordinator evaluates or runs: `for_each` (fan-out) and `tasker.wait`.
--
-- Fan-out: a step with `for_each` runs once per element of a list, as instances.
--
-- - The list is evaluated when the step's parents are done, where conditions are judged
--   (shared/src/store/transitions/conditions.rs): such a step carries a condition (its
--   `when`, else `true`) until then, so the claim hands it to the caller.
-- - Each element becomes an instance: a step row of the same task named `<step>[<index>]`,
--   with `fan_out_of` (the step), `item` and `item_index`, the step's handler and
--   settings, and edges from the step's parents (its message's parents) and to the step.
-- - The step keeps its condition and counts its instances in `remaining_parents`: the
--   fan-in counter. When the last is done, the claim hands the step to the caller again,
--   which completes it with the instances' results as a list in element order.
-- - `instances`: how many elements the list had (NULL until it is evaluated).
ALTER TABLE steps
    ADD COLUMN instances INT,
    ADD COLUMN fan_out_of UUID,
    ADD COLUMN item JSONB,
    ADD COLUMN item_index INT;

-- A step's instances in element order: the fan-in reads their results through it.
CREATE INDEX steps_instances ON steps (fan_out_of, item_index) WHERE fan_out_of IS NOT NULL;

-- `tasker.wait`: a step the coordinator runs, holding no worker slot. It is judged like a
-- condition (its `when`, else `true`); then it waits: `wait_signal` is the signal it
-- waits for, its `remaining_parents` is 1 (the signal is its last parent), `wait_until`
-- when it fails (`wait_timeout`; NULL: never). `signalled_at`: when its signal came (its
-- payload is its results), which may be before it waits.
ALTER TABLE steps
    ADD COLUMN wait_signal TEXT,
    ADD COLUMN wait_until TIMESTAMPTZ,
    ADD COLUMN signalled_at TIMESTAMPTZ;

-- A step's definition in its task's template (NULL for a fan-out's instance, whose name
-- is not the template's): what the coordinator reads of it when it decides about the
-- step (`for_each`, `max_parallel`, `trigger`), so task creation stores none of it.
CREATE FUNCTION tasker_step_definition(p_template_id BIGINT, p_name TEXT)
RETURNS JSONB LANGUAGE sql STABLE AS $$
    SELECT x.step
    FROM templates tp
    CROSS JOIN LATERAL jsonb_array_elements(tp.definition -> 'steps') AS x(step)
    WHERE tp.template_id = p_template_id AND x.step ->> 'name' = p_name
$$;

-- The sweeper's look for waits past their timeout.
CREATE INDEX steps_wait_until ON steps (wait_until)
    WHERE wait_until IS NOT NULL AND status = 'pending';

-- Readiness of migration 0016 with fan-out: a step whose instances run is
-- `waiting_on_instances` ("fanned out: k of n instances done"), never waiting on them by
-- name; an instance held by `max_parallel` names its step; instances follow their step.
-- A `tasker.wait` step waiting is `waiting_for_signal`.
CREATE OR REPLACE FUNCTION tasker_step_readiness(p_task_id UUID)
RETURNS TABLE (
    step_id UUID,
    name TEXT,
    status TEXT,
    ready BOOLEAN,
    waiting_on TEXT[],
    next_attempt_at TIMESTAMPTZ,
    attempts INT,
    retry_limit INT,
    reason TEXT,
    message TEXT,
    limit_key TEXT,
    limit_value INT
) LANGUAGE sql STABLE AS $$
    WITH parents AS (
        SELECT s.step_id,
               COALESCE(array_agg(p.name ORDER BY p.position)
                   FILTER (WHERE p.status NOT IN ('complete', 'resolved_manually', 'skipped')
                             AND p.fan_out_of IS NULL), '{}') AS waiting_on,
               count(*) FILTER (WHERE p.fan_out_of IS NOT NULL
                                  AND p.status IN ('complete', 'resolved_manually')) AS instances_done,
               COALESCE(array_agg(p.name ORDER BY p.position)
                   FILTER (WHERE p.status IN ('error', 'cancelled')), '{}') AS failed_parents
        FROM steps s
        LEFT JOIN step_edges e ON e.to_step = s.step_id
        LEFT JOIN steps p ON p.step_id = e.from_step
        WHERE s.task_id = p_task_id
        GROUP BY s.step_id
    ),
    judged AS (
        SELECT s.step_id, s.name, s.status, s.position, s.item_index, pa.waiting_on,
               s.next_attempt_at, s.instances, pa.instances_done, s.fan_out_of, s.wait_signal,
               s.wait_until,
               s.attempts, s.retry_limit, s.last_error, s.deferrals, s.max_deferrals,
               s.concurrency_key, s.concurrency_limit, s.rate_key, s.rate_limit,
               s.rate_window_ms, s.held_task_key, t.concurrency_keys AS task_keys,
               t.concurrency_limits AS task_limits,
               CASE
                   WHEN t.status = 'cancelled' AND s.status NOT IN ('complete', 'resolved_manually', 'skipped')
                       THEN 'task_cancelled'
                   WHEN s.status = 'skipped' THEN 'skipped'
                   WHEN s.status = 'pending' AND s.instances > 0 AND s.remaining_parents > 0
                       THEN 'waiting_on_instances'
                   WHEN s.status = 'pending' AND s.wait_signal IS NOT NULL
                        AND s.remaining_parents > 0
                       THEN 'waiting_for_signal'
                   WHEN s.condition IS NOT NULL
                        AND tasker_step_claimable(s.status, s.remaining_parents, s.next_attempt_at,
                                                  s.attempts, s.retry_limit)
                       THEN 'evaluating_condition'
                   WHEN s.held IS NOT NULL AND s.status IN ('pending', 'waiting_for_retry')
                       THEN s.held
                   WHEN tasker_step_claimable(s.status, s.remaining_parents, s.next_attempt_at,
                                              s.attempts, s.retry_limit)
                       THEN 'ready'
                   WHEN s.status = 'complete' THEN 'complete'
                   WHEN s.status = 'resolved_manually' THEN 'resolved_manually'
                   WHEN s.status = 'cancelled' THEN 'cancelled'
                   WHEN s.status = 'enqueued' THEN 'enqueued'
                   WHEN s.status = 'in_progress' THEN 'running'
                   WHEN s.status = 'error' AND s.last_error ->> 'code' = 'deferral_limit'
                       THEN 'deferrals_exhausted'
                   WHEN s.status = 'error' AND s.attempts >= s.retry_limit
                        AND COALESCE(s.last_error ->> 'kind', '') <> 'permanent'
                       THEN 'attempts_exhausted'
                   WHEN s.status = 'error' THEN 'failed_permanently'
                   WHEN cardinality(pa.failed_parents) > 0 THEN 'blocked_by_failed_parent'
                   WHEN cardinality(pa.waiting_on) > 0 THEN 'waiting_on_parents'
                   WHEN s.next_attempt_at > now() AND s.attempts = 0 THEN 'scheduled'
                   WHEN s.next_attempt_at > now() THEN 'in_backoff'
                   ELSE 'attempts_exhausted'
               END AS reason,
               pa.failed_parents
        FROM steps s
        JOIN tasks t ON t.task_id = s.task_id
        JOIN parents pa ON pa.step_id = s.step_id
        WHERE s.task_id = p_task_id
    ),
    shown AS (
        -- A concurrency key is shown as its value (the part after the scope). A step held
        -- for its task's key (the template's concurrency) counts tasks, not steps.
        SELECT j.*,
               CASE WHEN j.reason = 'concurrency_limited' AND j.held_task_key IS NOT NULL
                        THEN substr(j.held_task_key, strpos(j.held_task_key, '=') + 1)
                    WHEN j.reason = 'concurrency_limited' AND j.concurrency_key LIKE 'fan_out:%'
                        THEN (SELECT f.name FROM steps f WHERE f.step_id = j.fan_out_of)
                             || ' (max_parallel)'
                    WHEN j.reason = 'concurrency_limited'
                        THEN substr(j.concurrency_key, strpos(j.concurrency_key, '=') + 1)
                    WHEN j.reason = 'rate_limited' THEN j.rate_key
               END AS key,
               CASE WHEN j.reason = 'concurrency_limited' AND j.held_task_key IS NOT NULL
                        THEN j.task_limits[array_position(j.task_keys, j.held_task_key)]
                    WHEN j.reason = 'concurrency_limited' THEN j.concurrency_limit
                    WHEN j.reason = 'rate_limited' THEN j.rate_limit
               END AS key_limit,
               CASE WHEN j.reason = 'concurrency_limited' AND j.held_task_key IS NOT NULL THEN
                   (SELECT count(*) FROM task_slots r
                    WHERE r.key = j.held_task_key
                      AND (SELECT t.status FROM tasks t WHERE t.task_id = r.task_id)
                          = 'in_progress')
                    WHEN j.reason = 'concurrency_limited' THEN
                   (SELECT count(*) FROM steps r
                    WHERE r.concurrency_key = j.concurrency_key
                      AND r.status IN ('enqueued', 'in_progress'))
               END AS key_running
        FROM judged j
    )
    SELECT step_id, name, status, reason = 'ready', waiting_on, next_attempt_at, attempts,
           retry_limit, reason,
           CASE reason
               WHEN 'task_cancelled' THEN 'the task was cancelled; nothing more runs'
               WHEN 'concurrency_limited' THEN
                   CASE WHEN held_task_key IS NOT NULL
                        THEN 'waiting: at most ' || key_limit || ' tasks at once for key ' || key
                             || ' (' || key_running || ' running)'
                        ELSE 'held: at most ' || key_limit || ' at once for key ' || key || ' ('
                             || key_running || ' queued or running)'
                   END
               WHEN 'rate_limited' THEN 'held: at most ' || key_limit || ' starts per '
                                        || CASE WHEN rate_window_ms % 3600000 = 0
                                                THEN (rate_window_ms / 3600000) || 'h'
                                                WHEN rate_window_ms % 60000 = 0
                                                THEN (rate_window_ms / 60000) || 'm'
                                                ELSE (rate_window_ms / 1000) || 's' END
                                        || ' for key ' || key
                                        || '; next slot at '
                                        || to_char(next_attempt_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"')
               WHEN 'skipped' THEN 'skipped (bypassed at creation, its condition was false, or no parent failed for a one_failed step); its dependents go on without it'
               WHEN 'evaluating_condition' THEN 'ready; its condition is being evaluated'
               WHEN 'waiting_on_instances' THEN 'fanned out: ' || instances_done || ' of '
                                                || instances || ' instances done'
               WHEN 'waiting_for_signal' THEN 'waiting for the signal `' || wait_signal || '`'
                                              || COALESCE(', until ' || to_char(wait_until AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"'), '')
               WHEN 'complete' THEN 'finished successfully'
               WHEN 'resolved_manually' THEN 'resolved by an operator'
               WHEN 'cancelled' THEN 'cancelled'
               WHEN 'enqueued' THEN 'dispatched (attempt ' || attempts || '); waiting for a worker to take it'
               WHEN 'running' THEN 'running on a worker (attempt ' || attempts || ' of ' || retry_limit || ')'
               WHEN 'deferrals_exhausted' THEN 'deferred ' || deferrals || ' times, the limit; resolve or retry the task'
               WHEN 'attempts_exhausted' THEN 'all ' || retry_limit || ' attempts failed; last error: '
                                              || COALESCE(last_error ->> 'message', 'unknown')
               WHEN 'failed_permanently' THEN 'failed permanently: ' || COALESCE(last_error ->> 'message', 'unknown')
               WHEN 'blocked_by_failed_parent' THEN 'cannot run: parent ' || array_to_string(failed_parents, ', ')
                                                   || ' failed'
               WHEN 'waiting_on_parents' THEN 'waiting on ' || array_to_string(waiting_on, ', ')
               WHEN 'scheduled' THEN 'scheduled: runs at '
                                     || to_char(next_attempt_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"')
               WHEN 'in_backoff' THEN 'attempt ' || (attempts + 1) || ' of ' || retry_limit || ' after backoff, at '
                                      || to_char(next_attempt_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"')
               ELSE 'ready to be dispatched'
           END,
           key, key_limit
    FROM shown
    ORDER BY position, item_index NULLS FIRST
$$;
