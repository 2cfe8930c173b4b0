//! Task and step states, and the transitions between them that Tasker allows.
//!
//! ```text
//!  step:  pending ──▶ enqueued ──▶ in_progress ──▶ complete
//!            │           │  ▲            │
//!            │  lease    │  │ backoff    ├──▶ waiting_for_retry ──▶ enqueued …
//!            │  lost     ▼  │ expired    │
//!            │     waiting_for_retry     └──▶ error (permanent, or attempts exhausted)
//!            │
//!            └─ pending | waiting_for_retry | error ──▶ resolved_manually
//!               error ──▶ pending (the task is retried: a fresh attempt budget)
//!               any non-terminal state ──▶ cancelled
//!
//!  task:  pending ──▶ in_progress ──▶ complete | error | cancelled
//!         error ──▶ in_progress (retry) | resolved_manually
//! ```
//!
//! The states are stored as text; [`std::fmt::Display`] and [`std::str::FromStr`] round-trip
//! them. The SQL in [`crate::store`] applies transitions with a guard on the current state;
//! [`StepStatus::can_transition_to`] and [`TaskStatus::can_transition_to`] are the same
//! rules in Rust, used by the API and by the tests that check every history row
//! (`shared/tests/transitions.rs`). [`TransitionReason`] names why each row was written.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Returned when a stored or supplied status name is not one Tasker knows.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown status or reason `{0}`")]
pub struct UnknownStatus(pub String);

macro_rules! status_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[serde(rename_all = "snake_case")]
        pub enum $name {
            $($(#[$vmeta])* $variant),+
        }

        impl $name {
            /// Every status, in lifecycle order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The stored name of this status.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text),+
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = UnknownStatus;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $($text => Ok($name::$variant),)+
                    other => Err(UnknownStatus(other.to_owned())),
                }
            }
        }
    };
}

status_enum! {
    /// The state of a task.
    #[derive(utoipa::ToSchema)]
    TaskStatus {
        /// Created; no step dispatched yet.
        Pending => "pending",
        /// At least one step has been dispatched.
        InProgress => "in_progress",
        /// Every step is complete or resolved manually.
        Complete => "complete",
        /// No step can make progress and at least one is in `error`.
        Error => "error",
        /// Cancelled by an operator; nothing more runs.
        Cancelled => "cancelled",
        /// An operator marked the failed task as dealt with.
        ResolvedManually => "resolved_manually",
    }
}

status_enum! {
    /// The state of a step.
    #[derive(utoipa::ToSchema)]
    StepStatus {
        /// Waiting for its parents (or never dispatched yet).
        Pending => "pending",
        /// Claimed by a coordinator and published to the broker; not yet started.
        Enqueued => "enqueued",
        /// A worker has started it.
        InProgress => "in_progress",
        /// Finished successfully; its results are visible to its dependents.
        Complete => "complete",
        /// Failed with a retryable error; runs again once its backoff expires.
        WaitingForRetry => "waiting_for_retry",
        /// Failed permanently, or ran out of attempts.
        Error => "error",
        /// Its task was cancelled before it finished.
        Cancelled => "cancelled",
        /// An operator resolved it by hand; its dependents may run.
        ResolvedManually => "resolved_manually",
        /// Not run: bypassed at creation, its `when` condition was false, or none of the
        /// parents of a `trigger: one_failed` step failed. Its
        /// dependents take it as done.
        Skipped => "skipped",
    }
}

