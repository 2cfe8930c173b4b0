-- Child tasks: a `tasker.task` step starts a task of another template and completes
-- with its leaf results (shared/src/store/transitions/child_tasks.rs).
--
-- - The step is judged like a condition (its `when`, else `true`); then it starts its
--   child, in the same transaction: `child_task_id` names it, its `remaining_parents` is
--   1 (the child is its last parent) and it keeps its condition, so that when the child
--   ends (complete, error, cancelled) the step is handed to the coordinator again, which
--   completes it, retries the child by the step's retry policy, or fails it.
-- - The child names its parent task and step: `parent_step_id` is unique, so a step
--   starts one child whatever its retries.
ALTER TABLE steps ADD COLUMN child_task_id UUID;
ALTER TABLE tasks
    ADD COLUMN parent_task_id UUID,
    ADD COLUMN parent_step_id UUID;

CREATE UNIQUE INDEX tasks_by_parent_step ON tasks (parent_step_id)
    WHERE parent_step_id IS NOT NULL;
CREATE INDEX tasks_by_parent_task ON tasks (parent_task_id)
    WHERE parent_task_id IS NOT NULL;

-- Readiness of migration 0017 with child tasks: a `tasker.task` step whose child runs is
-- `waiting_for_child_task`, naming the child and its status.
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
               s.wait_until, s.child_task_id,
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
                   WHEN s.status = 'pending' AND s.child_task_id IS NOT NULL
                        AND s.remaining_parents > 0
                       THEN 'waiting_for_child_task'
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
               WHEN 'waiting_for_child_task' THEN
                   (SELECT 'waiting for child task ' || c.task_id || ' (' || c.namespace || '/'
                           || c.name || ' ' || c.version || ', ' || c.status || ')'
                    FROM tasks c WHERE c.task_id = child_task_id)
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
