-- Tasks that run later and tasks that must end in time.
--
-- - run_at: a task created with `run_at` or `delay_ms` is written at once, `pending`, and
--   its first steps are due at run_at (next_attempt_at): the claim rule
--   (tasker_step_claimable) leaves them until then, whoever claims, and the dispatcher
--   wakes for them as for a retry. Readiness says `scheduled`.
-- - deadline_at: the earlier of the creation's `deadline` and its template's `timeout`
--   counted from when the task may start (run_at, or its creation). A task still pending
--   or running past it ends in `error` with the reason `deadline_exceeded`, its
--   unfinished steps `cancelled` (shared/sql/tasks/expire_deadlines.sql, run by every
--   coordinator's sweeper, each task once: its row is locked and its status checked).

ALTER TABLE tasks
    ADD COLUMN run_at TIMESTAMPTZ,
    ADD COLUMN deadline_at TIMESTAMPTZ;

-- The unfinished tasks with a deadline, soonest first.
CREATE INDEX tasks_by_deadline ON tasks (deadline_at)
    WHERE deadline_at IS NOT NULL AND status IN ('pending', 'in_progress');

-- tasker_create_tasks of migration 0014, with each task's run_at and deadline.
DROP FUNCTION tasker_create_tasks(
    UUID[], BIGINT[], TEXT[], TEXT[], TEXT[], JSONB[], TEXT[], TEXT[], TEXT[], JSONB[],
    TEXT[], TEXT[], INT[], UUID[], INT[], UUID[], TEXT[], TEXT[], JSONB[], INT[], INT[],
    BOOLEAN[], BIGINT[], BIGINT[], BIGINT[], BOOLEAN[], JSONB[], INT[], UUID[], UUID[],
    UUID[], UUID[], BIGINT, SMALLINT[], TEXT[], INT[], TEXT[], INT[], INT[], UUID[], TEXT[],
    INT[], TEXT[]);

CREATE FUNCTION tasker_create_tasks(
    p_task_ids UUID[], p_template_ids BIGINT[], p_namespaces TEXT[], p_names TEXT[],
    p_versions TEXT[], p_contexts JSONB[], p_initiators TEXT[], p_source_systems TEXT[],
    p_reasons TEXT[], p_tags JSONB[], p_idempotency_keys TEXT[], p_trace_parents TEXT[],
    p_versions_known INT[],
    p_step_task_ids UUID[], p_positions INT[], p_step_ids UUID[], p_step_names TEXT[],
    p_handlers TEXT[], p_configs JSONB[], p_parents INT[], p_retry_limits INT[],
    p_retryable BOOLEAN[], p_timeouts_ms BIGINT[], p_backoff_base_ms BIGINT[],
    p_backoff_max_ms BIGINT[], p_backoff_jitter BOOLEAN[], p_backoff_schedules JSONB[],
    p_max_deferrals INT[],
    p_edge_task_ids UUID[], p_edge_from UUID[], p_edge_to UUID[],
    p_first_steps UUID[], p_lease_ms BIGINT, p_priorities SMALLINT[],
    p_concurrency_keys TEXT[], p_concurrency_limits INT[], p_rate_keys TEXT[],
    p_rate_limits INT[], p_rate_windows_ms INT[],
    p_limit_task_ids UUID[], p_limit_keys TEXT[], p_limit_limits INT[], p_limit_on_limit TEXT[],
    p_run_at TIMESTAMPTZ[], p_deadlines TIMESTAMPTZ[]
) RETURNS TABLE (
    created_task_id UUID,
    created_at TIMESTAMPTZ,
    step_id UUID,
    task_id UUID,
    name TEXT,
    handler TEXT,
    config JSONB,
    attempts INT,
    retry_limit INT,
    deferrals INT,
    dispatch_token UUID,
    timeout_ms BIGINT,
    namespace TEXT,
    template TEXT,
    context JSONB,
    parents JSONB,
    dispatched_at TIMESTAMPTZ,
    trace_parent TEXT
)
LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan
AS $$
#variable_conflict use_column
DECLARE
    v_created UUID[];
    v_created_at TIMESTAMPTZ[];
    v_keyed BOOLEAN;
BEGIN
    -- A task that named no version carries how many versions its template's name had
    -- when the coordinator looked; if that changed, nothing is written (TK001).
    IF EXISTS (
        SELECT 1
        FROM (SELECT DISTINCT k.namespace, k.name, k.known
              FROM unnest(p_namespaces, p_names, p_versions_known) AS k(namespace, name, known)
              WHERE k.known IS NOT NULL) k
        WHERE k.known <> (
            SELECT count(*)
            FROM templates t JOIN namespaces n USING (namespace_id)
            WHERE n.name = k.namespace AND t.name = k.name
        )
    ) THEN
        RAISE EXCEPTION 'the versions of a template changed'
            USING ERRCODE = 'TK001';
    END IF;
    WITH input_tasks AS (
        SELECT t.*
        FROM unnest(p_task_ids, p_template_ids, p_namespaces, p_names, p_versions, p_contexts,
                    p_initiators, p_source_systems, p_reasons, p_tags, p_idempotency_keys,
                    p_trace_parents, p_priorities, p_run_at, p_deadlines)
               WITH ORDINALITY
               AS t(task_id, template_id, namespace, name, version, context, initiator,
                    source_system, reason, tags, idempotency_key, trace_parent, priority,
                    run_at, deadline_at, n)
    ),
    input_limits AS (
        SELECT l.*
        FROM unnest(p_limit_task_ids, p_limit_keys, p_limit_limits, p_limit_on_limit)
             WITH ORDINALITY AS l(task_id, key, lim, on_limit, n)
    ),
    task AS (
        INSERT INTO tasks (task_id, template_id, namespace, name, version, status, context,
                           initiator, source_system, reason, tags, idempotency_key,
                           trace_parent, priority, run_at, deadline_at, concurrency_keys,
                           concurrency_limits, concurrency_on_limit)
        SELECT t.task_id, t.template_id, t.namespace, t.name, t.version, 'pending',
               t.context, t.initiator, t.source_system, t.reason, t.tags, t.idempotency_key,
               t.trace_parent, t.priority, t.run_at, t.deadline_at,
               -- A batch without template concurrency skips these subqueries.
               CASE WHEN cardinality(p_limit_task_ids) > 0 THEN
                   NULLIF(ARRAY(SELECT l.key FROM input_limits l
                                WHERE l.task_id = t.task_id ORDER BY l.n), '{}') END,
               CASE WHEN cardinality(p_limit_task_ids) > 0 THEN
                   NULLIF(ARRAY(SELECT l.lim FROM input_limits l
                                WHERE l.task_id = t.task_id ORDER BY l.n), '{}') END,
               CASE WHEN cardinality(p_limit_task_ids) > 0 THEN
                   NULLIF(ARRAY(SELECT l.on_limit FROM input_limits l
                                WHERE l.task_id = t.task_id ORDER BY l.n), '{}') END
        FROM input_tasks t
        ORDER BY t.n
        ON CONFLICT (namespace, name, idempotency_key) WHERE idempotency_key IS NOT NULL
        DO NOTHING
        RETURNING tasks.task_id, tasks.created_at, tasks.priority, tasks.run_at,
                  tasks.concurrency_keys IS NOT NULL AS task_limited
    ),
    input AS (
        SELECT s.*
        FROM unnest(p_step_task_ids, p_positions, p_step_ids, p_step_names, p_handlers,
                    p_configs, p_parents, p_retry_limits, p_retryable, p_timeouts_ms,
                    p_backoff_base_ms, p_backoff_max_ms, p_backoff_jitter,
                    p_backoff_schedules, p_max_deferrals, p_concurrency_keys,
                    p_concurrency_limits, p_rate_keys, p_rate_limits, p_rate_windows_ms)
               WITH ORDINALITY
               AS s(task_id, position, step_id, name, handler, config, parents, retry_limit,
                    retryable, timeout_ms, base_ms, max_ms, jitter, schedule, max_deferrals,
                    concurrency_key, concurrency_limit, rate_key, rate_limit, rate_window_ms,
                    n)
    ),
    new_steps AS (
        INSERT INTO steps (step_id, task_id, name, position, handler, config, status,
                           remaining_parents, attempts, retry_limit, retryable, timeout_ms,
                           backoff_base_ms, backoff_max_ms, backoff_jitter,
                           backoff_schedule_ms, max_deferrals, ready_at, priority,
                           next_attempt_at,
                           concurrency_key, concurrency_limit, rate_key, rate_limit,
                           rate_window_ms, task_limited)
        SELECT s.step_id, task.task_id, s.name, s.position, s.handler, s.config, 'pending',
               s.parents, 0, s.retry_limit, s.retryable, s.timeout_ms, s.base_ms, s.max_ms,
               s.jitter,
               CASE WHEN jsonb_typeof(s.schedule) = 'array'
                    THEN ARRAY(SELECT jsonb_array_elements_text(s.schedule)::BIGINT) END,
               s.max_deferrals, CASE WHEN s.parents = 0 THEN GREATEST(task.run_at, now()) END,
               task.priority,
               -- A task to run later: its first steps are due then (the claim rule).
               CASE WHEN s.parents = 0 AND task.run_at > now() THEN task.run_at END,
               s.concurrency_key, s.concurrency_limit, s.rate_key, s.rate_limit,
               s.rate_window_ms, task.task_limited AND s.parents = 0
        FROM task JOIN input s ON s.task_id = task.task_id
        ORDER BY s.n
    ),
    new_edges AS (
        INSERT INTO step_edges (task_id, from_step, to_step)
        SELECT task.task_id, e.from_step, e.to_step
        FROM task
        JOIN unnest(p_edge_task_ids, p_edge_from, p_edge_to) AS e(task_id, from_step, to_step)
          ON e.task_id = task.task_id
    ),
    task_history AS (
        INSERT INTO task_transitions (task_id, from_status, to_status, reason)
        SELECT task.task_id, NULL, 'pending', 'created'
        FROM task
        ORDER BY task.task_id
    )
    SELECT array_agg(task.task_id), array_agg(task.created_at)
    INTO v_created, v_created_at
    FROM task;

    -- Whether a first step may carry a key: only those of templates with limits.
    v_keyed := COALESCE(cardinality(p_limit_task_ids), 0) > 0
               OR EXISTS (SELECT 1 FROM unnest(p_concurrency_keys) AS k(key) WHERE k.key IS NOT NULL)
               OR EXISTS (SELECT 1 FROM unnest(p_rate_keys) AS k(key) WHERE k.key IS NOT NULL);

    -- The first steps are claimed by the one claim, in this statement's transaction.
    -- Those of a task that was not written (its idempotency key was taken) do not
    -- exist, and the claim passes over them.
    RETURN QUERY
    SELECT c.task_id, c.created_at, m.*
    FROM unnest(v_created, v_created_at) AS c(task_id, created_at)
    LEFT JOIN tasker_claim_steps(CASE WHEN p_lease_ms IS NOT NULL THEN p_first_steps END,
                                 NULL, p_lease_ms, NULL, v_keyed) m ON m.task_id = c.task_id;
END $$;

-- Readiness of migration 0013, with the reason `scheduled`: a first step waiting for its
-- task's run_at.
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
                   FILTER (WHERE p.status NOT IN ('complete', 'resolved_manually')), '{}') AS waiting_on,
               COALESCE(array_agg(p.name ORDER BY p.position)
                   FILTER (WHERE p.status IN ('error', 'cancelled')), '{}') AS failed_parents
        FROM steps s
        LEFT JOIN step_edges e ON e.to_step = s.step_id
        LEFT JOIN steps p ON p.step_id = e.from_step
        WHERE s.task_id = p_task_id
        GROUP BY s.step_id
    ),
    judged AS (
        SELECT s.step_id, s.name, s.status, s.position, pa.waiting_on, s.next_attempt_at,
               s.attempts, s.retry_limit, s.last_error, s.deferrals, s.max_deferrals,
               s.concurrency_key, s.concurrency_limit, s.rate_key, s.rate_limit,
               s.rate_window_ms, s.held_task_key, t.concurrency_keys AS task_keys,
               t.concurrency_limits AS task_limits,
               CASE
                   WHEN t.status = 'cancelled' AND s.status NOT IN ('complete', 'resolved_manually')
                       THEN 'task_cancelled'
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
    ORDER BY position
$$;