status_enum! {
    /// Why a task or step changed state: the `reason` of its history row.
    #[derive(utoipa::ToSchema)]
    TransitionReason {
        /// Task: created (`pending`).
        Created => "created",
        /// Task: its first step was claimed (`pending` → `in_progress`).
        FirstStepDispatched => "first_step_dispatched",
        /// Task: every step is complete or resolved.
        AllStepsDone => "all_steps_done",
        /// Task: a step failed and nothing else can run.
        BlockedByFailures => "blocked_by_failures",
        /// Task: an operator cancelled it.
        CancelledByOperator => "cancelled_by_operator",
        /// Task: its template's concurrency cancelled it (`on_limit`: `cancel_newest` or
        /// `cancel_oldest`).
        CancelledByConcurrencyLimit => "cancelled_by_concurrency_limit",
        /// Step: a creation's `bypass_steps` skipped it.
        Bypassed => "bypassed",
        /// Step: its `when` condition was false; skipped.
        ConditionFalse => "condition_false",
        /// Step: its `when` condition was true; it runs.
        ConditionTrue => "condition_true",
        /// Step: its `for_each` list was evaluated, one instance per element (`pending`
        /// until they are done).
        FannedOut => "fanned_out",
        /// Step: every instance of its `for_each` is done (`complete`).
        InstancesDone => "instances_done",
        /// Step: an instance of its `for_each` failed for good (`error`).
        InstanceFailed => "instance_failed",
        /// Step: a `trigger: one_failed` step none of whose parents failed; skipped.
        TriggerNotMet => "trigger_not_met",
        /// Step (`tasker.wait`): it waits for its signal (`pending`).
        WaitingForSignal => "waiting_for_signal",
        /// Step (`tasker.wait`): its signal came (`complete`, or kept until it waits).
        SignalReceived => "signal_received",
        /// Step (`tasker.task`): it started its child task and waits for it (`pending`).
        ChildTaskStarted => "child_task_started",
        /// Step (`tasker.task`): its child task completed (`complete`, with the child's
        /// leaf results).
        ChildTaskDone => "child_task_done",
        /// Step (`tasker.task`): its child task failed and is retried, an attempt of the
        /// step (`pending`).
        ChildTaskRetried => "child_task_retried",
        /// Task: its parent task was cancelled.
        ParentCancelled => "parent_cancelled",
        /// Schedule: a fire time created its task.
        ScheduleFired => "schedule_fired",
        /// Schedule: a fire time created no task, the previous still running
        /// (`overlap: skip`).
        ScheduleSkipped => "schedule_skipped",
        /// Schedule: a fire time no coordinator ran at, which its `catch_up` does not run.
        ScheduleMissed => "schedule_missed",
        /// Schedule: a fire time whose task could not be created.
        ScheduleFailed => "schedule_failed",
        /// Task: past its deadline (`timeout` or `deadline`), ended in `error`; step: its
        /// task's deadline cancelled it.
        DeadlineExceeded => "deadline_exceeded",
        /// Task or step: an operator retried the failed task.
        RetryRequested => "retry_requested",
        /// Task: an operator resolved a failed step, and the task runs on; step: its task's
        /// deadline had cancelled it, and it runs again as its task runs on.
        StepResolved => "step_resolved",
        /// Task or step: an operator resolved it by hand.
        ResolvedByOperator => "resolved_by_operator",
        /// Step: claimed and published (`enqueued`).
        Dispatched => "dispatched",
        /// Step: a worker started it.
        Started => "started",
        /// Step: a redelivered message started a second run.
        RestartedAfterRedelivery => "restarted_after_redelivery",
        /// Step: its handler succeeded.
        Succeeded => "succeeded",
        /// Step: a retryable failure; another attempt after the backoff.
        RetryScheduled => "retry_scheduled",
        /// Step: its handler asked to run later, without spending an attempt.
        Deferred => "deferred",
        /// Step: deferred more often than its `max_deferrals`.
        DeferralLimit => "deferral_limit",
        /// Step: a retryable failure of a step that is not retried.
        NotRetryable => "not_retryable",
        /// Step: a retryable failure of its last attempt.
        AttemptsExhausted => "attempts_exhausted",
        /// Step: a permanent failure.
        Failed => "failed",
        /// Step: claimed, but its message never reached the broker.
        LeaseLost => "lease_lost",
        /// Step: no result or heartbeat within its lease.
        LeaseExpired => "lease_expired",
        /// Step: its task was cancelled.
        TaskCancelled => "task_cancelled",
    }
}

status_enum! {
    /// What a schedule does at a fire time while the task of its previous fire runs.
    #[derive(utoipa::ToSchema)]
    Overlap {
        /// Fire anyway: the tasks run side by side.
        Allow => "allow",
        /// Do not fire (`schedule.skipped`, reason `overlap`).
        Skip => "skip",
        /// Cancel the running task, then fire.
        CancelPrevious => "cancel_previous",
    }
}

