-- Priorities. A task has a priority from 0 to 9 (default 5: its template's `priority`,
-- or the one its creation asked for), copied to its steps. Among steps the claim rule
-- allows, the dispatcher claims the higher priority first, then by due time and
-- creation as before (shared/sql/claim/ready.sql, the steps_claim_order index).
-- steps_ready stays for the dispatcher's wake-up time (the earliest step in backoff).
--
-- Building steps_claim_order reads the steps table once and holds off writes to it
-- meanwhile; on a large history, prune first (docs/operating.md).

ALTER TABLE tasks ADD COLUMN priority SMALLINT NOT NULL DEFAULT 5
    CHECK (priority BETWEEN 0 AND 9);
ALTER TABLE steps ADD COLUMN priority SMALLINT NOT NULL DEFAULT 5;

CREATE INDEX steps_claim_order ON steps (priority DESC, next_attempt_at NULLS FIRST, created_at)
    WHERE status IN ('pending', 'waiting_for_retry') AND remaining_parents = 0;

-- tasker_create_tasks of migration 0011, with each task's priority.
DROP FUNCTION tasker_create_tasks(
    UUID[], BIGINT[], TEXT[], TEXT[], TEXT[], JSONB[], TEXT[], TEXT[], TEXT[], JSONB[],
    TEXT[], TEXT[], INT[], UUID[], INT[], UUID[], TEXT[], TEXT[], JSONB[], INT[], INT[],
    BOOLEAN[], BIGINT[], BIGINT[], BIGINT[], BOOLEAN[], JSONB[], INT[], UUID[], UUID[],
    UUID[], UUID[], BIGINT);

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
    p_first_steps UUID[], p_lease_ms BIGINT, p_priorities SMALLINT[]
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
                    p_trace_parents, p_priorities)
               WITH ORDINALITY
               AS t(task_id, template_id, namespace, name, version, context, initiator,
                    source_system, reason, tags, idempotency_key, trace_parent, priority, n)
    ),
    task AS (
        INSERT INTO tasks (task_id, template_id, namespace, name, version, status, context,
                           initiator, source_system, reason, tags, idempotency_key,
                           trace_parent, priority)
        SELECT t.task_id, t.template_id, t.namespace, t.name, t.version, 'pending',
               t.context, t.initiator, t.source_system, t.reason, t.tags, t.idempotency_key,
               t.trace_parent, t.priority
        FROM input_tasks t
        ORDER BY t.n
        ON CONFLICT (namespace, name, idempotency_key) WHERE idempotency_key IS NOT NULL
        DO NOTHING
        RETURNING tasks.task_id, tasks.created_at, tasks.priority
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
                           backoff_schedule_ms, max_deferrals, ready_at, priority)
        SELECT s.step_id, task.task_id, s.name, s.position, s.handler, s.config, 'pending',
               s.parents, 0, s.retry_limit, s.retryable, s.timeout_ms, s.base_ms, s.max_ms,
               s.jitter,
               CASE WHEN jsonb_typeof(s.schedule) = 'array'
                    THEN ARRAY(SELECT jsonb_array_elements_text(s.schedule)::BIGINT) END,
               s.max_deferrals, CASE WHEN s.parents = 0 THEN now() END, task.priority
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

    -- The first steps are claimed by the one claim, in this statement's transaction.
    -- Those of a task that was not written (its idempotency key was taken) do not
    -- exist, and the claim passes over them.
    RETURN QUERY
    SELECT c.task_id, c.created_at, m.*
    FROM unnest(v_created, v_created_at) AS c(task_id, created_at)
    LEFT JOIN tasker_claim_steps(CASE WHEN p_lease_ms IS NOT NULL THEN p_first_steps END,
                                 NULL, p_lease_ms) m ON m.task_id = c.task_id;
END $$;

