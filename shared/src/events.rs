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

/// Which lifecycle events the relay publishes (`TASKER_EVENTS`): `true` (every one, the
/// default), `false` (none: the relay is off), or routing-key patterns separated by commas
/// (`task.*,step.failed`), matched as a topic exchange matches them: `*` is one word,
/// `#` any number. Events that no pattern matches are not published; the relay's cursor
/// moves past them all the same. Patterns that match every event are `true`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventSelection {
    /// Every event.
    All,
    /// No event: the relay does not run.
    None,
    /// The events the patterns match.
    Only {
        /// The patterns, as given.
        patterns: Vec<String>,
        /// The names they match, among [`EVENT_NAMES`].
        names: Vec<&'static str>,
    },
}

impl EventSelection {
    /// Whether the relay runs (any event at all is published).
    pub fn is_on(&self) -> bool {
        !matches!(self, EventSelection::None)
    }

    /// Whether the event `name` is published.
    pub fn publishes(&self, name: &str) -> bool {
        match self {
            EventSelection::All => true,
            EventSelection::None => false,
            EventSelection::Only { names, .. } => names.contains(&name),
        }
    }

    /// The patterns, when only some events are published.
    pub fn patterns(&self) -> Option<&[String]> {
        match self {
            EventSelection::Only { patterns, .. } => Some(patterns),
            _ => None,
        }
    }

    /// The step statuses whose history rows may become a published event: the relay's
    /// read returns only those rows (every step row but claims, when all are published;
    /// none, for `task.*`), so the others are neither decoded nor named.
    pub fn step_statuses(&self) -> Vec<&'static str> {
        StepStatus::ALL
            .iter()
            .filter(|&&to| {
                TransitionReason::ALL.iter().any(|&reason| {
                    event_name(Change::Step { to }, reason).is_some_and(|name| self.publishes(name))
                })
            })
            .map(|status| status.as_str())
            .collect()
    }
}

impl std::str::FromStr for EventSelection {
    type Err = String;

    /// `true`, `false`, or patterns separated by commas; every problem is named: a
    /// malformed pattern, or one that matches no event.
    fn from_str(value: &str) -> Result<Self, String> {
        match value.trim() {
            "true" => return Ok(EventSelection::All),
            "false" => return Ok(EventSelection::None),
            _ => {}
        }
        let mut patterns = Vec::new();
        let mut problems = Vec::new();
        for pattern in value.split(',').map(str::trim) {
            let well_formed = pattern.split('.').all(|word| {
                matches!(word, "*" | "#")
                    || !word.is_empty() && word.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
            });
            if !well_formed {
                problems.push(format!(
                    "`{pattern}` is not a routing-key pattern (words of a-z and `_`, or `*` or `#`, separated by dots)"
                ));
            } else if !EVENT_NAMES.iter().any(|name| topic_matches(pattern, name)) {
                problems.push(format!("`{pattern}` matches no event"));
            } else if !patterns.iter().any(|known| known == pattern) {
                patterns.push(pattern.to_owned());
            }
        }
        if !problems.is_empty() {
            return Err(format!(
                "expected `true`, `false` or event patterns separated by commas: {} (events: {})",
                problems.join("; "),
                EVENT_NAMES.join(", ")
            ));
        }
        let names: Vec<&'static str> = EVENT_NAMES
            .iter()
            .copied()
            .filter(|name| patterns.iter().any(|pattern| topic_matches(pattern, name)))
            .collect();
        // Patterns that match every event (`#`) are no selection.
        if names.len() == EVENT_NAMES.len() {
            return Ok(EventSelection::All);
        }
        Ok(EventSelection::Only { patterns, names })
    }
}

impl std::fmt::Display for EventSelection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EventSelection::All => f.write_str("true"),
            EventSelection::None => f.write_str("false"),
            EventSelection::Only { patterns, .. } => f.write_str(&patterns.join(",")),
        }
    }
}

/// Whether a topic pattern matches `name`, as RabbitMQ's topic exchange matches a binding
/// key: words separated by dots, `*` one word, `#` zero or more.
fn topic_matches(pattern: &str, name: &str) -> bool {
    fn matches(pattern: &[&str], words: &[&str]) -> bool {
        match pattern.split_first() {
            None => words.is_empty(),
            Some((&"#", rest)) => (0..=words.len()).any(|skip| matches(rest, &words[skip..])),
            Some((&word, rest)) => words.split_first().is_some_and(|(first, others)| {
                (word == "*" || word == *first) && matches(rest, others)
            }),
        }
    }
    fn words(text: &str) -> Vec<&str> {
        text.split('.').collect()
    }
    matches(&words(pattern), &words(name))
}

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
            // The relay's read does not return these rows (`EventSelection::step_statuses`).
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
    fn event_selections_match_as_a_topic_exchange_does() {
        let only = |value: &str| -> Vec<&'static str> {
            match value.parse::<EventSelection>() {
                Ok(EventSelection::Only { names, .. }) => names,
                other => panic!("{value}: {other:?}"),
            }
        };
        assert_eq!("true".parse(), Ok(EventSelection::All));
        assert_eq!("false".parse(), Ok(EventSelection::None));
        assert_eq!(
            only("task.*"),
            EVENT_NAMES
                .iter()
                .copied()
                .filter(|n| n.starts_with("task."))
                .collect::<Vec<_>>()
        );
        assert_eq!(
            only(" step.failed , task.completed"),
            ["task.completed", "step.failed"]
        );
        assert_eq!("#".parse(), Ok(EventSelection::All));
        assert_eq!("task.*,step.#,schedule.*".parse(), Ok(EventSelection::All));
        assert_eq!(only("#.failed"), ["task.failed", "step.failed"]);
        assert_eq!(
            only("*.resolved_manually"),
            ["task.resolved_manually", "step.resolved_manually"]
        );
        assert_eq!(only("schedule.#"), ["schedule.fired", "schedule.skipped"]);
        let selection: EventSelection = "task.*,task.*,step.failed".parse().unwrap();
        assert_eq!(
            selection.patterns(),
            Some(&["task.*".to_owned(), "step.failed".to_owned()][..])
        );
        assert!(selection.publishes("step.failed") && !selection.publishes("step.completed"));
        assert_eq!(selection.to_string(), "task.*,step.failed");
        assert_eq!(selection.step_statuses(), ["error"]);
        assert_eq!(
            EventSelection::All.step_statuses(),
            [
                "in_progress",
                "complete",
                "waiting_for_retry",
                "error",
                "cancelled",
                "resolved_manually",
                "skipped"
            ]
        );
        assert!(
            "task.*"
                .parse::<EventSelection>()
                .unwrap()
                .step_statuses()
                .is_empty()
        );
        let retries: EventSelection = "step.deferred".parse().unwrap();
        assert_eq!(retries.step_statuses(), ["waiting_for_retry"]);
    }

    #[test]
    fn a_bad_event_selection_names_every_problem() {
        let error = "tsk.*,step..failed,Task.created,,step.failed"
            .parse::<EventSelection>()
            .unwrap_err();
        assert!(error.contains("`tsk.*` matches no event"), "{error}");
        assert!(
            error.contains("`step..failed` is not a routing-key pattern"),
            "{error}"
        );
        assert!(error.contains("`Task.created` is not"), "{error}");
        assert!(error.contains("`` is not"), "{error}");
        assert!(!error.contains("`step.failed`"), "{error}");
        assert!(
            error.contains("events: task.created, task.started"),
            "{error}"
        );
        // `*` is exactly one word: no event has three.
        assert!("task.*.*".parse::<EventSelection>().is_err());
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
