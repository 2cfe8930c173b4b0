//! What operators do: cancel a task, retry a failed task, resolve a step by hand, and
//! signal a step that waits (`tasker.wait`).
//!
//! Each runs in the caller's transaction, locks the task row first (so it serialises
//! with result application and with other operators), checks the task's state, and
//! records who asked and why in the history's metadata.

use serde_json::{Value, json};
use sqlx::PgConnection;
use uuid::Uuid;

use super::Dispatch;
use crate::states::{StepStatus, TaskStatus, TransitionReason};

/// Why an operator action was refused.
#[derive(Debug, thiserror::Error)]
pub enum OperatorError {
    /// No such task.
    #[error("no task {0}")]
    TaskNotFound(Uuid),
    /// No such step in the task.
    #[error("task {task_id} has no step `{step}`")]
    StepNotFound {
        /// The task.
        task_id: Uuid,
        /// The step name asked for.
        step: String,
    },
    /// No step of the task waits for this signal.
    #[error("no step of task {task_id} waits for the signal `{signal}`")]
    SignalNotFound {
        /// The task.
        task_id: Uuid,
        /// The signal asked for.
        signal: String,
    },
    /// The action does not apply in the task's or step's current state.
    #[error("{0}")]
    Conflict(String),
    /// The database failed.
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

async fn lock_task(conn: &mut PgConnection, task_id: Uuid) -> Result<TaskStatus, OperatorError> {
    sqlx::query_scalar("SELECT status FROM tasks WHERE task_id = $1 FOR UPDATE")
        .bind(task_id)
        .fetch_optional(&mut *conn)
        .await?
        .ok_or(OperatorError::TaskNotFound(task_id))
}

async fn move_task(
    conn: &mut PgConnection,
    task_id: Uuid,
    from: TaskStatus,
    to: TaskStatus,
    reason: TransitionReason,
    metadata: &Value,
) -> sqlx::Result<()> {
    sqlx::query(include_str!("../../../sql/operator/move_task.sql"))
        .bind(task_id)
        .bind(from)
        .bind(to)
        .bind(reason)
        .bind(metadata)
        .execute(conn)
        .await?;
    Ok(())
}

/// What [`cancel_task`] did.
#[derive(Debug, Default)]
pub struct Cancelled {
    /// How many steps were cancelled, of the task and of its descendants.
    pub steps: u64,
    /// The task's unfinished child tasks (`tasker.task`), their children and so on,
    /// cancelled with it.
    pub descendants: Vec<Uuid>,
    /// When the task is a child task: its step judged (failed, `child_task_cancelled`),
    /// what that made ready claimed, and the parent task finished if it can.
    pub parent: super::Finished,
}

/// Cancel a task: every unfinished step becomes `cancelled` (results still in flight
/// will be fenced out) and the task `cancelled`, and so do its unfinished child tasks,
/// theirs and so on (history `parent_cancelled`). Refused once the task has finished. A
/// task that a `tasker.task` step started hands that step back to the coordinator, which
/// fails it (`child_task_cancelled`).
pub async fn cancel_task(
    conn: &mut PgConnection,
    task_id: Uuid,
    reason: Option<&str>,
    lease_ms: i64,
) -> Result<Cancelled, OperatorError> {
    let status = lock_task(conn, task_id).await?;
    if status.is_finished() {
        return Err(OperatorError::Conflict(format!(
            "task {task_id} is already {status}; only pending or in-progress tasks can be cancelled"
        )));
    }
    cancel_tree(
        conn,
        task_id,
        status,
        TransitionReason::CancelledByOperator,
        &json!({"reason": reason}),
        reason,
        lease_ms,
    )
    .await
    .map_err(OperatorError::from)
}

/// Cancel up to `limit` unfinished child tasks whose parent task was cancelled without
/// them (a claim cancelled it as the oldest of its template's concurrency key), with
/// their own children, as a cancel of the parent would have (history `parent_cancelled`).
/// Rows another coordinator holds are left to it. Returns the tasks cancelled, theirs
/// included: workers are to drop what they run for them.
pub async fn cancel_orphans(
    conn: &mut PgConnection,
    limit: i64,
    lease_ms: i64,
) -> sqlx::Result<Vec<Uuid>> {
    let orphans: Vec<(Uuid, Uuid, TaskStatus)> =
        sqlx::query_as(super::child_tasks::ORPHANS.as_str())
            .bind(limit)
            .fetch_all(&mut *conn)
            .await?;
    let mut cancelled = Vec::new();
    for (task_id, parent, status) in orphans {
        let tree = cancel_tree(
            conn,
            task_id,
            status,
            TransitionReason::ParentCancelled,
            &json!({"parent_task_id": parent}),
            None,
            lease_ms,
        )
        .await?;
        tracing::info!(%task_id, parent_task_id = %parent, steps_cancelled = tree.steps,
            child_tasks_cancelled = tree.descendants.len(),
            "child task cancelled: its parent task was cancelled by its template's concurrency");
        cancelled.push(task_id);
        cancelled.extend(tree.descendants);
    }
    Ok(cancelled)
}

/// Cancel the locked task `task_id`, in `status`, for `why` (history metadata
/// `metadata`), and its unfinished child tasks, theirs and so on (`parent_cancelled`,
/// with the operator's `reason`); free their slots, and judge the step that started the
/// task if it still waits for it.
async fn cancel_tree(
    conn: &mut PgConnection,
    task_id: Uuid,
    status: TaskStatus,
    why: TransitionReason,
    metadata: &Value,
    reason: Option<&str>,
    lease_ms: i64,
) -> sqlx::Result<Cancelled> {
    let mut cancelled = Cancelled {
        steps: cancel_steps(conn, task_id, metadata).await?,
        ..Cancelled::default()
    };
    move_task(conn, task_id, status, TaskStatus::Cancelled, why, metadata).await?;
    let mut parents = vec![task_id];
    while !parents.is_empty() {
        let children: Vec<(Uuid, Uuid, TaskStatus)> = sqlx::query_as(
            "SELECT task_id, parent_task_id, status FROM tasks \
             WHERE parent_task_id = ANY($1) AND status IN ('pending', 'in_progress') \
             ORDER BY task_id FOR UPDATE",
        )
        .bind(&parents)
        .fetch_all(&mut *conn)
        .await?;
        parents = Vec::with_capacity(children.len());
        for (child, parent, status) in children {
            let metadata = json!({"reason": reason, "parent_task_id": parent});
            cancelled.steps += cancel_steps(conn, child, &metadata).await?;
            move_task(
                conn,
                child,
                status,
                TaskStatus::Cancelled,
                TransitionReason::ParentCancelled,
                &metadata,
            )
            .await?;
            parents.push(child);
        }
        cancelled.descendants.extend(&parents);
    }
    // Their template-concurrency slots, if they hold any (a started task of a template
    // with a `concurrency` holds one per key), so the keys' counts stop reading them.
    let mut ended = vec![task_id];
    ended.extend(&cancelled.descendants);
    super::free_slots(conn, ended.into_iter()).await?;
    // The step that started this task, if it still waits for it, is judged now.
    cancelled.parent = super::children_ended(conn, &[task_id], lease_ms).await?;
    Ok(cancelled)
}

/// Cancel every unfinished step of a task; returns how many.
async fn cancel_steps(
    conn: &mut PgConnection,
    task_id: Uuid,
    metadata: &Value,
) -> sqlx::Result<u64> {
    let mut cancelled = 0;
    // Twice: the first statement waits for the transactions that hold the task's steps
    // (a result being applied) and then sees only the rows its snapshot had, not those
    // they added (a fan-out's instances, which the claim would then dispatch). The
    // second sees them, and later transactions wait for this one's locks.
    for _ in 0..2 {
        cancelled += sqlx::query(include_str!("../../../sql/operator/cancel_task.sql"))
            .bind(task_id)
            .bind(metadata)
            .execute(&mut *conn)
            .await?
            .rows_affected();
    }
    Ok(cancelled)
}

/// Retry a task in `error`: its failed steps go back to `pending` with a fresh attempt
/// (and deferral) budget, and the task runs on. Returns how many steps were reset.
pub async fn retry_task(
    conn: &mut PgConnection,
    task_id: Uuid,
    reason: Option<&str>,
) -> Result<u64, OperatorError> {
    let status = lock_task(conn, task_id).await?;
    if status != TaskStatus::Error {
        return Err(OperatorError::Conflict(format!(
            "task {task_id} is {status}; only a task in error can be retried"
        )));
    }
    let metadata = json!({"reason": reason});
    reopen_task(
        conn,
        task_id,
        true,
        TransitionReason::RetryRequested,
        &metadata,
    )
    .await
}

/// Run a task in `error` on: its steps its deadline cancelled go back to `pending` with
/// fresh budgets, and with `failed_steps` (a retry) those in `error` too, after their
/// clean-up and compensation children were made to wait for them again; the deadline is
/// lifted, the task goes to `in_progress` (history `reason`) and takes its concurrency
/// slots again. Returns how many steps were reset.
async fn reopen_task(
    conn: &mut PgConnection,
    task_id: Uuid,
    failed_steps: bool,
    reason: TransitionReason,
    metadata: &Value,
) -> Result<u64, OperatorError> {
    if failed_steps {
        // First, while the failed steps are still in `error`: their clean-up and
        // compensation children wait for them again.
        sqlx::query(include_str!("../../../sql/triggers/uncount_failed.sql"))
            .bind(task_id)
            .execute(&mut *conn)
            .await?;
    }
    let reset = sqlx::query(include_str!("../../../sql/operator/reopen_steps.sql"))
        .bind(task_id)
        .bind(metadata)
        .bind(failed_steps)
        .bind(reason.as_str())
        .execute(&mut *conn)
        .await?
        .rows_affected();
    move_task(
        conn,
        task_id,
        TaskStatus::Error,
        TaskStatus::InProgress,
        reason,
        metadata,
    )
    .await?;
    // Its slots were given back when it failed: running again, it counts again.
    sqlx::query(include_str!("../../../sql/operator/retake_slots.sql"))
        .bind(task_id)
        .execute(&mut *conn)
        .await?;
    Ok(reset)
}

/// Close a task in `error` by hand: an operator has dealt with its failure outside Tasker,
/// and nothing more of it runs. Its steps stay as they are (the failed ones in `error`,
/// the ones behind them `pending`), so its history still says what failed.
pub async fn resolve_task(
    conn: &mut PgConnection,
    task_id: Uuid,
    reason: Option<&str>,
) -> Result<(), OperatorError> {
    let status = lock_task(conn, task_id).await?;
    if status != TaskStatus::Error {
        return Err(OperatorError::Conflict(format!(
            "task {task_id} is {status}; only a task in error can be resolved"
        )));
    }
    move_task(
        conn,
        task_id,
        status,
        TaskStatus::ResolvedManually,
        TransitionReason::ResolvedByOperator,
        &json!({"reason": reason}),
    )
    .await?;
    Ok(())
}

/// Resolve a step by hand with `results` (what its dependents will see as its results):
/// allowed while the step is `pending`, `waiting_for_retry` or `error`, in a task that is
/// neither finished successfully nor cancelled. A task in `error` runs on: the steps its
/// deadline cancelled run again, and the deadline is lifted, as in a retry. The caller then
/// finishes the task ([`super::finish_tasks`]) and wakes the dispatcher.
pub async fn resolve_step(
    conn: &mut PgConnection,
    task_id: Uuid,
    step: &str,
    results: Option<&Value>,
    reason: Option<&str>,
) -> Result<(), OperatorError> {
    let status = lock_task(conn, task_id).await?;
    if matches!(
        status,
        TaskStatus::Complete | TaskStatus::Cancelled | TaskStatus::ResolvedManually
    ) {
        return Err(OperatorError::Conflict(format!(
            "task {task_id} is {status}; its steps can no longer be resolved"
        )));
    }
    let current: Option<(Uuid, StepStatus)> = sqlx::query_as(
        "SELECT step_id, status FROM steps WHERE task_id = $1 AND name = $2 FOR UPDATE",
    )
    .bind(task_id)
    .bind(step)
    .fetch_optional(&mut *conn)
    .await?;
    let (step_id, current) = current.ok_or_else(|| OperatorError::StepNotFound {
        task_id,
        step: step.to_owned(),
    })?;
    if status == TaskStatus::Pending {
        // A task its template's concurrency holds back starts with a slot of each key; a
        // step resolved now would run its dependents without one, past the limit.
        let (keys,): (Option<Vec<String>>,) =
            sqlx::query_as("SELECT concurrency_keys FROM tasks WHERE task_id = $1")
                .bind(task_id)
                .fetch_one(&mut *conn)
                .await?;
        if let Some(keys) = keys.filter(|keys| !keys.is_empty()) {
            return Err(OperatorError::Conflict(format!(
                "task {task_id} has not started, and its template's concurrency gives it a \
                 slot of key {} only when it does; resolve its steps once it runs, or cancel it",
                keys.join(", ")
            )));
        }
    }
    if !current.can_transition_to(StepStatus::ResolvedManually) {
        return Err(OperatorError::Conflict(format!(
            "step `{step}` is {current}; only a pending, waiting_for_retry or error step can be resolved"
        )));
    }
    // What of the step still runs: its child task (`tasker.task`), or its instances
    // (`for_each`). Read once the step is locked, in a statement of its own: its snapshot
    // has what the transaction that held the step (starting the child, expanding the
    // instances) wrote.
    let (child, instances): (Option<Uuid>, i64) = sqlx::query_as(
        "SELECT (SELECT c.task_id FROM tasks c WHERE c.task_id = s.child_task_id \
                   AND c.status IN ('pending', 'in_progress')), \
                (SELECT count(*) FROM steps i WHERE i.fan_out_of = s.step_id \
                   AND i.status IN ('pending', 'enqueued', 'in_progress', 'waiting_for_retry')) \
         FROM steps s WHERE s.step_id = $1",
    )
    .bind(step_id)
    .fetch_one(&mut *conn)
    .await?;
    if let Some(child) = child {
        return Err(OperatorError::Conflict(format!(
            "step `{step}` waits for its child task {child}, which still runs; cancel or \
             resolve that task instead"
        )));
    }
    if instances > 0 {
        return Err(OperatorError::Conflict(format!(
            "step `{step}` has {instances} instances still to finish; resolve it once they \
             have, or cancel the task"
        )));
    }
    let metadata = json!({"reason": reason});
    sqlx::query(include_str!("../../../sql/operator/resolve_step.sql"))
        .bind(task_id)
        .bind(step)
        .bind(results)
        .bind(current)
        .bind(&metadata)
        .execute(&mut *conn)
        .await?;
    if status == TaskStatus::Error {
        // The task runs on, as a retried one does but for its other failed steps.
        reopen_task(
            conn,
            task_id,
            false,
            TransitionReason::StepResolved,
            &metadata,
        )
        .await?;
    }
    Ok(())
}

/// What [`signal`] did.
#[derive(Debug, Default)]
pub struct Signalled {
    /// The `tasker.wait` steps that received the signal.
    pub steps: Vec<Uuid>,
    /// Whether one of them was waiting, and so completed (the others keep the payload
    /// until they wait).
    pub completed: bool,
    /// Children the completed steps made ready, claimed (lease of `lease_ms`): the
    /// caller publishes them after the commit.
    pub claimed: Vec<Dispatch>,
    /// Steps were left ready for the dispatcher (a fan-out's instances past the first
    /// batch).
    pub more_ready: bool,
    /// The tasks that may have finished, for the caller to finish: this one, and those
    /// judging the children touched (a child task started with every step skipped).
    pub may_finish: Vec<Uuid>,
}

/// Deliver `signal` with `payload` to the `tasker.wait` steps of task `task_id` that wait
/// for it: one waiting completes with the payload as its results and counts for its
/// children (claimed here); one whose parents are not done yet keeps the payload and
/// completes when it would start waiting. The caller finishes the task afterwards.
///
/// # Errors
///
/// [`OperatorError::TaskNotFound`]; [`OperatorError::SignalNotFound`] when no step of the
/// task waits for `signal`; [`OperatorError::Conflict`] when the task is finished, or
/// every such step already received it or no longer waits (timed out, skipped, cancelled).
pub async fn signal(
    conn: &mut PgConnection,
    task_id: Uuid,
    signal: &str,
    payload: &Value,
    lease_ms: i64,
) -> Result<Signalled, OperatorError> {
    let status = lock_task(conn, task_id).await?;
    if status.is_finished() {
        return Err(OperatorError::Conflict(format!(
            "task {task_id} is {status}; it takes no signal"
        )));
    }
    let delivered: Vec<(Uuid, bool)> =
        sqlx::query_as(include_str!("../../../sql/waits/signal.sql"))
            .bind(task_id)
            .bind(signal)
            .bind(payload)
            .fetch_all(&mut *conn)
            .await?;
    if delivered.is_empty() {
        let seen: Vec<(String, bool)> = sqlx::query_as(
            "SELECT CASE WHEN status = 'pending' AND wait_until <= now() THEN 'timed out' \
                         ELSE status END, \
                    signalled_at IS NOT NULL FROM steps \
             WHERE task_id = $1 AND handler = 'tasker.wait' AND config ->> 'signal' = $2",
        )
        .bind(task_id)
        .bind(signal)
        .fetch_all(&mut *conn)
        .await?;
        return Err(if seen.is_empty() {
            OperatorError::SignalNotFound {
                task_id,
                signal: signal.to_owned(),
            }
        } else if seen.iter().any(|(_, received)| *received) {
            OperatorError::Conflict(format!(
                "task {task_id} already received the signal `{signal}`"
            ))
        } else {
            OperatorError::Conflict(format!(
                "no step of task {task_id} waits for the signal `{signal}` any more ({})",
                seen.iter()
                    .map(|(status, _)| status.replace('_', " "))
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        });
    }
    let completed: Vec<Uuid> = delivered
        .iter()
        .filter(|(_, completed)| *completed)
        .map(|(step, _)| *step)
        .collect();
    if !completed.is_empty() {
        super::claim::lock_children(&mut *conn, &completed).await?;
    }
    let judged = super::claim_children(conn, &completed, &[], None, lease_ms).await?;
    let mut may_finish = judged.tasks;
    may_finish.push(task_id);
    may_finish.sort_unstable();
    may_finish.dedup();
    Ok(Signalled {
        steps: delivered.iter().map(|(step, _)| *step).collect(),
        completed: !completed.is_empty(),
        claimed: judged.dispatches,
        more_ready: judged.more_ready,
        may_finish,
    })
}
