//! What the API changes, one function per operation. Each owns its transaction and
//! answers, with its result, the [`Effects`] that must follow the commit: wake the
//! dispatcher or the events relay, publish claimed steps, tell workers about a cancel,
//! count a creation. A handler decodes, calls one of these, applies the effects
//! ([`Effects::apply`]) and renders; it never opens a transaction of its own.

use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

use crate::http::AppState;
use crate::metrics::CoordinatorMetrics;
use tasker_shared::states::TaskStatus;
use tasker_shared::store::tasks::TaskRecord;
use tasker_shared::store::transitions::{self, FinishedTask, OperatorError};

/// An operator's transaction that the database chose as a deadlock victim is tried
/// again this often.
const DEADLOCK_RETRIES: usize = 3;

/// Run `transaction` again when the database broke a deadlock by failing it: operator
/// actions lock a task, then its steps, while result batches and claims lock steps, then
/// their tasks.
async fn again_on_deadlock<T, F>(
    action: &str,
    mut transaction: impl FnMut() -> F,
) -> Result<T, OperatorError>
where
    F: std::future::Future<Output = Result<T, OperatorError>>,
{
    let mut tries = 0;
    loop {
        match transaction().await {
            Err(OperatorError::Database(sqlx::Error::Database(error)))
                if error.code().as_deref() == Some("40P01") && tries < DEADLOCK_RETRIES =>
            {
                tries += 1;
                tracing::warn!(%error, tries, action, "chosen as a deadlock victim; again");
            }
            result => return result,
        }
    }
}

/// What must happen once a change has committed, and only then.
#[must_use = "effects do nothing until applied"]
#[derive(Debug, Default)]
pub(crate) struct Effects {
    /// Steps became ready, or a task may have finished: the dispatcher looks again.
    wake_dispatcher: bool,
    /// Transitions were recorded: the events relay looks again.
    wake_events: bool,
    /// Claimed steps to publish.
    dispatches: Vec<transitions::Dispatch>,
    /// Tasks finished, for `tasker_tasks_finished_total` and the durations.
    finished: Vec<FinishedTask>,
    /// Tasks cancelled: workers are told to abort what they run for them.
    cancelled: Vec<Uuid>,
    /// Namespaces of created tasks, for `tasker_tasks_created_total`.
    created_in: Vec<String>,
}

impl Effects {
    /// A task was created, with its first steps claimed (`dispatches`) or left for the
    /// dispatcher (none claimed, or, when its first steps `leave_work`
    /// ([`TemplateDefinition::first_steps_leave_work`]), what they made ready past the
    /// first batch).
    ///
    /// [`TemplateDefinition::first_steps_leave_work`]: tasker_shared::template::TemplateDefinition::first_steps_leave_work
    pub(crate) fn created(
        task: &TaskRecord,
        dispatches: Vec<transitions::Dispatch>,
        leave_work: bool,
    ) -> Self {
        // Finished as it was created: every step skipped, or its first steps judged to
        // its end.
        let finished =
            matches!(task.status, TaskStatus::Complete | TaskStatus::Error).then(|| FinishedTask {
                task_id: task.task_id,
                namespace: task.namespace.clone(),
                status: task.status,
                limited: false,
                has_parent: false,
                name: task.name.clone(),
                seconds: task.completed_at.map_or(0.0, |at| {
                    (at - task.created_at).num_microseconds().unwrap_or(0) as f64 / 1e6
                }),
            });
        Effects {
            wake_dispatcher: dispatches.is_empty() || leave_work,
            wake_events: true,
            dispatches,
            finished: finished.into_iter().collect(),
            created_in: vec![task.namespace.clone()],
            ..Effects::default()
        }
    }

    /// Carry the effects out, in a task of its own: a client that hangs up once the change
    /// has committed drops its request's future, not what the commit promised (steps
    /// claimed and not yet published would wait for their lease to run out).
    pub(crate) async fn apply(self, state: &AppState) {
        let carried = state.clone();
        // A panic in it is the task's; the request has its answer either way.
        let _ = state
            .effects
            .spawn(async move { self.carry_out(&carried).await })
            .await;
    }

    /// Carry the effects out here, in a task that already outlives its request.
    pub(crate) async fn carry_out(self, state: &AppState) {
        if self.wake_events {
            state.wake_events.notify_one();
        }
        if self.wake_dispatcher {
            state.wake_dispatcher.notify_one();
        }
        for namespace in &self.created_in {
            state
                .metrics
                .tasks_created
                .get_or_create(&CoordinatorMetrics::namespace(namespace))
                .inc();
        }
        state.metrics.finished(&self.finished);
        if !self.dispatches.is_empty() {
            state
                .publisher
                .dispatch(self.dispatches, state.metrics.clone())
                .await;
        }
        for task_id in self.cancelled {
            if let Err(error) = state.control.cancel_task(task_id).await {
                // The fence drops their results anyway; telling workers only saves
                // their time.
                tracing::warn!(error = format!("{error:#}"), %task_id,
                    "cannot tell workers about the cancel");
            }
        }
    }
}

