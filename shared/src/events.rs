//! Lifecycle events: what the coordinator publishes to the `<prefix>.events` topic
//! exchange, with the event name as the routing key (`task.completed`, `step.failed`…),
//! so any system can bind a queue to the keys it wants (`task.*`, `#`).
//!
//! Events are derived from the transition history (an outbox): published at least once,
//! in the order the changes were recorded, after they were committed.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::states::{StepStatus, TaskStatus, TransitionReason, UnknownStatus};

/// Every event name Tasker publishes.
pub const EVENT_NAMES: &[&str] = &[
    "task.created",
    "task.started",
    "task.completed",
    "task.failed",
    "task.cancelled",
    "task.retried",
    "task.resumed",
    "task.resolved_manually",
    "step.started",
    "step.completed",
    "step.failed",
    "step.retry_scheduled",
    "step.deferred",
    "step.cancelled",
    "step.resolved_manually",
    "step.skipped",
    "schedule.fired",
    "schedule.skipped",
];

/// One lifecycle event (the JSON body; the routing key is `event`).
///
/// Generic over how its texts and metadata are held, so that the relay publishes events
/// that borrow the rows they come from (`LifecycleEvent<&str, &RawValue>`); a consumer
/// deserializes owned ones (the defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LifecycleEvent<S = String, M = Value> {
    /// The event name, e.g. `step.completed`.
    pub event: S,
    /// Increasing across all events: the transition's id. Consumers can use it to drop
    /// the duplicates an at-least-once relay may send.
    pub event_id: i64,
    /// When the change was recorded.
    pub occurred_at: DateTime<Utc>,
    /// The task (for `schedule.*` events, the task the fire created: none when skipped).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_id: Option<Uuid>,
    /// Its namespace.
    pub namespace: S,
    /// Its template's name.
    pub task_name: S,
    /// Its template's version (for a `schedule.skipped` event, the schedule's version,
    /// empty when it follows the newest).
    pub version: S,
    /// The task's priority, 0 to 9 (events recorded before priorities existed read as 5).
    #[serde(default = "default_priority")]
    pub priority: i16,
    /// The step, for `step.*` events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_id: Option<Uuid>,
    /// The step's name, for `step.*` events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_name: Option<S>,
    /// The schedule, for `schedule.*` events (the metadata holds its `fire_at`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<S>,
    /// Status before.
    pub from_status: Option<S>,
    /// Status after.
    pub to_status: S,
    /// Why (the history's reason: `succeeded`, `retry_scheduled`, `cancelled_by_operator`…).
    pub reason: S,
    /// The history's metadata: attempt, worker_id, error_code, next_attempt_at, an
    /// operator's reason…
    pub metadata: M,
}

fn default_priority() -> i16 {
    crate::template::DEFAULT_PRIORITY
}

/// A recorded change of state, typed: a task's or a step's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// A task moved from `from` (none at creation) to `to`.
    Task {
        /// Before.
        from: Option<TaskStatus>,
        /// After.
        to: TaskStatus,
    },
    /// A step moved to `to`.
    Step {
        /// After.
        to: StepStatus,
    },
    /// A schedule reached a fire time (its reason says what it did).
    Schedule,
}

impl Change {
    /// Parse a history row's statuses: a step's when `is_step`, a task's otherwise.
    pub fn parse(is_step: bool, from: Option<&str>, to: &str) -> Result<Self, UnknownStatus> {
        Ok(if is_step {
            Change::Step { to: to.parse()? }
        } else {
            Change::Task {
                from: from.map(str::parse).transpose()?,
                to: to.parse()?,
            }
        })
    }
}

