//! What an arriving result does to its step: the rules of `docs/design.md` ("Readiness
//! and retries") as one pure function, [`decide`]. The store reads the step, asks this,
//! and writes what it decided.

use serde_json::{Value, json};
use uuid::Uuid;

use crate::messages::{Outcome, StepResult};
use crate::states::{StepStatus, TransitionReason};

/// The longest a deferral may ask to wait: a day.
pub const MAX_DEFERRAL_MS: f64 = 86_400_000.0;

/// How a step waits between attempts.
#[derive(Debug, Clone, PartialEq)]
pub struct Backoff {
    /// The first wait; it doubles with each attempt.
    pub base_ms: i64,
    /// The longest wait, also the cap on a handler's `retry_after_seconds`.
    pub max_ms: i64,
    /// Whether waits are spread over 50–100% of their length.
    pub jitter: bool,
    /// Explicit waits per attempt (the last one repeats), instead of doubling.
    pub schedule_ms: Option<Vec<i64>>,
}

impl Backoff {
    /// How long to wait after failed attempt `attempt` (1-based). A handler's
    /// `retry_after` wins, capped by the maximum; otherwise the schedule, otherwise
    /// `min(base × 2^(attempt−1), max)`, with equal jitter when on. `jitter` is a number
    /// in `[0, 1)` that spreads the wait (a random one in production).
    pub fn delay_ms(&self, attempt: i32, retry_after_seconds: Option<f64>, jitter: f64) -> f64 {
        if let Some(seconds) = retry_after_seconds {
            return (seconds.max(0.0) * 1000.0).min(self.max_ms as f64);
        }
        if let Some(schedule) = self.schedule_ms.as_deref().filter(|s| !s.is_empty()) {
            let index = (attempt.max(1) as usize).min(schedule.len()) - 1;
            return schedule[index] as f64;
        }
        let doubled = self.base_ms as f64 * 2f64.powi((attempt - 1).clamp(0, 62));
        let spread = if self.jitter {
            0.5 + jitter.clamp(0.0, 1.0) * 0.5
        } else {
            1.0
        };
        doubled.min(self.max_ms as f64) * spread
    }
}

/// A step as a result finds it.
#[derive(Debug, Clone, PartialEq)]
pub struct StepState {
    /// Its status.
    pub status: StepStatus,
    /// The token of its current dispatch.
    pub dispatch_token: Option<Uuid>,
    /// Attempts made, the one that answers included.
    pub attempts: i32,
    /// Attempts allowed.
    pub retry_limit: i32,
    /// Whether retryable failures are retried.
    pub retryable: bool,
    /// Deferrals so far.
    pub deferrals: i32,
    /// Deferrals allowed.
    pub max_deferrals: i32,
    /// Its backoff policy.
    pub backoff: Backoff,
}

/// What a result does to its step.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Late, duplicated, or for a dispatch that is no longer current: dropped.
    Stale,
    /// The step changes.
    Apply(Change),
}

/// A step's new state after a result.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    /// `complete`, `waiting_for_retry` or `error`.
    pub to: StepStatus,
    /// The history's reason.
    pub reason: TransitionReason,
    /// When waiting for another attempt: how long, in milliseconds.
    pub delay_ms: Option<f64>,
    /// The attempts to store (a deferral gives its attempt back).
    pub attempts: i32,
    /// The deferrals to store.
    pub deferrals: i32,
    /// The step's `last_error` (none on success).
    pub last_error: Option<Value>,
}