status_enum! {
    /// Which fire times a schedule runs when it finds them past by more than the grace
    /// (`TASKER_SCHEDULE_GRACE_MS`): no coordinator ran at the time.
    #[derive(utoipa::ToSchema)]
    CatchUp {
        /// None of them.
        None => "none",
        /// The newest of them, once.
        Latest => "latest",
        /// Every one of them (the last 100 at most), oldest first.
        All => "all",
    }
}

impl TaskStatus {
    /// Whether nothing more happens to a task in this state without an operator.
    pub fn is_finished(self) -> bool {
        matches!(
            self,
            TaskStatus::Complete
                | TaskStatus::Error
                | TaskStatus::Cancelled
                | TaskStatus::ResolvedManually
        )
    }
}

impl TaskStatus {
    /// The task rule of `docs/design.md#task-states`; every other change is refused.
    pub fn can_transition_to(self, to: TaskStatus) -> bool {
        use TaskStatus::*;
        match (self, to) {
            (Pending, InProgress | Complete | Error | Cancelled) => true,
            (InProgress, Complete | Error | Cancelled) => true,
            // An operator retries the task, or resolves one of its steps, or closes it.
            (Error, InProgress | ResolvedManually) => true,
            _ => false,
        }
    }
}

impl StepStatus {
    /// Whether the step will not change again on its own.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            StepStatus::Complete
                | StepStatus::Error
                | StepStatus::Cancelled
                | StepStatus::ResolvedManually
                | StepStatus::Skipped
        )
    }

    /// The step rule of `docs/design.md#step-transitions`; every other change is refused.
    pub fn can_transition_to(self, to: StepStatus) -> bool {
        use StepStatus::*;
        match (self, to) {
            (Pending | WaitingForRetry, Enqueued) => true,
            (Enqueued, InProgress | WaitingForRetry) => true,
            // A result may arrive before the worker's "started" notice is applied.
            (Enqueued | InProgress, Complete | WaitingForRetry | Error) => true,
            (Pending | WaitingForRetry | Error, ResolvedManually) => true,
            // Bypassed at creation, or its condition was false.
            (Pending, Skipped) => true,
            // A step the coordinator runs ends without a worker: a fan-out gathered, a
            // child task done, a signal received; or it fails: its expression, its fan-out
            // (too large, or an instance out of attempts), its child task, its wait.
            (Pending, Complete | Error) => true,
            // An operator retries a failed task: its failed steps start over, and those
            // its deadline cancelled.
            (Error | Cancelled, Pending) => true,
            (from, Cancelled) => !from.is_terminal(),
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_round_trip_through_text() {
        for status in StepStatus::ALL {
            assert_eq!(status.as_str().parse::<StepStatus>(), Ok(*status));
        }
        for status in TaskStatus::ALL {
            assert_eq!(status.to_string().parse::<TaskStatus>(), Ok(*status));
        }
        assert!("done".parse::<StepStatus>().is_err());
    }

    #[test]
    fn finished_tasks_move_only_by_an_operator() {
        use TaskStatus::*;
        assert!(Pending.can_transition_to(InProgress));
        assert!(InProgress.can_transition_to(Error));
        assert!(Error.can_transition_to(InProgress));
        assert!(Error.can_transition_to(ResolvedManually));
        assert!(!InProgress.can_transition_to(ResolvedManually));
        for done in [Complete, Cancelled, ResolvedManually] {
            for to in TaskStatus::ALL {
                assert!(!done.can_transition_to(*to), "{done} → {to}");
            }
        }
        assert!(
            TransitionReason::ALL
                .iter()
                .all(|r| r.as_str().parse::<TransitionReason>() == Ok(*r))
        );
    }

    #[test]
    fn terminal_steps_cannot_be_cancelled_or_restarted() {
        use StepStatus::*;
        assert!(Pending.can_transition_to(Cancelled));
        assert!(InProgress.can_transition_to(Cancelled));
        assert!(!Complete.can_transition_to(Cancelled));
        assert!(!Complete.can_transition_to(Enqueued));
        assert!(!Error.can_transition_to(Enqueued));
        assert!(Error.can_transition_to(ResolvedManually));
        assert!(!InProgress.can_transition_to(ResolvedManually));
        assert!(!Pending.can_transition_to(InProgress));
    }
}
