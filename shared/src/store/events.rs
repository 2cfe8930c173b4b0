//! The lifecycle events relay's reads and its cursor (see [`crate::events`]).

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use serde_json::value::RawValue;
use sqlx::PgConnection;
use sqlx::types::Json;
use uuid::Uuid;

use crate::states::TransitionReason;

/// A recorded transition: what an event about it needs, but for the names of its task
/// and step (read once per batch with [`names_of`]).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct RecordedTransition {
    /// Its id (one sequence across task and step transitions).
    pub transition_id: i64,
    /// The id before it among the transitions read (`None` for the first): where it
    /// follows the one before without a gap, `transition_id - 1`.
    pub previous: Option<i64>,
    /// When it was recorded.
    pub created_at: DateTime<Utc>,
    /// The task (none for a schedule's fire that created none).
    pub task_id: Option<Uuid>,
    /// The step, for step transitions.
    pub step_id: Option<Uuid>,
    /// Status before.
    pub from_status: Option<String>,
    /// Status after.
    pub to_status: String,
    /// Why.
    pub reason: TransitionReason,
    /// Attempt, worker, error code…, as stored (an object).
    pub metadata: Json<Box<RawValue>>,
    /// The schedule, for a schedule's fire.
    pub schedule: Option<String>,
    /// The schedule's namespace, for a fire (none when the schedule is gone).
    pub schedule_namespace: Option<String>,
    /// The schedule's template.
    pub schedule_template: Option<String>,
    /// The schedule's template version (empty: its newest).
    pub schedule_version: Option<String>,
}

/// What an event names of its task: the template and the priority.
#[derive(Debug, Clone)]
pub struct TaskNames {
    /// Its namespace.
    pub namespace: String,
    /// Its template's name.
    pub name: String,
    /// Its template's version.
    pub version: String,
    /// Its priority.
    pub priority: i16,
}

/// The names of the tasks and steps of a batch of transitions; a task or step that is
/// gone (deleted by retention) is absent.
#[derive(Debug, Default)]
pub struct Names {
    /// By task id.
    pub tasks: HashMap<Uuid, TaskNames>,
    /// Step names by step id.
    pub steps: HashMap<Uuid, String>,
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

/// Of the `limit` transitions after `after` (task and step ones together, in id order),
/// those that may be events, each one that follows a gap in the ids, and the last: a
/// step's row whose status is not among `step_statuses` (a claim, to `enqueued` or back
/// to `pending`, never is) becomes no published event and is not returned unless it is
/// one of those. PostgreSQL still reads every row of the window, for the gaps and the
/// last.
pub async fn transitions_after(
    conn: &mut PgConnection,
    after: i64,
    limit: i64,
    step_statuses: &[&str],
) -> sqlx::Result<Vec<RecordedTransition>> {
    sqlx::query_as(include_str!("../../sql/events/transitions_after.sql"))
        .bind(after)
        .bind(limit)
        .bind(step_statuses)
        .fetch_all(conn)
        .await
}

/// The names of the tasks `task_ids` and of the steps `step_ids`.
pub async fn names_of(
    conn: &mut PgConnection,
    task_ids: &[Uuid],
    step_ids: &[Uuid],
) -> sqlx::Result<Names> {
    type Row = (
        bool,
        Uuid,
        Option<String>,
        String,
        Option<String>,
        Option<i16>,
    );
    let rows: Vec<Row> = sqlx::query_as(include_str!("../../sql/events/names.sql"))
        .bind(task_ids)
        .bind(step_ids)
        .fetch_all(conn)
        .await?;
    let mut names = Names::default();
    for (is_task, id, namespace, name, version, priority) in rows {
        if is_task {
            let task = TaskNames {
                namespace: namespace.unwrap_or_default(),
                name,
                version: version.unwrap_or_default(),
                priority: priority.unwrap_or_default(),
            };
            names.tasks.insert(id, task);
        } else {
            names.steps.insert(id, name);
        }
    }
    Ok(names)
}