/// The event a recorded transition becomes, if any (a dispatch, for one, is not an event).
pub fn event_name(change: Change, reason: TransitionReason) -> Option<&'static str> {
    use StepStatus as S;
    use TaskStatus as T;
    use TransitionReason as R;
    match change {
        Change::Schedule => match reason {
            R::ScheduleFired => Some("schedule.fired"),
            _ => Some("schedule.skipped"),
        },
        Change::Step { to } => match (to, reason) {
            (S::InProgress, _) => Some("step.started"),
            (S::Complete, _) => Some("step.completed"),
            (S::Error, _) => Some("step.failed"),
            (S::WaitingForRetry, R::Deferred) => Some("step.deferred"),
            // A claimed step whose message was lost goes back to be dispatched again: it
            // never ran, so nothing happened to it worth telling.
            (S::WaitingForRetry, R::LeaseLost) => None,
            (S::WaitingForRetry, _) => Some("step.retry_scheduled"),
            (S::Cancelled, _) => Some("step.cancelled"),
            (S::ResolvedManually, _) => Some("step.resolved_manually"),
            (S::Skipped, _) => Some("step.skipped"),
            // The relay does not even read these rows (events/transitions_after.sql).
            (S::Pending | S::Enqueued, _) => None,
        },
        Change::Task { from, to } => match (from, to) {
            (None, T::Pending) => Some("task.created"),
            (Some(T::Pending), T::InProgress) => Some("task.started"),
            // An operator resolved a failed step by hand: the task runs on, not retried.
            (Some(T::Error), T::InProgress) if reason == R::StepResolved => Some("task.resumed"),
            (Some(T::Error), T::InProgress) => Some("task.retried"),
            (_, T::Complete) => Some("task.completed"),
            (_, T::Error) => Some("task.failed"),
            (_, T::Cancelled) => Some("task.cancelled"),
            (_, T::ResolvedManually) => Some("task.resolved_manually"),
            _ => None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(from: Option<TaskStatus>, to: TaskStatus) -> Change {
        Change::Task { from, to }
    }

    fn step(to: StepStatus) -> Change {
        Change::Step { to }
    }

    #[test]
    fn a_resolved_step_resumes_its_task_and_a_retry_retries_it() {
        let resumed = task(Some(TaskStatus::Error), TaskStatus::InProgress);
        assert_eq!(
            event_name(resumed, TransitionReason::StepResolved),
            Some("task.resumed")
        );
        assert_eq!(
            event_name(resumed, TransitionReason::RetryRequested),
            Some("task.retried")
        );
    }

    #[test]
    fn transitions_map_to_the_documented_events() {
        use StepStatus as S;
        use TaskStatus as T;
        use TransitionReason as R;
        assert_eq!(event_name(step(S::WaitingForRetry), R::LeaseLost), None);
        assert_eq!(
            event_name(task(None, T::Pending), R::Created),
            Some("task.created")
        );
        assert_eq!(
            event_name(
                task(Some(T::Pending), T::InProgress),
                R::FirstStepDispatched
            ),
            Some("task.started")
        );
        assert_eq!(
            event_name(task(Some(T::InProgress), T::Error), R::BlockedByFailures),
            Some("task.failed")
        );
        assert_eq!(
            event_name(
                task(Some(T::Error), T::ResolvedManually),
                R::ResolvedByOperator
            ),
            Some("task.resolved_manually")
        );
        assert_eq!(event_name(step(S::Enqueued), R::Dispatched), None);
        assert_eq!(
            event_name(step(S::Skipped), R::ConditionFalse),
            Some("step.skipped")
        );
        assert_eq!(event_name(step(S::Pending), R::ConditionTrue), None);
        assert_eq!(
            event_name(step(S::WaitingForRetry), R::Deferred),
            Some("step.deferred")
        );
        assert_eq!(
            event_name(step(S::WaitingForRetry), R::LeaseExpired),
            Some("step.retry_scheduled")
        );
        for (change, reason) in [
            (task(Some(T::InProgress), T::Complete), R::AllStepsDone),
            (
                task(Some(T::InProgress), T::Cancelled),
                R::CancelledByOperator,
            ),
            (step(S::InProgress), R::Started),
            (step(S::Complete), R::Succeeded),
            (step(S::Error), R::Failed),
            (step(S::Cancelled), R::TaskCancelled),
            (step(S::ResolvedManually), R::ResolvedByOperator),
        ] {
            let name = event_name(change, reason).unwrap();
            assert!(EVENT_NAMES.contains(&name), "{name} is not documented");
        }
    }

    #[test]
    fn history_rows_parse_by_kind_and_unknown_statuses_are_refused() {
        assert_eq!(
            Change::parse(true, Some("enqueued"), "in_progress"),
            Ok(step(StepStatus::InProgress))
        );
        assert_eq!(
            Change::parse(false, None, "pending"),
            Ok(task(None, TaskStatus::Pending))
        );
        assert!(Change::parse(false, Some("enqueued"), "pending").is_err());
        assert!(Change::parse(true, None, "done").is_err());
    }
}
