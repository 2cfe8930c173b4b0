//! Decides the outcome of one step: runs its handler under the step's timeout, turning a
//! panic or a timeout into a retryable failure, and builds the result message. It never
//! touches the broker: the runtime publishes what it decides.
//!
//! While the handler runs, the step is in the worker's [`InFlight`] registry: heartbeats
//! keep its lease alive, and a cancel of its task aborts it.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use tasker_shared::messages::{
    Outcome, RunningStep, SCHEMA_VERSION, StepError as WireError, StepMessage, StepResult,
};
use tokio::task::AbortHandle;
use tracing::Instrument;
use uuid::Uuid;

use crate::handler::{StepContext, StepError, StepHandler};

/// The steps this worker is running, and the tasks it has heard were cancelled. A std
/// Mutex: held only to insert, remove or read, never across an await.
#[derive(Clone, Default)]
pub(crate) struct InFlight {
    steps: Arc<Mutex<HashMap<Uuid, Running>>>,
    cancelled: Arc<Mutex<RecentlyCancelled>>,
}

/// The last [`RecentlyCancelled::CAPACITY`] cancelled tasks, oldest first out.
#[derive(Default)]
struct RecentlyCancelled {
    order: VecDeque<Uuid>,
    set: HashSet<Uuid>,
}

impl RecentlyCancelled {
    const CAPACITY: usize = 10_000;

    fn insert(&mut self, task_id: Uuid) {
        if !self.set.insert(task_id) {
            return;
        }
        self.order.push_back(task_id);
        if self.order.len() > Self::CAPACITY
            && let Some(oldest) = self.order.pop_front()
        {
            self.set.remove(&oldest);
        }
    }
}

struct Running {
    task_id: Uuid,
    dispatch_token: Uuid,
    abort: AbortHandle,
}

impl InFlight {
    fn insert(&self, message: &StepMessage, abort: AbortHandle) {
        self.lock().insert(
            message.step_id,
            Running {
                task_id: message.task_id,
                dispatch_token: message.dispatch_token,
                abort,
            },
        );
    }

    fn remove(&self, step_id: Uuid) {
        self.lock().remove(&step_id);
    }

    /// Every running step, for a heartbeat.
    pub(crate) fn running(&self) -> Vec<RunningStep> {
        self.lock()
            .iter()
            .map(|(step_id, running)| RunningStep {
                step_id: *step_id,
                dispatch_token: running.dispatch_token,
            })
            .collect()
    }

    /// Whether `task_id` was cancelled (as far as this worker heard).
    pub(crate) fn is_cancelled(&self, task_id: Uuid) -> bool {
        self.cancelled
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .set
            .contains(&task_id)
    }

    /// Remember `task_id` as cancelled and abort its running steps; returns how many were
    /// running.
    pub(crate) fn cancel_task(&self, task_id: Uuid) -> usize {
        self.cancelled
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(task_id);
        let steps = self.lock();
        let mut aborted = 0;
        for running in steps.values().filter(|r| r.task_id == task_id) {
            running.abort.abort();
            aborted += 1;
        }
        aborted
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, Running>> {
        self.steps
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Run `handler` for `message` and decide the result; `None` when the run was aborted
/// because its task was cancelled (nothing to report: the coordinator ignores it anyway).
pub(crate) async fn execute(
    handler: Arc<dyn StepHandler>,
    message: &StepMessage,
    worker_id: &str,
    inflight: &InFlight,
) -> Option<StepResult> {
    let timeout = Duration::from_millis(u64::try_from(message.timeout_ms).unwrap_or(0).max(1));
    let context = StepContext {
        task_id: message.task_id,
        step_id: message.step_id,
        step_name: message.step_name.clone(),
        namespace: message.namespace.clone(),
        template: message.template.clone(),
        handler: message.handler.clone(),
        config: message.config.clone(),
        context: message.context.clone(),
        parents: message.parents.clone(),
        attempt: message.attempt,
        retry_limit: message.retry_limit,
        deferrals: message.deferrals,
        timeout,
    };
    let started_at = Utc::now();
    // A task of its own, so a panic is caught as a JoinError instead of unwinding here,
    // and so a cancel can abort it.
    // In the step's span, so the handler's own log lines carry the step's ids.
    let mut run = tokio::spawn(async move { handler.call(&context).await }.in_current_span());
    inflight.insert(message, run.abort_handle());
    let outcome = match tokio::time::timeout(timeout, &mut run).await {
        Ok(Ok(outcome)) => outcome,
        Ok(Err(join_error)) if join_error.is_cancelled() => {
            inflight.remove(message.step_id);
            tracing::info!("aborted: the task was cancelled");
            return None;
        }
        Ok(Err(join_error)) => Err(StepError::retryable(format!(
            "handler panicked: {}",
            panic_message(join_error)
        ))
        .with_code("panic")),
        Err(_) => {
            run.abort();
            Err(StepError::retryable(format!(
                "handler did not finish within timeout_ms = {}",
                message.timeout_ms
            ))
            .with_code("timeout"))
        }
    };
    inflight.remove(message.step_id);
    let finished_at = Utc::now();
    let (outcome, results, error) = match outcome {
        Ok(results) => (Outcome::Success, Some(results), None),
        Err(StepError::Retryable {
            message,
            code,
            retry_after,
        }) => (
            Outcome::RetryableError,
            None,
            Some(WireError {
                message,
                code,
                retry_after_seconds: retry_after.map(|d| d.as_secs_f64()),
            }),
        ),
        Err(StepError::Permanent { message, code }) => (
            Outcome::PermanentError,
            None,
            Some(WireError {
                message,
                code,
                retry_after_seconds: None,
            }),
        ),
        Err(StepError::Deferred { message, after }) => (
            Outcome::Deferred,
            None,
            Some(WireError {
                message,
                code: None,
                retry_after_seconds: Some(after.as_secs_f64()),
            }),
        ),
    };
    Some(StepResult {
        schema_version: SCHEMA_VERSION,
        task_id: message.task_id,
        step_id: message.step_id,
        dispatch_token: message.dispatch_token,
        outcome,
        results,
        error,
        started_at,
        finished_at,
        worker_id: worker_id.to_owned(),
    })
}

fn panic_message(error: tokio::task::JoinError) -> String {
    if !error.is_panic() {
        return error.to_string();
    }
    let payload = error.into_panic();
    if let Some(text) = payload.downcast_ref::<&str>() {
        (*text).to_owned()
    } else if let Some(text) = payload.downcast_ref::<String>() {
        text.clone()
    } else {
        "a non-string panic payload".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_most_recent_cancels_are_remembered() {
        let mut cancelled = RecentlyCancelled::default();
        let first = Uuid::new_v4();
        cancelled.insert(first);
        cancelled.insert(first);
        assert_eq!(
            cancelled.order.len(),
            1,
            "a repeated cancel is remembered once"
        );
        for _ in 0..RecentlyCancelled::CAPACITY {
            cancelled.insert(Uuid::new_v4());
        }
        assert_eq!(cancelled.set.len(), RecentlyCancelled::CAPACITY);
        assert!(!cancelled.set.contains(&first), "the oldest was forgotten");
    }
}
