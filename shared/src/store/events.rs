//! The lifecycle events relay's reads and its cursor (see [`crate::events`]).

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::states::TransitionReason;

/// A recorded transition, with what an event about it needs.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct RecordedTransition {
    /// Its id (one sequence across task and step transitions).
    pub transition_id: i64,
    /// When it was recorded.
    pub created_at: DateTime<Utc>,
    /// The task (none for a schedule's fire that created none).
    pub task_id: Option<Uuid>,
    /// The step, for step transitions.
    pub step_id: Option<Uuid>,
    /// The step's name.
    pub step_name: Option<String>,
    /// Status before.
    pub from_status: Option<String>,
    /// Status after.
    pub to_status: String,
    /// Why.
    pub reason: TransitionReason,
    /// Attempt, worker, error code…
    pub metadata: Value,
    /// The task's namespace.
    pub namespace: String,
    /// Its template's name.
    pub task_name: String,
    /// Its template's version.
    pub version: String,
    /// The task's priority.
    pub priority: i16,
    /// The schedule, for a schedule's fire.
    pub schedule: Option<String>,
}

/// Take the relay's cursor for this transaction, or `None` when another coordinator holds
/// it (then that one is relaying).
pub async fn lock_cursor(conn: &mut PgConnection) -> sqlx::Result<Option<i64>> {
    sqlx::query_scalar(
        "SELECT last_transition_id FROM event_relay WHERE id = 1 FOR UPDATE SKIP LOCKED",
    )
    .fetch_optional(conn)
    .await
}

/// Move the cursor.
pub async fn advance_cursor(conn: &mut PgConnection, to: i64) -> sqlx::Result<()> {
    sqlx::query("UPDATE event_relay SET last_transition_id = $1, updated_at = now() WHERE id = 1")
        .bind(to)
        .execute(conn)
        .await?;
    Ok(())
}

/// Up to `limit` transitions after `after`, task and step ones together, in id order.
pub async fn transitions_after(
    conn: &mut PgConnection,
    after: i64,
    limit: i64,
) -> sqlx::Result<Vec<RecordedTransition>> {
    sqlx::query_as(include_str!("../../sql/events/transitions_after.sql"))
        .bind(after)
        .bind(limit)
        .fetch_all(conn)
        .await
}
