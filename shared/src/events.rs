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
];

/// One lifecycle event (the JSON body; the routing key is `event`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LifecycleEvent {
    /// The event name, e.g. `step.completed`.
    pub event: String,
    /// Increasing across all events: the transition's id. Consumers can use it to drop
    /// the duplicates an at-least-once relay may send.
    pub event_id: i64,
    /// When the change was recorded.
    pub occurred_at: DateTime<Utc>,
    /// The task.
    pub task_id: Uuid,
    /// Its namespace.
    pub namespace: String,
    /// Its template's name.
    pub task_name: String,
    /// Its template's version.
    pub version: String,
    /// The step, for `step.*` events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_id: Option<Uuid>,
    /// The step's name, for `step.*` events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_name: Option<String>,
    /// Status before.
    pub from_status: Option<String>,
    /// Status after.
    pub to_status: String,
    /// Why (the history's reason: `succeeded`, `retry_scheduled`, `cancelled_by_operator`…).
    pub reason: String,
    /// The history's metadata: attempt, worker_id, error_code, next_attempt_at, an
    /// operator's reason…
    pub metadata: Value,
}

/// The event a recorded transition becomes, if any (a dispatch, for one, is not an event).
pub fn event_name(
    is_step: bool,
    from: Option<&str>,
    to: &str,
    reason: &str,
) -> Option<&'static str> {
    if is_step {
        match (to, reason) {
            ("in_progress", _) => Some("step.started"),
            ("complete", _) => Some("step.completed"),
            ("error", _) => Some("step.failed"),
            ("waiting_for_retry", "deferred") => Some("step.deferred"),
            // A claimed step whose message was lost goes back to be dispatched again: it
            // never ran, so nothing happened to it worth telling.
            ("waiting_for_retry", "lease_lost") => None,
            ("waiting_for_retry", _) => Some("step.retry_scheduled"),
            ("cancelled", _) => Some("step.cancelled"),
            ("resolved_manually", _) => Some("step.resolved_manually"),
            _ => None,
        }
    } else {
        match (from, to) {
            (None, "pending") => Some("task.created"),
            (Some("pending"), "in_progress") => Some("task.started"),
            // An operator resolved a failed step by hand: the task runs on, not retried.
            (Some("error"), "in_progress") if reason == "step_resolved" => Some("task.resumed"),
            (Some("error"), "in_progress") => Some("task.retried"),
            (_, "complete") => Some("task.completed"),
            (_, "error") => Some("task.failed"),
            (_, "cancelled") => Some("task.cancelled"),
            (_, "resolved_manually") => Some("task.resolved_manually"),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resolved_step_resumes_its_task_and_a_retry_retries_it() {
        assert_eq!(
            event_name(false, Some("error"), "in_progress", "step_resolved"),
            Some("task.resumed")
        );
        assert_eq!(
            event_name(false, Some("error"), "in_progress", "retry_requested"),
            Some("task.retried")
        );
    }

    #[test]
    fn transitions_map_to_the_documented_events() {
        assert_eq!(
            event_name(true, Some("enqueued"), "waiting_for_retry", "lease_lost"),
            None
        );
        assert_eq!(
            event_name(false, None, "pending", "created"),
            Some("task.created")
        );
        assert_eq!(
            event_name(
                false,
                Some("pending"),
                "in_progress",
                "first_step_dispatched"
            ),
            Some("task.started")
        );
        assert_eq!(
            event_name(false, Some("in_progress"), "error", "blocked_by_failures"),
            Some("task.failed")
        );
        assert_eq!(
            event_name(true, Some("pending"), "enqueued", "dispatched"),
            None
        );
        assert_eq!(
            event_name(true, Some("in_progress"), "waiting_for_retry", "deferred"),
            Some("step.deferred")
        );
        assert_eq!(
            event_name(
                true,
                Some("in_progress"),
                "waiting_for_retry",
                "lease_expired"
            ),
            Some("step.retry_scheduled")
        );
        for (is_step, from, to, reason) in [
            (false, Some("in_progress"), "complete", ""),
            (false, Some("in_progress"), "cancelled", ""),
            (true, Some("enqueued"), "in_progress", ""),
            (true, Some("in_progress"), "complete", ""),
            (true, Some("in_progress"), "error", ""),
        ] {
            let name = event_name(is_step, from, to, reason).unwrap();
            assert!(EVENT_NAMES.contains(&name), "{name} is not documented");
        }
    }
}
