//! Claiming steps for dispatch: the one claim path.
//!
//! Every claim goes through `tasker_claim_steps` (migrations/0013), whatever found the
//! steps: the dispatcher's scan of ready steps and of steps held by a limit
//! ([`claim_ready`]), the children a batch of results completed and the held steps
//! of the keys it freed ([`claim_children`]), a new task's first steps (claimed inside
//! `tasker_create_tasks`, read back with [`claimed_in`]). The function applies the claim
//! rule (`tasker_step_claimable`) and the limits (holding the steps that do not fit),
//! writes the `dispatched` history rows, starts the tasks and returns each claimed step's
//! message. A new condition on claiming goes there.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::postgres::PgRow;
use sqlx::{FromRow, PgConnection, Row};
use uuid::Uuid;

use crate::messages::{SCHEMA_VERSION, StepMessage};

/// A row of `tasker_claim_steps`: a claimed step's message.
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

/// Claim up to `limit` ready steps, best first, with a lease of `lease_ms`, and the held
/// steps that may fit again: rate-held steps whose slot came (up to `limit` per key), the
/// first steps of tasks waiting for a template concurrency key with room, and, with
/// `every_key`, the held steps of every concurrency key with a free slot (up to `limit`
/// keys). Results release their keys' held steps themselves; `every_key` is for slots
/// freed otherwise (an expired lease, a cancelled task). Returns the messages to publish
/// once the caller's transaction commits. Rows locked by another coordinator are
/// skipped, so two coordinators never claim the same step.
pub async fn claim_ready(
    conn: &mut PgConnection,
    limit: i64,
    lease_ms: i64,
    every_key: bool,
) -> sqlx::Result<Vec<Dispatch>> {
    let rows: Vec<ClaimedRow> = sqlx::query_as(include_str!("../../../sql/claim/ready.sql"))
        .bind(limit)
        .bind(lease_ms)
        .bind(every_key)
        .fetch_all(conn)
        .await?;
    Ok(rows.into_iter().map(Dispatch::from).collect())
}

/// Count the completion of `completed` steps against their children, and claim each
/// child whose last parent this was, and the held steps of `freed` concurrency keys (a
/// step of each finished) that now fit. The caller holds the children's rows
/// ([`lock_batch`](super::lock_batch)).
pub async fn claim_children(
    conn: &mut PgConnection,
    completed: &[Uuid],
    freed: &[String],
    lease_ms: i64,
) -> sqlx::Result<Vec<Dispatch>> {
    if completed.is_empty() && freed.is_empty() {
        return Ok(Vec::new());
    }
    let rows: Vec<ClaimedRow> = sqlx::query_as(include_str!("../../../sql/claim/children.sql"))
        .bind(completed)
        .bind(lease_ms)
        .bind(freed)
        .fetch_all(conn)
        .await?;
    Ok(rows.into_iter().map(Dispatch::from).collect())
}

/// The claimed step in a row of `tasker_create_tasks`, which returns a created task's
/// first steps as `tasker_claim_steps` claimed them (none: `step_id` is NULL).
pub(crate) fn claimed_in(row: &PgRow) -> sqlx::Result<Option<Dispatch>> {
    if row.try_get::<Option<Uuid>, _>("step_id")?.is_none() {
        return Ok(None);
    }
    ClaimedRow::from_row(row).map(|row| Some(Dispatch::from(row)))
}

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
    sqlx::query_scalar(include_str!("../../../sql/claim/next_due.sql"))
        .fetch_one(conn)
        .await
}
