//! Reads for operators: why steps are (not) running, a task's execution context, and its
//! transition history. All computed in SQL (`migrations/0002_readiness.sql`).

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sqlx::{PgExecutor, PgPool};
use uuid::Uuid;

use crate::states::{StepStatus, TransitionReason};

/// One step's readiness: is it ready, and if not, why not.
#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct StepReadiness {
    /// The step.
    pub step_id: Uuid,
    /// Its name.
    pub name: String,
    /// Its status.
    pub status: StepStatus,
    /// Whether the dispatcher would claim it now.
    pub ready: bool,
    /// Parents not yet complete or resolved.
    pub waiting_on: Vec<String>,
    /// When its backoff ends.
    pub next_attempt_at: Option<DateTime<Utc>>,
    /// Attempts made.
    pub attempts: i32,
    /// Attempts allowed.
    pub retry_limit: i32,
    /// A code: `ready`, `waiting_on_parents`, `waiting_on_instances`, `waiting_for_signal`,
    /// `waiting_for_child_task`,
    /// `blocked_by_failed_parent`,
    /// `scheduled`, `evaluating_condition`, `skipped`, `in_backoff`,
    /// `concurrency_limited`, `rate_limited`, `attempts_exhausted`, `deferrals_exhausted`,
    /// `failed_permanently`, `enqueued`, `running`, `complete`, `resolved_manually`,
    /// `cancelled`, `task_cancelled`.
    pub reason: String,
    /// The same for people, with the names and times that matter.
    pub message: String,
    /// For a step held by a limit (`concurrency_limited`, `rate_limited`): the key's
    /// value. A rate-held step's next slot is `next_attempt_at`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[sqlx(rename = "limit_key")]
    pub key: Option<String>,
    /// For a held step: the limit (at once, or starts per window).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[sqlx(rename = "limit_value")]
    pub limit: Option<i32>,
}

/// Per step, why it is or is not running (one SQL call).
pub async fn readiness(pool: &PgPool, task_id: Uuid) -> sqlx::Result<Vec<StepReadiness>> {
    sqlx::query_as("SELECT * FROM tasker_step_readiness($1)")
        .bind(task_id)
        .fetch_all(pool)
        .await
}

/// Where a task stands, as tasker-engine's task execution context.
#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct ExecutionContext {
    /// Steps in the task.
    pub total_steps: i64,
    /// Waiting for parents (or not yet claimed).
    pub pending_steps: i64,
    /// Dispatched, not started.
    pub enqueued_steps: i64,
    /// Running.
    pub in_progress_steps: i64,
    /// Complete, resolved manually or skipped.
    pub completed_steps: i64,
    /// Waiting for their next attempt.
    pub waiting_for_retry_steps: i64,
    /// In error.
    pub failed_steps: i64,
    /// Cancelled.
    pub cancelled_steps: i64,
    /// Skipped (bypassed at creation, or their condition was false); counted as done.
    pub skipped_steps: i64,
    /// Ready to be claimed now.
    pub ready_steps: i64,
    /// `has_ready_steps`, `processing`, `blocked_by_failures`, `all_complete`,
    /// `waiting_for_dependencies`, or `cancelled`.
    pub execution_status: String,
    /// `execute_ready_steps`, `wait_for_completion`, `handle_failures`, `finalize_task`,
    /// `wait_for_dependencies`, or `none`.
    pub recommended_action: String,
    /// `healthy`, `recovering`, `blocked`, or `unknown`.
    pub health: String,
    /// Share of steps done, 0–100.
    pub completion_percentage: f64,
}

/// The task's execution context (one SQL call).
pub async fn execution_context<'e>(
    db: impl PgExecutor<'e>,
    task_id: Uuid,
) -> sqlx::Result<Option<ExecutionContext>> {
    sqlx::query_as("SELECT * FROM tasker_task_execution_context($1)")
        .bind(task_id)
        .fetch_optional(db)
        .await
}

/// One recorded transition.
#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct Transition {
    /// The step's name (`None` for the task's own transitions).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
    /// State before (`None` at creation).
    pub from_status: Option<String>,
    /// State after.
    pub to_status: String,
    /// Why.
    pub reason: TransitionReason,
    /// Attempt, worker, error code, operator's reason…
    pub metadata: Value,
    /// When.
    pub created_at: DateTime<Utc>,
}

/// A task's history: its own transitions and its steps' (the newest `limit` of those, or
/// all), each in order.
pub async fn history(
    pool: &PgPool,
    task_id: Uuid,
    limit: Option<i64>,
) -> sqlx::Result<(Vec<Transition>, Vec<Transition>)> {
    let task = sqlx::query_as(include_str!("../../sql/inspect/task_history.sql"))
        .bind(task_id)
        .fetch_all(pool)
        .await?;
    let steps = sqlx::query_as(include_str!("../../sql/inspect/step_history.sql"))
        .bind(task_id)
        .bind(limit)
        .fetch_all(pool)
        .await?;
    Ok((task, steps))
}

/// How much work is in flight: unfinished tasks and steps by status, and the steps ready
/// to run but not yet dispatched. Reads only the partial indexes of unfinished rows, so
/// its cost does not grow with history.
#[derive(Debug, Clone, Default, Serialize)]
pub struct WorkInFlight {
    /// `pending` and `in_progress` tasks.
    pub tasks: Vec<(String, i64)>,
    /// `pending`, `enqueued`, `in_progress` and `waiting_for_retry` steps.
    pub steps: Vec<(String, i64)>,
    /// Steps ready to run but not yet dispatched.
    pub ready_backlog: i64,
    /// Of those, by namespace: how many, and how long the oldest has waited (seconds).
    pub ready_by_namespace: Vec<(String, i64, f64)>,
    /// Steps held by a limit, by reason.
    pub held: Vec<(String, i64)>,
}

/// See [`WorkInFlight`].
pub async fn work_in_flight(conn: &mut sqlx::PgConnection) -> sqlx::Result<WorkInFlight> {
    let tasks = sqlx::query_as(
        "SELECT status, count(*) FROM tasks WHERE status IN ('pending', 'in_progress') GROUP BY status",
    )
    .fetch_all(&mut *conn)
    .await?;
    let steps = sqlx::query_as(include_str!("../../sql/inspect/steps_in_flight.sql"))
        .fetch_all(&mut *conn)
        .await?;
    let ready_by_namespace: Vec<(String, i64, f64)> =
        sqlx::query_as(include_str!("../../sql/inspect/ready_backlog.sql"))
            .fetch_all(&mut *conn)
            .await?;
    let ready_backlog = ready_by_namespace.iter().map(|(_, n, _)| n).sum();
    let held = sqlx::query_as(include_str!("../../sql/inspect/held_steps.sql"))
        .fetch_all(&mut *conn)
        .await?;
    Ok(WorkInFlight {
        tasks,
        steps,
        ready_backlog,
        ready_by_namespace,
        held,
    })
}

/// Every task and step by status, finished ones included (for `/health/status`; reads
/// the whole history, so it is for people, not for a scrape loop).
pub async fn totals(pool: &PgPool) -> sqlx::Result<(Vec<(String, i64)>, Vec<(String, i64)>)> {
    let tasks =
        sqlx::query_as("SELECT status, count(*) FROM tasks GROUP BY status ORDER BY status")
            .fetch_all(pool)
            .await?;
    let steps =
        sqlx::query_as("SELECT status, count(*) FROM steps GROUP BY status ORDER BY status")
            .fetch_all(pool)
            .await?;
    Ok((tasks, steps))
}
