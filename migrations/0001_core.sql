-- Tasker core schema.
--
-- The current state of every task and step lives on its row; every change of state also
-- appends a row to task_transitions / step_transitions (append-only audit history).
-- All state changes are made by the statements in tasker-shared's `store::transitions`
-- module, which guard on the current state (and, for results, on the dispatch token).

CREATE TABLE namespaces (
    namespace_id  BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name          TEXT NOT NULL UNIQUE,
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE templates (
    template_id   BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    namespace_id  BIGINT NOT NULL REFERENCES namespaces (namespace_id),
    name          TEXT NOT NULL,
    version       TEXT NOT NULL,
    description   TEXT,
    -- The validated, normalised definition (the project's own format, as JSON).
    definition    JSONB NOT NULL,
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    UNIQUE (namespace_id, name, version)
);

CREATE TABLE tasks (
    -- UUIDv7: time ordered, so it doubles as the list cursor.
    task_id          UUID PRIMARY KEY,
    template_id      BIGINT NOT NULL REFERENCES templates (template_id),
    namespace        TEXT NOT NULL,
    name             TEXT NOT NULL,
    version          TEXT NOT NULL,
    status           TEXT NOT NULL CHECK (status IN
                       ('pending', 'in_progress', 'complete', 'error', 'cancelled', 'resolved_manually')),
    context          JSONB NOT NULL,
    initiator        TEXT,
    source_system    TEXT,
    reason           TEXT,
    tags             JSONB NOT NULL DEFAULT '[]',
    idempotency_key  TEXT,
    -- W3C traceparent of the span that created the task: every dispatch span is its
    -- child, so one trace covers the task's whole life.
    trace_parent     TEXT,
    created_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    completed_at     TIMESTAMPTZ
);

CREATE UNIQUE INDEX tasks_idempotency_key ON tasks (namespace, name, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE INDEX tasks_by_status ON tasks (status, task_id);
CREATE INDEX tasks_by_template ON tasks (namespace, name, task_id);

CREATE TABLE steps (
    step_id            UUID PRIMARY KEY,
    task_id            UUID NOT NULL REFERENCES tasks (task_id) ON DELETE CASCADE,
    name               TEXT NOT NULL,
    position           INT NOT NULL,
    handler            TEXT NOT NULL,
    config             JSONB NOT NULL DEFAULT '{}',
    status             TEXT NOT NULL CHECK (status IN
                         ('pending', 'enqueued', 'in_progress', 'complete', 'waiting_for_retry',
                          'error', 'cancelled', 'resolved_manually')),
    -- Parents not yet complete or resolved. Maintained by the statement that finishes a
    -- parent, so readiness is a lookup on this row and never a scan of the graph.
    remaining_parents  INT NOT NULL,
    attempts           INT NOT NULL DEFAULT 0,
    retry_limit        INT NOT NULL CHECK (retry_limit >= 1),
    retryable          BOOLEAN NOT NULL,
    timeout_ms         BIGINT NOT NULL,
    -- Backoff policy: exponential (base, cap, jitter) unless a schedule is given, in
    -- which case attempt n waits schedule[n] (the last entry repeats). A handler's
    -- retry_after wins, capped by backoff_max_ms. See tasker_backoff_ms().
    backoff_base_ms      BIGINT NOT NULL DEFAULT 1000,
    backoff_max_ms       BIGINT NOT NULL DEFAULT 30000,
    backoff_jitter       BOOLEAN NOT NULL DEFAULT true,
    backoff_schedule_ms  BIGINT[],
    -- "Not now" answers that did not spend an attempt, and how many are allowed.
    deferrals          INT NOT NULL DEFAULT 0,
    max_deferrals      INT NOT NULL DEFAULT 20,
    results            JSONB,
    last_error         JSONB,
    -- Fencing: results are applied only when they carry the current token.
    dispatch_token     UUID,
    lease_expires_at   TIMESTAMPTZ,
    next_attempt_at    TIMESTAMPTZ,
    -- When the step last became ready (parents done, or backoff over): the start of its
    -- queue latency.
    ready_at           TIMESTAMPTZ,
    enqueued_at        TIMESTAMPTZ,
    started_at         TIMESTAMPTZ,
    completed_at       TIMESTAMPTZ,
    created_at         TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at         TIMESTAMPTZ NOT NULL DEFAULT now(),
    UNIQUE (task_id, name)
);

-- The dispatcher's hot path: steps whose parents are all done, oldest first.
CREATE INDEX steps_ready ON steps (next_attempt_at NULLS FIRST, created_at)
    WHERE status IN ('pending', 'waiting_for_retry') AND remaining_parents = 0;
-- The sweeper's path: leases that can expire.
CREATE INDEX steps_leased ON steps (lease_expires_at)
    WHERE status IN ('enqueued', 'in_progress');
CREATE INDEX steps_by_task ON steps (task_id, position);
-- Counting unfinished steps (gauges, /health/status) without reading finished history.
CREATE INDEX steps_unfinished ON steps (status)
    WHERE status IN ('pending', 'enqueued', 'in_progress', 'waiting_for_retry');

CREATE TABLE step_edges (
    task_id    UUID NOT NULL REFERENCES tasks (task_id) ON DELETE CASCADE,
    from_step  UUID NOT NULL REFERENCES steps (step_id) ON DELETE CASCADE,
    to_step    UUID NOT NULL REFERENCES steps (step_id) ON DELETE CASCADE,
    PRIMARY KEY (from_step, to_step)
);
CREATE INDEX step_edges_to ON step_edges (to_step);

-- One sequence for both histories, so task and step transitions have one order (the
-- lifecycle events relay publishes them in it).
CREATE SEQUENCE transition_ids;

CREATE TABLE task_transitions (
    transition_id  BIGINT PRIMARY KEY DEFAULT nextval('transition_ids'),
    task_id        UUID NOT NULL REFERENCES tasks (task_id) ON DELETE CASCADE,
    from_status    TEXT,
    to_status      TEXT NOT NULL,
    reason         TEXT NOT NULL,
    metadata       JSONB NOT NULL DEFAULT '{}',
    -- The transaction's time: the same instant as the state change it records.
    created_at     TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX task_transitions_by_task ON task_transitions (task_id, transition_id);

CREATE TABLE step_transitions (
    transition_id  BIGINT PRIMARY KEY DEFAULT nextval('transition_ids'),
    step_id        UUID NOT NULL REFERENCES steps (step_id) ON DELETE CASCADE,
    task_id        UUID NOT NULL REFERENCES tasks (task_id) ON DELETE CASCADE,
    from_status    TEXT,
    to_status      TEXT NOT NULL,
    reason         TEXT NOT NULL,
    metadata       JSONB NOT NULL DEFAULT '{}',
    -- The transaction's time: the same instant as the state change it records.
    created_at     TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX step_transitions_by_step ON step_transitions (step_id, transition_id);
CREATE INDEX step_transitions_by_task ON step_transitions (task_id, transition_id);

-- Append-only: history rows are never changed or removed one by one (deleting a task
-- cascades, which is the only way history goes away).
CREATE FUNCTION tasker_refuse_history_update() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'transition history is append-only';
END $$;
CREATE TRIGGER task_transitions_append_only BEFORE UPDATE ON task_transitions
    FOR EACH ROW EXECUTE FUNCTION tasker_refuse_history_update();
CREATE TRIGGER step_transitions_append_only BEFORE UPDATE ON step_transitions
    FOR EACH ROW EXECUTE FUNCTION tasker_refuse_history_update();