/// Decide what `result` does to `step`:
/// - a result for another dispatch, or for a step that is no longer queued or running, is
///   stale;
/// - success completes the step;
/// - a deferral gives the attempt back and waits the handler's delay (or the base
///   backoff; at most a day), unless the step used up its `max_deferrals` (then `error`);
/// - a retryable failure (a timeout is one) waits the backoff before the next attempt,
///   unless the step is not retryable or this was its last attempt (then `error`);
/// - a permanent failure is `error`.
pub fn decide(step: &StepState, result: &StepResult, jitter: f64) -> Decision {
    let current = matches!(step.status, StepStatus::Enqueued | StepStatus::InProgress);
    if !current || step.dispatch_token != Some(result.dispatch_token) {
        return Decision::Stale;
    }
    let retry_after = result.error.as_ref().and_then(|e| e.retry_after_seconds);
    let change = |to, reason, delay_ms| Change {
        to,
        reason,
        delay_ms,
        attempts: step.attempts,
        deferrals: step.deferrals,
        last_error: last_error(result),
    };
    Decision::Apply(match result.outcome {
        Outcome::Success => Change {
            last_error: None,
            ..change(StepStatus::Complete, TransitionReason::Succeeded, None)
        },
        Outcome::Deferred if step.deferrals >= step.max_deferrals => Change {
            attempts: step.attempts - 1,
            last_error: Some(deferral_limit_error(step, result)),
            ..change(StepStatus::Error, TransitionReason::DeferralLimit, None)
        },
        Outcome::Deferred => {
            let wanted = retry_after.unwrap_or(step.backoff.base_ms as f64 / 1000.0);
            let delay = (wanted.max(0.0) * 1000.0).min(MAX_DEFERRAL_MS);
            Change {
                // The step runs again, even when a restart after a redelivery (which
                // counts an attempt) spent its last one: the claim offers a step only
                // with an attempt left.
                attempts: (step.attempts - 1).min(step.retry_limit - 1).max(0),
                deferrals: step.deferrals + 1,
                ..change(
                    StepStatus::WaitingForRetry,
                    TransitionReason::Deferred,
                    Some(delay),
                )
            }
        }
        Outcome::PermanentError => change(StepStatus::Error, TransitionReason::Failed, None),
        Outcome::RetryableError if !step.retryable => {
            change(StepStatus::Error, TransitionReason::NotRetryable, None)
        }
        Outcome::RetryableError if step.attempts >= step.retry_limit => {
            change(StepStatus::Error, TransitionReason::AttemptsExhausted, None)
        }
        Outcome::RetryableError => {
            let delay = step.backoff.delay_ms(step.attempts, retry_after, jitter);
            change(
                StepStatus::WaitingForRetry,
                TransitionReason::RetryScheduled,
                Some(delay),
            )
        }
    })
}

/// The `last_error` a failed (or deferred) result leaves on its step.
fn last_error(result: &StepResult) -> Option<Value> {
    let error = result.error.as_ref()?;
    let kind = match (result.outcome, error.code.as_deref()) {
        (Outcome::Deferred, _) => "deferred",
        (_, Some("timeout")) => "timeout",
        (Outcome::PermanentError, _) => "permanent",
        _ => "retryable",
    };
    let mut value = json!({"kind": kind, "message": error.message});
    if let Some(code) = &error.code {
        value["code"] = json!(code);
    }
    Some(value)
}

/// The `last_error` of a step that deferred once too often.
fn deferral_limit_error(step: &StepState, result: &StepResult) -> Value {
    let reason = result
        .error
        .as_ref()
        .map_or("none given", |e| e.message.as_str());
    json!({
        "kind": "deferred",
        "code": "deferral_limit",
        "message": format!(
            "deferred {} times, the step's max_deferrals; last reason: {reason}",
            step.deferrals
        ),
    })
}

#[cfg(test)]
mod tests {
    use chrono::Utc;

    use super::*;
    use crate::messages::{SCHEMA_VERSION, StepError};

    const TOKEN: Uuid = Uuid::from_u128(7);

    fn step() -> StepState {
        StepState {
            status: StepStatus::InProgress,
            dispatch_token: Some(TOKEN),
            attempts: 1,
            retry_limit: 3,
            retryable: true,
            deferrals: 0,
            max_deferrals: 2,
            backoff: Backoff {
                base_ms: 1_000,
                max_ms: 30_000,
                jitter: false,
                schedule_ms: None,
            },
        }
    }

    fn result(outcome: Outcome, error: Option<StepError>) -> StepResult {
        StepResult {
            schema_version: SCHEMA_VERSION,
            task_id: Uuid::from_u128(1),
            step_id: Uuid::from_u128(2),
            dispatch_token: TOKEN,
            outcome,
            results: (outcome == Outcome::Success).then(|| json!({"ok": true})),
            error,
            started_at: Utc::now(),
            finished_at: Utc::now(),
            worker_id: "w1".into(),
        }
    }

