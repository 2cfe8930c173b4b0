-- One claim path. Which steps may run, how a step is claimed, its `dispatched` history
-- row and the message a worker receives each exist once, here:
--
-- - tasker_step_claimable: the claim rule. The dispatcher's scan, the claim itself,
--   readiness (`GET /v1/tasks/{id}/readiness`) and the execution context all ask it.
--   A new condition on claiming goes into this function (a condition on one step's row)
--   or into tasker_claim_steps (a condition over the batch, such as a limit).
-- - tasker_claim_steps: claims the given steps that the rule allows, writes their
--   history, starts their tasks, and returns the step messages. The dispatcher (ready
--   steps it found), result application (children of completed steps, with the parents
--   each result completed) and task creation (a new task's first steps) all call it.
--
-- Task creation no longer claims inside its insert: tasker_create_tasks writes every step
-- `pending` and the creating transaction then claims the first steps through
-- tasker_claim_steps. The creation functions this replaces are dropped (coordinators of
-- earlier releases must be stopped before this migration runs; docs/operating.md).

-- Whether a step may be claimed now. Inlined by the planner wherever it is called with
-- columns, so the dispatcher's scan still uses the steps_ready index.
CREATE FUNCTION tasker_step_claimable(
    p_status TEXT,
    p_remaining_parents INT,
    p_next_attempt_at TIMESTAMPTZ,
    p_attempts INT,
    p_retry_limit INT
) RETURNS BOOLEAN LANGUAGE sql STABLE AS $$
    SELECT p_status IN ('pending', 'waiting_for_retry')
       AND p_remaining_parents = 0
       AND (p_next_attempt_at IS NULL OR p_next_attempt_at <= now())
       AND p_attempts < p_retry_limit
$$;

-- Claim steps. p_step_ids are steps whose rows the caller has locked; p_parents_done
-- (NULL, or one count per step) says how many of each step's parents the caller just
-- completed: those leave remaining_parents first. Each step the rule then allows is
-- claimed: `enqueued`, one more attempt, a fresh dispatch token, a lease of p_lease_ms,
-- its `dispatched` history row; a `pending` task it belongs to becomes `in_progress`
-- (`first_step_dispatched`). Returns one row per claimed step: its message, built from
-- the step, its task and its parents' results, to publish once the caller commits.
CREATE FUNCTION tasker_claim_steps(p_step_ids UUID[], p_parents_done INT[], p_lease_ms BIGINT)
RETURNS TABLE (
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
-- No plan_cache_mode of its own: the statement runs with the caller's, which for a
-- coordinator is force_custom_plan (shared/src/db.rs). A generic plan, made once per
-- connection, would keep whatever the tables' size suggested at the first claim: made
-- while they were nearly empty, it scanned them, and every claim grew with the tables.
LANGUAGE plpgsql
AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    WITH input AS (
        SELECT i.step_id, COALESCE(i.done, 0) AS done
        FROM unnest(p_step_ids, p_parents_done) AS i(step_id, done)
    ),
    current AS (
        -- By primary key only: the caller holds these rows.
        SELECT s.step_id, s.status AS from_status, i.done,
               s.remaining_parents - i.done AS remaining,
               tasker_step_claimable(s.status, s.remaining_parents - i.done,
                                     s.next_attempt_at, s.attempts, s.retry_limit) AS claim
        FROM steps s JOIN input i ON i.step_id = s.step_id
        WHERE s.step_id = ANY (p_step_ids)
    ),
    changed AS (
        UPDATE steps s
        SET remaining_parents = c.remaining,
            ready_at = CASE WHEN c.done > 0 AND c.remaining = 0 THEN now() ELSE s.ready_at END,
            status = CASE WHEN c.claim THEN 'enqueued' ELSE s.status END,
            attempts = s.attempts + CASE WHEN c.claim THEN 1 ELSE 0 END,
            dispatch_token = CASE WHEN c.claim THEN gen_random_uuid() ELSE s.dispatch_token END,
            lease_expires_at = CASE WHEN c.claim
                                    THEN now() + p_lease_ms * INTERVAL '1 millisecond'
                                    ELSE s.lease_expires_at END,
            next_attempt_at = CASE WHEN c.claim THEN NULL ELSE s.next_attempt_at END,
            enqueued_at = CASE WHEN c.claim THEN now() ELSE s.enqueued_at END,
            updated_at = CASE WHEN c.claim THEN now() ELSE s.updated_at END
        FROM current c
        WHERE s.step_id = c.step_id AND (c.claim OR c.done > 0)
        RETURNING s.step_id, s.task_id, s.name, s.handler, s.config, s.attempts,
                  s.retry_limit, s.deferrals, s.dispatch_token, s.timeout_ms,
                  c.from_status, c.claim
    ),
    claimed AS (
        SELECT * FROM changed WHERE claim
    ),
    step_history AS (
        INSERT INTO step_transitions (step_id, task_id, from_status, to_status, reason, metadata)
        SELECT step_id, task_id, from_status, 'enqueued', 'dispatched',
               jsonb_build_object('attempt', attempts, 'dispatch_token', dispatch_token)
        FROM claimed
        ORDER BY step_id
    ),
    started_tasks AS (
        -- Task rows are locked in id order, as everywhere else, so two coordinators
        -- starting the same tasks cannot deadlock. The tasks are found by primary key
        -- only: the status test is written so that no index can serve it (`IS TRUE`).
        -- Offered `status = 'pending'`, the plan cached for this function walked
        -- tasks_by_status, every pending task for every claim: a creation burst's
        -- backlog made each claim of children cost hundreds of milliseconds.
        UPDATE tasks t SET status = 'in_progress', updated_at = now()
        WHERE t.task_id = ANY (ARRAY(
                  SELECT k.task_id FROM tasks k
                  WHERE k.task_id = ANY (ARRAY(SELECT task_id FROM claimed))
                    AND (k.status = 'pending') IS TRUE
                  ORDER BY k.task_id
                  FOR UPDATE))
          AND (t.status = 'pending') IS TRUE
        RETURNING t.task_id
    ),
    task_history AS (
        INSERT INTO task_transitions (task_id, from_status, to_status, reason)
        SELECT task_id, 'pending', 'in_progress', 'first_step_dispatched'
        FROM started_tasks
        ORDER BY task_id
    )
    SELECT c.step_id, c.task_id, c.name, c.handler, c.config, c.attempts, c.retry_limit,
           c.deferrals, c.dispatch_token, c.timeout_ms, t.namespace,
           t.name || '@' || t.version, t.context,
           COALESCE((SELECT jsonb_object_agg(p.name, COALESCE(p.results, 'null'::jsonb))
                     FROM steps p
                     WHERE p.step_id = ANY (ARRAY(SELECT e.from_step FROM step_edges e
                                                  WHERE e.to_step = c.step_id))),
                    '{}'::jsonb),
           now(), t.trace_parent
    FROM claimed c JOIN tasks t ON t.task_id = c.task_id;
END $$;

-- Creating tasks in a batch, as migration 0009's function did, except that every step
-- is written `pending` and every task `pending`: the caller claims the first steps with
-- tasker_claim_steps in the same transaction.
DO $$
DECLARE f REGPROCEDURE;
BEGIN
    FOR f IN SELECT oid::REGPROCEDURE FROM pg_proc
             WHERE proname IN ('tasker_create_task', 'tasker_create_tasks')
    LOOP
        EXECUTE 'DROP FUNCTION ' || f;
    END LOOP;
END $$;

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
    p_edge_task_ids UUID[], p_edge_from UUID[], p_edge_to UUID[]
) RETURNS SETOF tasks
LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan
AS $$
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
    RETURN QUERY
    WITH input_tasks AS (
        SELECT t.*
        FROM unnest(p_task_ids, p_template_ids, p_namespaces, p_names, p_versions, p_contexts,
                    p_initiators, p_source_systems, p_reasons, p_tags, p_idempotency_keys,
                    p_trace_parents)
               WITH ORDINALITY
               AS t(task_id, template_id, namespace, name, version, context, initiator,
                    source_system, reason, tags, idempotency_key, trace_parent, n)
    ),
    task AS (
        INSERT INTO tasks (task_id, template_id, namespace, name, version, status, context,
                           initiator, source_system, reason, tags, idempotency_key,
                           trace_parent)
        SELECT t.task_id, t.template_id, t.namespace, t.name, t.version, 'pending',
               t.context, t.initiator, t.source_system, t.reason, t.tags, t.idempotency_key,
               t.trace_parent
        FROM input_tasks t
        ORDER BY t.n
        ON CONFLICT (namespace, name, idempotency_key) WHERE idempotency_key IS NOT NULL
        DO NOTHING
        RETURNING *
    ),
    input AS (
        SELECT s.*
        FROM unnest(p_step_task_ids, p_positions, p_step_ids, p_step_names, p_handlers,
                    p_configs, p_parents, p_retry_limits, p_retryable, p_timeouts_ms,
                    p_backoff_base_ms, p_backoff_max_ms, p_backoff_jitter,
                    p_backoff_schedules, p_max_deferrals)
               WITH ORDINALITY
               AS s(task_id, position, step_id, name, handler, config, parents, retry_limit,
                    retryable, timeout_ms, base_ms, max_ms, jitter, schedule, max_deferrals, n)
    ),
    new_steps AS (
        INSERT INTO steps (step_id, task_id, name, position, handler, config, status,
                           remaining_parents, attempts, retry_limit, retryable, timeout_ms,
                           backoff_base_ms, backoff_max_ms, backoff_jitter,
                           backoff_schedule_ms, max_deferrals, ready_at)
        SELECT s.step_id, task.task_id, s.name, s.position, s.handler, s.config, 'pending',
               s.parents, 0, s.retry_limit, s.retryable, s.timeout_ms, s.base_ms, s.max_ms,
               s.jitter,
               CASE WHEN jsonb_typeof(s.schedule) = 'array'
                    THEN ARRAY(SELECT jsonb_array_elements_text(s.schedule)::BIGINT) END,
               s.max_deferrals, CASE WHEN s.parents = 0 THEN now() END
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
    SELECT * FROM task;
END $$;

-- Readiness and the execution context ask the claim rule instead of restating it.
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
    message TEXT
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
               CASE
                   WHEN t.status = 'cancelled' AND s.status NOT IN ('complete', 'resolved_manually')
                       THEN 'task_cancelled'
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
                   WHEN s.next_attempt_at > now() THEN 'in_backoff'
                   ELSE 'attempts_exhausted'
               END AS reason,
               pa.failed_parents
        FROM steps s
        JOIN tasks t ON t.task_id = s.task_id
        JOIN parents pa ON pa.step_id = s.step_id
        WHERE s.task_id = p_task_id
    )
    SELECT step_id, name, status, reason = 'ready', waiting_on, next_attempt_at, attempts,
           retry_limit, reason,
           CASE reason
               WHEN 'task_cancelled' THEN 'the task was cancelled; nothing more runs'
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
               WHEN 'in_backoff' THEN 'attempt ' || (attempts + 1) || ' of ' || retry_limit || ' after backoff, at '
                                      || to_char(next_attempt_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"')
               ELSE 'ready to be dispatched'
           END
    FROM judged
    ORDER BY position
$$;

CREATE OR REPLACE FUNCTION tasker_task_execution_context(p_task_id UUID)
RETURNS TABLE (
    total_steps BIGINT,
    pending_steps BIGINT,
    enqueued_steps BIGINT,
    in_progress_steps BIGINT,
    completed_steps BIGINT,
    waiting_for_retry_steps BIGINT,
    failed_steps BIGINT,
    cancelled_steps BIGINT,
    ready_steps BIGINT,
    execution_status TEXT,
    recommended_action TEXT,
    health TEXT,
    completion_percentage DOUBLE PRECISION
) LANGUAGE sql STABLE AS $$
    WITH counts AS (
        SELECT count(*) AS total,
               count(*) FILTER (WHERE s.status = 'pending') AS pending,
               count(*) FILTER (WHERE s.status = 'enqueued') AS enqueued,
               count(*) FILTER (WHERE s.status = 'in_progress') AS in_progress,
               count(*) FILTER (WHERE s.status IN ('complete', 'resolved_manually')) AS done,
               count(*) FILTER (WHERE s.status = 'waiting_for_retry') AS retrying,
               count(*) FILTER (WHERE s.status = 'error') AS failed,
               count(*) FILTER (WHERE s.status = 'cancelled') AS cancelled,
               count(*) FILTER (WHERE tasker_step_claimable(s.status, s.remaining_parents,
                                                            s.next_attempt_at, s.attempts,
                                                            s.retry_limit)) AS ready,
               count(*) FILTER (WHERE s.status IN ('pending', 'waiting_for_retry')
                                  AND s.remaining_parents = 0) AS runnable
        FROM steps s
        WHERE s.task_id = p_task_id
    ),
    judged AS (
        SELECT c.*, t.status AS task_status,
               CASE
                   WHEN t.status = 'cancelled' THEN 'cancelled'
                   WHEN c.total > 0 AND c.done = c.total THEN 'all_complete'
                   WHEN c.failed > 0 AND c.enqueued + c.in_progress + c.runnable = 0
                       THEN 'blocked_by_failures'
                   WHEN c.ready > 0 THEN 'has_ready_steps'
                   WHEN c.enqueued + c.in_progress > 0 THEN 'processing'
                   ELSE 'waiting_for_dependencies'
               END AS execution_status
        FROM counts c CROSS JOIN tasks t
        WHERE t.task_id = p_task_id
    )
    SELECT total, pending, enqueued, in_progress, done, retrying, failed, cancelled, ready,
           execution_status,
           CASE execution_status
               WHEN 'cancelled' THEN 'none'
               WHEN 'all_complete' THEN CASE WHEN task_status = 'complete' THEN 'none' ELSE 'finalize_task' END
               WHEN 'blocked_by_failures' THEN 'handle_failures'
               WHEN 'has_ready_steps' THEN 'execute_ready_steps'
               WHEN 'processing' THEN 'wait_for_completion'
               ELSE 'wait_for_dependencies'
           END,
           CASE
               WHEN execution_status = 'cancelled' THEN 'unknown'
               WHEN failed + retrying = 0 THEN 'healthy'
               WHEN execution_status = 'blocked_by_failures' THEN 'blocked'
               ELSE 'recovering'
           END,
           CASE WHEN total = 0 THEN 0 ELSE round(100.0 * done / total, 2)::DOUBLE PRECISION END
    FROM judged
$$;