/// Cancel a task ([`transitions::cancel_task`]). Answers how many steps were cancelled.
pub(crate) async fn cancel_task(
    pool: &PgPool,
    task_id: Uuid,
    reason: Option<&str>,
    lease_ms: i64,
) -> Result<(u64, Effects), OperatorError> {
    let cancelled = again_on_deadlock("cancel", || {
        cancel_transaction(pool, task_id, reason, lease_ms)
    })
    .await?;
    tracing::info!(%task_id, steps_cancelled = cancelled.steps,
        child_tasks_cancelled = cancelled.descendants.len(), reason = ?reason,
        "task cancelled");
    let mut tasks = vec![task_id];
    tasks.extend(cancelled.descendants);
    let effects = Effects {
        wake_events: true,
        // Slots freed, steps left ready by the judged parent step.
        wake_dispatcher: true,
        dispatches: cancelled.parent.claimed,
        // Its parent task, failed by the step that started this one.
        finished: cancelled.parent.tasks,
        cancelled: tasks,
        ..Effects::default()
    };
    Ok((cancelled.steps, effects))
}

async fn cancel_transaction(
    pool: &PgPool,
    task_id: Uuid,
    reason: Option<&str>,
    lease_ms: i64,
) -> Result<transitions::Cancelled, OperatorError> {
    let mut tx = pool.begin().await?;
    let cancelled = transitions::cancel_task(&mut tx, task_id, reason, lease_ms).await?;
    tx.commit().await?;
    Ok(cancelled)
}

/// Retry a task in `error` ([`transitions::retry_task`]). Answers how many steps were
/// reset.
pub(crate) async fn retry_task(
    pool: &PgPool,
    task_id: Uuid,
    reason: Option<&str>,
) -> Result<(u64, Effects), OperatorError> {
    let reset = again_on_deadlock("retry", || async {
        let mut tx = pool.begin().await?;
        let reset = transitions::retry_task(&mut tx, task_id, reason).await?;
        tx.commit().await?;
        Ok(reset)
    })
    .await?;
    tracing::info!(%task_id, steps_reset = reset, reason = ?reason, "task retried");
    let effects = Effects {
        wake_dispatcher: true,
        wake_events: true,
        ..Effects::default()
    };
    Ok((reset, effects))
}

/// Resolve a step by hand ([`transitions::resolve_step`]); the task finishes if that was
/// all it lacked.
pub(crate) async fn resolve_step(
    pool: &PgPool,
    task_id: Uuid,
    step: &str,
    results: Option<&Value>,
    reason: Option<&str>,
    lease_ms: i64,
) -> Result<Effects, OperatorError> {
    let finished = again_on_deadlock("resolve a step", || async {
        let mut tx = pool.begin().await?;
        transitions::resolve_step(&mut tx, task_id, step, results, reason).await?;
        // The step that started the task, when it finishes a child task, is judged here.
        let finished = transitions::finish_tasks(&mut tx, &[task_id], Some(lease_ms)).await?;
        tx.commit().await?;
        Ok(finished)
    })
    .await?;
    tracing::info!(%task_id, %step, reason = ?reason, "step resolved manually");
    Ok(Effects {
        wake_dispatcher: true,
        wake_events: true,
        dispatches: finished.claimed,
        finished: finished.tasks,
        ..Effects::default()
    })
}

/// Deliver a signal to the `tasker.wait` steps of a task ([`transitions::signal`]); the
/// task finishes if that was its last step. Answers what was delivered.
pub(crate) async fn signal(
    pool: &PgPool,
    task_id: Uuid,
    signal: &str,
    payload: &Value,
    lease_ms: i64,
) -> Result<(transitions::Signalled, Effects), OperatorError> {
    let (mut signalled, finished) = again_on_deadlock("signal", || async {
        let mut tx = pool.begin().await?;
        let signalled = transitions::signal(&mut tx, task_id, signal, payload, lease_ms).await?;
        let finished =
            transitions::finish_tasks(&mut tx, &signalled.may_finish, Some(lease_ms)).await?;
        tx.commit().await?;
        Ok((signalled, finished))
    })
    .await?;
    signalled.claimed.extend(finished.claimed);
    // A finished task of a limited template may let a waiting one start.
    signalled.more_ready |= finished.more_ready || finished.tasks.iter().any(|task| task.limited);
    let finished = finished.tasks;
    tracing::info!(%task_id, %signal, steps = signalled.steps.len(),
        completed = signalled.completed, "signal received");
    let effects = Effects {
        wake_dispatcher: signalled.more_ready,
        wake_events: true,
        dispatches: std::mem::take(&mut signalled.claimed),
        finished,
        ..Effects::default()
    };
    Ok((signalled, effects))
}