    fn error(code: Option<&str>, retry_after_seconds: Option<f64>) -> Option<StepError> {
        Some(StepError {
            message: "boom".into(),
            code: code.map(str::to_owned),
            retry_after_seconds,
        })
    }

    fn applied(decision: Decision) -> Change {
        match decision {
            Decision::Apply(change) => change,
            Decision::Stale => panic!("expected a change, got stale"),
        }
    }

    #[test]
    fn success_completes_from_queued_or_running() {
        for status in [StepStatus::Enqueued, StepStatus::InProgress] {
            let state = StepState { status, ..step() };
            let change = applied(decide(&state, &result(Outcome::Success, None), 0.0));
            assert_eq!(change.to, StepStatus::Complete);
            assert_eq!(change.reason, TransitionReason::Succeeded);
            assert_eq!((change.delay_ms, change.last_error), (None, None));
            assert_eq!(change.attempts, 1);
        }
    }

    #[test]
    fn results_for_another_dispatch_or_a_finished_step_are_stale() {
        let other = StepState {
            dispatch_token: Some(Uuid::from_u128(8)),
            ..step()
        };
        assert_eq!(
            decide(&other, &result(Outcome::Success, None), 0.0),
            Decision::Stale
        );
        for status in [
            StepStatus::Pending,
            StepStatus::WaitingForRetry,
            StepStatus::Complete,
            StepStatus::Error,
            StepStatus::Cancelled,
            StepStatus::ResolvedManually,
        ] {
            let state = StepState { status, ..step() };
            assert_eq!(
                decide(&state, &result(Outcome::Success, None), 0.0),
                Decision::Stale,
                "{status}"
            );
        }
    }

    #[test]
    fn a_retryable_failure_waits_the_doubling_backoff() {
        let state = StepState {
            attempts: 2,
            ..step()
        };
        let change = applied(decide(
            &state,
            &result(Outcome::RetryableError, error(None, None)),
            0.0,
        ));
        assert_eq!(change.to, StepStatus::WaitingForRetry);
        assert_eq!(change.reason, TransitionReason::RetryScheduled);
        assert_eq!(change.delay_ms, Some(2_000.0));
        assert_eq!(change.attempts, 2);
        assert_eq!(change.last_error.unwrap()["kind"], "retryable");
    }

    #[test]
    fn the_last_attempt_failing_is_an_error() {
        let state = StepState {
            attempts: 3,
            ..step()
        };
        let change = applied(decide(
            &state,
            &result(Outcome::RetryableError, error(None, None)),
            0.0,
        ));
        assert_eq!(change.to, StepStatus::Error);
        assert_eq!(change.reason, TransitionReason::AttemptsExhausted);
        assert_eq!(change.delay_ms, None);
    }

    #[test]
    fn a_step_that_is_not_retryable_fails_at_once() {
        let state = StepState {
            retryable: false,
            ..step()
        };
        let change = applied(decide(
            &state,
            &result(Outcome::RetryableError, error(None, None)),
            0.0,
        ));
        assert_eq!(change.to, StepStatus::Error);
        assert_eq!(change.reason, TransitionReason::NotRetryable);
    }

    #[test]
    fn a_permanent_failure_is_an_error_with_attempts_left() {
        let change = applied(decide(
            &step(),
            &result(Outcome::PermanentError, error(Some("bad_input"), None)),
            0.0,
        ));
        assert_eq!(change.to, StepStatus::Error);
        assert_eq!(change.reason, TransitionReason::Failed);
        let last_error = change.last_error.unwrap();
        assert_eq!(last_error["kind"], "permanent");
        assert_eq!(last_error["code"], "bad_input");
    }

    #[test]
    fn retry_after_wins_but_is_capped_by_the_maximum_backoff() {
        let asked = applied(decide(
            &step(),
            &result(Outcome::RetryableError, error(None, Some(5.0))),
            0.0,
        ));
        assert_eq!(asked.delay_ms, Some(5_000.0));
        let capped = applied(decide(
            &step(),
            &result(Outcome::RetryableError, error(None, Some(3_600.0))),
            0.0,
        ));
        assert_eq!(capped.delay_ms, Some(30_000.0));
        let negative = applied(decide(
            &step(),
            &result(Outcome::RetryableError, error(None, Some(-1.0))),
            0.0,
        ));
        assert_eq!(negative.delay_ms, Some(0.0));
    }

