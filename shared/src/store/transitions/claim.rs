//! Claiming ready steps for dispatch.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::messages::{SCHEMA_VERSION, StepMessage};

#[derive(sqlx::FromRow)]
struct ClaimedRow {
    step_id: Uuid,
    task_id: Uuid,
    name: String,
    handler: String,
    config: Value,
    attempts: i32,
    retry_limit: i32,
    deferrals: i32,
    dispatch_token: Uuid,
    timeout_ms: i64,
    namespace: String,
    template: String,
    context: Value,
    parents: Value,
    dispatched_at: DateTime<Utc>,
    trace_parent: Option<String>,
}

/// A claimed step, ready to publish.
#[derive(Debug, Clone)]
pub struct Dispatch {
    /// The message for the worker.
    pub message: StepMessage,
    /// The task's trace (W3C traceparent), when traces are on: the dispatch span's parent.
    pub trace_parent: Option<String>,
}

/// Claim up to `limit` ready steps: mark them `enqueued` with a fresh dispatch token and a
/// lease of `lease_ms`, count the attempt, move their tasks to `in_progress`, and return
/// the messages to publish once the caller's transaction commits.
///
/// Ready means: `pending` or `waiting_for_retry`, no unfinished parent, backoff expired,
/// attempts left. Rows locked by another coordinator are skipped, so two coordinators
/// never claim the same step.
pub async fn claim_ready(
    conn: &mut PgConnection,
    limit: i64,
    lease_ms: i64,
) -> sqlx::Result<Vec<Dispatch>> {
    let rows: Vec<ClaimedRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        r#"
        WITH candidates AS (
            SELECT step_id, status AS from_status
            FROM steps
            WHERE status IN ('pending', 'waiting_for_retry')
              AND remaining_parents = 0
              AND (next_attempt_at IS NULL OR next_attempt_at <= now())
              AND attempts < retry_limit
            ORDER BY next_attempt_at NULLS FIRST, created_at
            LIMIT $1
            FOR UPDATE SKIP LOCKED
        ),
        claimed AS (
            UPDATE steps s
            SET status = 'enqueued',
                attempts = s.attempts + 1,
                dispatch_token = gen_random_uuid(),
                lease_expires_at = now() + $2 * interval '1 millisecond',
                next_attempt_at = NULL,
                enqueued_at = now(),
                updated_at = now()
            FROM candidates c
            WHERE s.step_id = c.step_id
            RETURNING s.step_id, s.task_id, s.name, s.handler, s.config, s.attempts,
                      s.retry_limit, s.deferrals, s.dispatch_token, s.timeout_ms, c.from_status
        ),
        step_history AS (
            INSERT INTO step_transitions (step_id, task_id, from_status, to_status, reason, metadata)
            SELECT step_id, task_id, from_status, 'enqueued', 'dispatched',
                   jsonb_build_object('attempt', attempts, 'dispatch_token', dispatch_token)
            FROM claimed
        ),
        started_tasks AS (
            -- Task rows are locked in id order, as everywhere else, so two coordinators
            -- starting the same tasks cannot deadlock. The ids go through arrays
            -- (evaluated once) so the lookups are primary-key probes whatever the
            -- statistics say: planned as a join, statistics taken while no task was
            -- pending made this a nested loop over every pending task, for minutes.
            UPDATE tasks t SET status = 'in_progress', updated_at = now()
            WHERE t.task_id = ANY (ARRAY(
                      SELECT task_id FROM tasks
                      WHERE task_id = ANY (ARRAY(SELECT task_id FROM claimed))
                        AND status = 'pending'
                      ORDER BY task_id
                      FOR UPDATE))
              AND t.status = 'pending'
            RETURNING t.task_id
        ),
        task_history AS (
            INSERT INTO task_transitions (task_id, from_status, to_status, reason)
            SELECT task_id, 'pending', 'in_progress', 'first_step_dispatched' FROM started_tasks
        )
        SELECT {MESSAGE_COLUMNS}
        FROM claimed c JOIN tasks t ON t.task_id = c.task_id
        "#
    )))
    .bind(limit)
    .bind(lease_ms)
    .fetch_all(conn)
    .await?;

    Ok(rows.into_iter().map(Dispatch::from).collect())
}

/// The messages of steps claimed earlier in the caller's transaction (the children
/// [`apply_results`](super::apply_results) claimed), with their parents' results. The
/// steps are read by id alone (the module's "Plans"): they are `enqueued`, since this
/// transaction claimed them.
pub async fn dispatches_for(
    conn: &mut PgConnection,
    steps: &[Uuid],
) -> sqlx::Result<Vec<Dispatch>> {
    if steps.is_empty() {
        return Ok(Vec::new());
    }
    let rows: Vec<ClaimedRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        r#"
        SELECT {MESSAGE_COLUMNS}
        FROM steps c JOIN tasks t ON t.task_id = c.task_id
        WHERE c.step_id = ANY ($1)
        "#
    )))
    .bind(steps)
    .fetch_all(conn)
    .await?;
    Ok(rows.into_iter().map(Dispatch::from).collect())
}

/// What a step message is made of, for the step `c` of the task `t`: every field of a
/// [`ClaimedRow`].
const MESSAGE_COLUMNS: &str = r#"
    c.step_id, c.task_id, c.name, c.handler, c.config, c.attempts, c.retry_limit,
    c.deferrals, c.dispatch_token, c.timeout_ms, t.namespace,
    t.name || '@' || t.version AS template, t.context,
    COALESCE((SELECT jsonb_object_agg(p.name, COALESCE(p.results, 'null'::jsonb))
              FROM steps p
              WHERE p.step_id = ANY (ARRAY(SELECT from_step FROM step_edges
                                           WHERE to_step = c.step_id))),
             '{}'::jsonb) AS parents,
    now() AS dispatched_at, t.trace_parent"#;

impl From<ClaimedRow> for Dispatch {
    fn from(row: ClaimedRow) -> Self {
        Dispatch {
            trace_parent: row.trace_parent,
            message: StepMessage {
                schema_version: SCHEMA_VERSION,
                task_id: row.task_id,
                step_id: row.step_id,
                step_name: row.name,
                namespace: row.namespace,
                template: row.template,
                handler: row.handler,
                config: row.config,
                context: row.context,
                parents: match row.parents {
                    Value::Object(map) => map.into_iter().collect(),
                    _ => Default::default(),
                },
                attempt: row.attempts,
                retry_limit: row.retry_limit,
                deferrals: row.deferrals,
                dispatch_token: row.dispatch_token,
                timeout_ms: row.timeout_ms,
                dispatched_at: row.dispatched_at,
            },
        }
    }
}

/// When the next step in backoff becomes (or became) ready, if any: the dispatcher sleeps
/// until then rather than polling. A time in the past is returned too: the step fell due
/// after the dispatcher's last claim looked, and must not wait for the next poll.
pub async fn next_due(conn: &mut PgConnection) -> sqlx::Result<Option<DateTime<Utc>>> {
    sqlx::query_scalar(
        r#"
        SELECT min(next_attempt_at) FROM steps
        WHERE status IN ('pending', 'waiting_for_retry') AND remaining_parents = 0
          AND next_attempt_at IS NOT NULL AND attempts < retry_limit
        "#,
    )
    .fetch_one(conn)
    .await
}