/// Close a task in `error` by hand ([`transitions::resolve_task`]).
pub(crate) async fn resolve_task(
    pool: &PgPool,
    task_id: Uuid,
    reason: Option<&str>,
) -> Result<Effects, OperatorError> {
    again_on_deadlock("resolve a task", || async {
        let mut tx = pool.begin().await?;
        transitions::resolve_task(&mut tx, task_id, reason).await?;
        tx.commit().await?;
        Ok(())
    })
    .await?;
    tracing::info!(%task_id, reason = ?reason, "task resolved manually");
    Ok(Effects {
        wake_events: true,
        ..Effects::default()
    })
}

/// A bulk operator action.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BulkAction {
    /// Cancel each task.
    Cancel,
    /// Retry each task.
    Retry,
}

/// One bulk batch: each task through the single-task transition, in one transaction
/// (again when the database broke a deadlock by failing it: a result batch may lock the
/// same tasks in another order). A task its guard refuses (finished, or no longer in
/// `error`, since it was matched), that is no longer in one of the filter's `statuses`
/// (a `pending` task that started since), or that is gone is skipped. Answers the tasks
/// changed, in id order.
pub(crate) async fn bulk_batch(
    pool: &PgPool,
    ids: &[Uuid],
    (action, statuses): (BulkAction, &[TaskStatus]),
    reason: Option<&str>,
    lease_ms: i64,
) -> Result<(Vec<Uuid>, Effects), OperatorError> {
    let (changed, descendants, parents) = again_on_deadlock("bulk batch", || {
        bulk_transaction(pool, ids, (action, statuses), reason, lease_ms)
    })
    .await?;
    let effects = Effects {
        wake_events: true,
        wake_dispatcher: true,
        dispatches: parents.claimed,
        finished: parents.tasks,
        cancelled: match action {
            BulkAction::Cancel => changed.iter().chain(&descendants).copied().collect(),
            BulkAction::Retry => Vec::new(),
        },
        ..Effects::default()
    };
    Ok((changed, effects))
}

async fn bulk_transaction(
    pool: &PgPool,
    ids: &[Uuid],
    (action, statuses): (BulkAction, &[TaskStatus]),
    reason: Option<&str>,
    lease_ms: i64,
) -> Result<(Vec<Uuid>, Vec<Uuid>, transitions::Finished), OperatorError> {
    let mut tx = pool.begin().await?;
    let mut changed = Vec::with_capacity(ids.len());
    // Child tasks cancelled with their parents, and what the steps that started
    // cancelled child tasks made ready when judged, and the parent tasks that finished.
    let (mut descendants, mut parents) = (Vec::new(), transitions::Finished::default());
    // The batch's tasks, locked in one statement and in id order, as every path locks
    // tasks, with their status now: matched before this batch, a task may have left the
    // filter's statuses since (a `pending` one started), or be gone.
    let locked: Vec<(Uuid, TaskStatus)> = sqlx::query_as(
        "SELECT task_id, status FROM tasks WHERE task_id = ANY($1) ORDER BY task_id FOR UPDATE",
    )
    .bind(ids)
    .fetch_all(&mut *tx)
    .await?;
    for (task_id, status) in locked {
        if !statuses.is_empty() && !statuses.contains(&status) {
            continue;
        }
        let outcome = match action {
            BulkAction::Cancel => transitions::cancel_task(&mut tx, task_id, reason, lease_ms)
                .await
                .map(|cancelled| {
                    descendants.extend(cancelled.descendants);
                    parents.claimed.extend(cancelled.parent.claimed);
                    parents.tasks.extend(cancelled.parent.tasks);
                }),
            BulkAction::Retry => transitions::retry_task(&mut tx, task_id, reason)
                .await
                .map(|_| ()),
        };
        match outcome {
            Ok(()) => changed.push(task_id),
            Err(OperatorError::Conflict(_) | OperatorError::TaskNotFound(_)) => {}
            Err(error) => return Err(error),
        }
    }
    tx.commit().await?;
    Ok((changed, descendants, parents))
}