    #[test]
    fn a_timeout_is_retried_and_recorded_as_a_timeout() {
        let change = applied(decide(
            &step(),
            &result(Outcome::RetryableError, error(Some("timeout"), None)),
            0.0,
        ));
        assert_eq!(change.to, StepStatus::WaitingForRetry);
        assert_eq!(change.last_error.unwrap()["kind"], "timeout");
    }

    #[test]
    fn a_deferral_gives_the_attempt_back() {
        let change = applied(decide(
            &step(),
            &result(Outcome::Deferred, error(None, Some(10.0))),
            0.0,
        ));
        assert_eq!(change.to, StepStatus::WaitingForRetry);
        assert_eq!(change.reason, TransitionReason::Deferred);
        assert_eq!(change.delay_ms, Some(10_000.0));
        assert_eq!((change.attempts, change.deferrals), (0, 1));
        assert_eq!(change.last_error.unwrap()["kind"], "deferred");
    }

    #[test]
    fn a_deferral_after_a_restart_on_the_last_attempt_still_runs_again() {
        // retry_limit 1: claimed (attempt 1), redelivered and restarted (attempt 2).
        let state = StepState {
            attempts: 2,
            retry_limit: 1,
            ..step()
        };
        let change = applied(decide(&state, &result(Outcome::Deferred, None), 0.0));
        assert_eq!(change.to, StepStatus::WaitingForRetry);
        // Below the limit, so the claim offers it when its delay is over.
        assert_eq!(change.attempts, 0);
    }

    #[test]
    fn a_deferral_without_a_delay_waits_the_base_and_at_most_a_day() {
        let base = applied(decide(&step(), &result(Outcome::Deferred, None), 0.0));
        assert_eq!(base.delay_ms, Some(1_000.0));
        assert_eq!(base.last_error, None);
        let long = applied(decide(
            &step(),
            &result(Outcome::Deferred, error(None, Some(1e9))),
            0.0,
        ));
        // Deferrals are not capped by the backoff maximum, only by a day.
        assert_eq!(long.delay_ms, Some(MAX_DEFERRAL_MS));
    }

    #[test]
    fn deferring_past_the_limit_is_an_error() {
        let state = StepState {
            deferrals: 2,
            ..step()
        };
        let change = applied(decide(
            &state,
            &result(Outcome::Deferred, error(None, Some(1.0))),
            0.0,
        ));
        assert_eq!(change.to, StepStatus::Error);
        assert_eq!(change.reason, TransitionReason::DeferralLimit);
        // The deferral spent no attempt, this one included.
        assert_eq!((change.attempts, change.deferrals), (0, 2));
        let last_error = change.last_error.unwrap();
        assert_eq!(last_error["code"], "deferral_limit");
        assert_eq!(
            last_error["message"],
            "deferred 2 times, the step's max_deferrals; last reason: boom"
        );
    }

    #[test]
    fn backoff_doubles_up_to_the_maximum_and_jitter_spreads_it() {
        let backoff = step().backoff;
        let waits: Vec<f64> = (1..=7).map(|n| backoff.delay_ms(n, None, 0.0)).collect();
        assert_eq!(waits, [1e3, 2e3, 4e3, 8e3, 16e3, 30e3, 30e3]);
        assert_eq!(backoff.delay_ms(1_000, None, 0.0), 30_000.0);
        let jittered = Backoff {
            jitter: true,
            ..backoff
        };
        assert_eq!(jittered.delay_ms(2, None, 0.0), 1_000.0);
        assert_eq!(jittered.delay_ms(2, None, 0.5), 1_500.0);
        assert!(jittered.delay_ms(2, None, 0.999) < 2_000.0);
    }

    #[test]
    fn a_schedule_is_followed_and_its_last_wait_repeats() {
        let backoff = Backoff {
            schedule_ms: Some(vec![100, 500]),
            ..step().backoff
        };
        assert_eq!(backoff.delay_ms(1, None, 0.0), 100.0);
        assert_eq!(backoff.delay_ms(2, None, 0.0), 500.0);
        assert_eq!(backoff.delay_ms(5, None, 0.0), 500.0);
        assert_eq!(backoff.delay_ms(1, Some(0.2), 0.0), 200.0);
    }
}
