//! Decides the outcome of one step: runs its handler under the step's timeout, turning a
//! panic or a timeout into a retryable failure, and builds the result message. It never
//! touches the broker: the runtime publishes what it decides.
//!
//! It also keeps the result publishable and storable: a handler's result larger than the
//! worker's `TASKER_MAX_RESULT_BYTES` (serialised as JSON) becomes a permanent failure
//! with code `result_too_large`, one holding U+0000 (which PostgreSQL cannot store) a
//! permanent failure with code `result_not_storable`, and error messages are cut to
//! [`MAX_ERROR_MESSAGE_BYTES`], with any U+0000 in them or in their code replaced by
//! U+FFFD. Without that, an oversized result would fail at the broker (or bloat the
//! database and every child step's message), be handed back, and run again forever, and
//! the coordinator would dead-letter a result it cannot store.
//!
//! While the handler runs, the step is in the worker's [`InFlight`] registry: heartbeats
//! keep its lease alive, and a cancel of its task aborts it.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use serde_json::Value;
use tasker_protocol::messages::{
    MAX_JSON_DEPTH, Outcome, RunningStep, SCHEMA_VERSION, StepError as WireError, StepMessage,
    StepResult, nests_deeper_than, too_deep_problem,
};
use tokio::sync::OwnedSemaphorePermit;
use tokio::task::AbortHandle;
use tracing::Instrument;
use uuid::Uuid;

use crate::handler::{StepContext, StepError, StepHandler};

/// Default of `TASKER_MAX_RESULT_BYTES`: 1 MiB.
pub(crate) const DEFAULT_MAX_RESULT_BYTES: usize = 1024 * 1024;

/// Longest error message a result carries; longer ones are cut (on a character
/// boundary) and say so.
pub(crate) const MAX_ERROR_MESSAGE_BYTES: usize = 16 * 1024;

/// The code of the permanent failure an oversized result becomes.
pub(crate) const RESULT_TOO_LARGE: &str = "result_too_large";

/// The code of the permanent failure a result holding U+0000 becomes.
pub(crate) const RESULT_NOT_STORABLE: &str = "result_not_storable";

/// The steps this worker is running, the tasks it has heard were cancelled, and the
/// dispatches it has heard were superseded. A std Mutex: held only to insert, remove or
/// read, never across an await.
#[derive(Clone)]
pub(crate) struct InFlight {
    /// By dispatch (step id, dispatch token): a step dispatched again while its earlier
    /// dispatch still runs here is two runs, each heartbeated, superseded and removed on
    /// its own.
    steps: Arc<Mutex<HashMap<(Uuid, Uuid), Running>>>,
    cancelled: Arc<Recent<Uuid>>,
    /// (step id, dispatch token) of replaced dispatches.
    superseded: Arc<Recent<(Uuid, Uuid)>>,
    /// (step id, dispatch token) of dispatches whose result the broker confirmed.
    answered: Arc<Recent<(Uuid, Uuid)>>,
}

impl Default for InFlight {
    fn default() -> Self {
        InFlight {
            steps: Arc::default(),
            cancelled: Arc::new(Recent::new(10_000)),
            superseded: Arc::new(Recent::new(100_000)),
            answered: Arc::new(Recent::new(10_000)),
        }
    }
}

/// The last `capacity` keys inserted, oldest first out. A std Mutex: held only to insert
/// or look up, never across an await.
struct Recent<K> {
    capacity: usize,
    keys: Mutex<RecentKeys<K>>,
}

struct RecentKeys<K> {
    order: VecDeque<K>,
    set: HashSet<K>,
}

impl<K: std::hash::Hash + Eq + Copy> Recent<K> {
    fn new(capacity: usize) -> Self {
        Recent {
            capacity,
            keys: Mutex::new(RecentKeys {
                order: VecDeque::new(),
                set: HashSet::new(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RecentKeys<K>> {
        self.keys
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn insert(&self, keys: impl IntoIterator<Item = K>) {
        let mut recent = self.lock();
        for key in keys {
            if !recent.set.insert(key) {
                continue;
            }
            recent.order.push_back(key);
            if recent.order.len() > self.capacity
                && let Some(oldest) = recent.order.pop_front()
            {
                recent.set.remove(&oldest);
            }
        }
    }

    fn contains(&self, key: &K) -> bool {
        self.lock().set.contains(key)
    }
}

struct Running {
    task_id: Uuid,
    abort: AbortHandle,
}

impl InFlight {
    fn insert(&self, message: &StepMessage, abort: AbortHandle) {
        self.lock().insert(
            (message.step_id, message.dispatch_token),
            Running {
                task_id: message.task_id,
                abort,
            },
        );
    }

    /// Forget a dispatch that no longer runs here.
    pub(crate) fn remove(&self, step_id: Uuid, dispatch_token: Uuid) {
        self.lock().remove(&(step_id, dispatch_token));
    }

    /// Every running step, for a heartbeat.
    pub(crate) fn running(&self) -> Vec<RunningStep> {
        self.lock()
            .keys()
            .map(|&(step_id, dispatch_token)| RunningStep {
                step_id,
                dispatch_token,
            })
            .collect()
    }

    /// Whether `task_id` was cancelled (as far as this worker heard).
    pub(crate) fn is_cancelled(&self, task_id: Uuid) -> bool {
        self.cancelled.contains(&task_id)
    }

    /// Remember dispatches (step id, dispatch token) that were replaced by newer ones or
    /// ended by the coordinator (a task past its deadline), and abort those running here;
    /// returns how many were running.
    pub(crate) fn supersede(&self, dispatches: impl IntoIterator<Item = (Uuid, Uuid)>) -> usize {
        let dispatches: Vec<(Uuid, Uuid)> = dispatches.into_iter().collect();
        let mut aborted = 0;
        {
            let steps = self.lock();
            for dispatch in &dispatches {
                if let Some(running) = steps.get(dispatch) {
                    running.abort.abort();
                    aborted += 1;
                }
            }
        }
        self.superseded.insert(dispatches);
        aborted
    }

    /// Whether this worker runs this dispatch of `step_id` now.
    pub(crate) fn is_running(&self, step_id: Uuid, dispatch_token: Uuid) -> bool {
        self.lock().contains_key(&(step_id, dispatch_token))
    }

    /// Remember that the broker confirmed this dispatch's result.
    pub(crate) fn mark_answered(&self, step_id: Uuid, dispatch_token: Uuid) {
        self.answered.insert([(step_id, dispatch_token)]);
    }

    /// Whether this worker published this dispatch's result (lately).
    pub(crate) fn was_answered(&self, step_id: Uuid, dispatch_token: Uuid) -> bool {
        self.answered.contains(&(step_id, dispatch_token))
    }

    /// Whether this dispatch of `step_id` was replaced (as far as this worker heard).
    pub(crate) fn is_superseded(&self, step_id: Uuid, dispatch_token: Uuid) -> bool {
        self.superseded.contains(&(step_id, dispatch_token))
    }

    /// Remember `task_id` as cancelled and abort its running steps; returns how many were
    /// running.
    pub(crate) fn cancel_task(&self, task_id: Uuid) -> usize {
        self.cancelled.insert([task_id]);
        let steps = self.lock();
        let mut aborted = 0;
        for running in steps.values().filter(|r| r.task_id == task_id) {
            running.abort.abort();
            aborted += 1;
        }
        aborted
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(Uuid, Uuid), Running>> {
        self.steps
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Run `handler` for `message` in its handler `slot` and decide the result; `None` when
/// the run was aborted because its task was cancelled (nothing to report: the
/// coordinator ignores it anyway). A result over `max_result_bytes` of JSON is a
/// permanent failure (`result_too_large`), and so is one holding U+0000 or nested too
/// deep (`result_not_storable`).
///
/// The slot is freed when the handler has ended. A handler past its timeout is aborted
/// and its timeout reported at once, but one that blocks its thread (a synchronous call)
/// ends only when that call returns: its slot stays taken until then, so no more
/// handlers run at once than the worker's concurrency.
pub(crate) async fn execute(
    handler: Arc<dyn StepHandler>,
    message: &StepMessage,
    worker_id: &str,
    inflight: &InFlight,
    max_result_bytes: usize,
    slot: OwnedSemaphorePermit,
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
        item: message.item.clone(),
        index: message.index,
    };
    let started_at = Utc::now();
    // A task of its own, so a panic is caught as a JoinError instead of unwinding here,
    // and so a cancel can abort it.
    // In the step's span, so the handler's own log lines carry the step's ids.
    let mut run = tokio::spawn(async move { handler.call(&context).await }.in_current_span());
    // Handed to the aborted handler's task on a timeout, else freed once it ended.
    let mut slot = Some(slot);
    inflight.insert(message, run.abort_handle());
    let outcome = match tokio::time::timeout(timeout, &mut run).await {
        Ok(Ok(outcome)) => outcome,
        Ok(Err(join_error)) if join_error.is_cancelled() => {
            inflight.remove(message.step_id, message.dispatch_token);
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
            let slot = slot.take();
            tokio::spawn(async move {
                let _ = run.await;
                drop(slot);
            });
            Err(StepError::retryable(format!(
                "handler did not finish within timeout_ms = {}",
                message.timeout_ms
            ))
            .with_code("timeout"))
        }
    };
    drop(slot);
    Some(finish(
        message,
        worker_id,
        started_at,
        outcome,
        max_result_bytes,
    ))
}

/// The result of `message`'s run that ended with `outcome`.
fn finish(
    message: &StepMessage,
    worker_id: &str,
    started_at: chrono::DateTime<Utc>,
    outcome: Result<Value, StepError>,
    max_result_bytes: usize,
) -> StepResult {
    // Left in `inflight` until the runtime has published the result: a redelivered copy
    // of this dispatch waits for it (see the runtime's `skip_copy`).
    let finished_at = Utc::now();
    let outcome = outcome
        .and_then(check_result_depth)
        .and_then(|results| check_result_size(results, max_result_bytes))
        .and_then(check_result_storable);
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
    let error = error.map(|mut error| {
        error.message = cap_message(without_nul(error.message));
        error.code = error.code.map(without_nul);
        error
    });
    StepResult {
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
    }
}

/// The result, or the permanent failure it becomes when its JSON is over `limit` bytes.
fn check_result_size(results: Value, limit: usize) -> Result<Value, StepError> {
    let size = json_size(&results);
    if size <= limit {
        return Ok(results);
    }
    Err(StepError::permanent(format!(
        "the handler's result is {size} bytes of JSON, over this worker's limit of {limit} \
         bytes (TASKER_MAX_RESULT_BYTES); return less, or store the data elsewhere and \
         return a reference to it"
    ))
    .with_code(RESULT_TOO_LARGE))
}

/// A result nested deeper than [`MAX_JSON_DEPTH`] would make its message, and every
/// result batched with it, unreadable to the coordinator: it fails its step instead.
/// Checked first: the size's count walks the value recursively.
fn check_result_depth(results: Value) -> Result<Value, StepError> {
    if !nests_deeper_than(&results, MAX_JSON_DEPTH) {
        return Ok(results);
    }
    Err(
        StepError::permanent(format!("the handler's result {}", too_deep_problem()))
            .with_code(RESULT_NOT_STORABLE),
    )
}

/// The result, or the permanent failure it becomes when a string or key in it holds
/// U+0000, which PostgreSQL's `jsonb` cannot store.
fn check_result_storable(results: Value) -> Result<Value, StepError> {
    let pointers = tasker_protocol::messages::nul_pointers(&results, "", 5);
    if pointers.is_empty() {
        return Ok(results);
    }
    let pointers: Vec<String> = pointers
        .into_iter()
        .map(|pointer| {
            if pointer.is_empty() {
                "the top (the result is that string)".to_owned()
            } else {
                pointer
            }
        })
        .collect();
    Err(StepError::permanent(format!(
        "the handler's result holds a NUL character (U+0000), which cannot be stored, at {}",
        pointers.join(", ")
    ))
    .with_code(RESULT_NOT_STORABLE))
}

/// `text` with every U+0000 replaced by U+FFFD, so an error message can be stored.
fn without_nul(text: String) -> String {
    if text.contains('\0') {
        text.replace('\0', "\u{FFFD}")
    } else {
        text
    }
}

/// The length of `value` serialised as JSON (as the result message carries it), counted
/// without building the text.
fn json_size(value: &Value) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0 += bytes.len();
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    // Serialising a `Value` cannot fail, and writing to `Count` neither.
    let _ = serde_json::to_writer(&mut count, value);
    count.0
}

/// `message`, cut to [`MAX_ERROR_MESSAGE_BYTES`] on a character boundary.
fn cap_message(mut message: String) -> String {
    if message.len() <= MAX_ERROR_MESSAGE_BYTES {
        return message;
    }
    let total = message.len();
    let mut end = MAX_ERROR_MESSAGE_BYTES;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    message.truncate(end);
    message.push_str(&format!("… (cut: the message had {total} bytes)"));
    message
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
    use serde_json::json;

    #[test]
    fn a_result_over_the_limit_is_a_permanent_failure_naming_both_sizes() {
        let small = json!({"ok": true});
        assert_eq!(json_size(&small), small.to_string().len());
        assert_eq!(check_result_size(small.clone(), 11).unwrap(), small);

        let big = json!({"data": "x".repeat(100)});
        let size = big.to_string().len();
        assert_eq!(json_size(&big), size);
        assert!(
            check_result_size(big.clone(), size).is_ok(),
            "the limit is inclusive"
        );
        match check_result_size(big, size - 1) {
            Err(StepError::Permanent { message, code }) => {
                assert_eq!(code.as_deref(), Some(RESULT_TOO_LARGE));
                assert!(message.contains(&format!("{size} bytes")), "{message}");
                assert!(
                    message.contains(&format!("limit of {} bytes", size - 1)),
                    "{message}"
                );
                assert!(message.contains("TASKER_MAX_RESULT_BYTES"), "{message}");
            }
            other => panic!("expected a permanent failure, got {other:?}"),
        }
    }

    #[test]
    fn a_result_holding_a_nul_is_a_permanent_failure_naming_where() {
        let fine = json!({"text": "\\u0000 is text here", "list": [1, "two", {"k": null}]});
        assert_eq!(check_result_storable(fine.clone()).unwrap(), fine);
        for (results, at) in [
            (json!({"body": "a\u{0}b"}), "/body"),
            (json!({"list": [1, {"k\u{0}": true}]}), "/list/1/k\u{0}"),
            (json!("\u{0}"), "the top (the result is that string)"),
        ] {
            match check_result_storable(results) {
                Err(StepError::Permanent { message, code }) => {
                    assert_eq!(code.as_deref(), Some(RESULT_NOT_STORABLE));
                    assert!(message.contains("U+0000"), "{message}");
                    assert!(message.ends_with(&format!("at {at}")), "{message}");
                }
                other => panic!("expected a permanent failure, got {other:?}"),
            }
        }
        assert_eq!(without_nul("a\u{0}b".to_owned()), "a\u{FFFD}b");
    }

    #[test]
    fn long_error_messages_are_cut_on_a_character_boundary() {
        let short = "short".to_owned();
        assert_eq!(cap_message(short.clone()), short);
        let long = "é".repeat(MAX_ERROR_MESSAGE_BYTES);
        let cut = cap_message(long.clone());
        assert!(cut.len() < MAX_ERROR_MESSAGE_BYTES + 64);
        assert!(cut.ends_with(&format!("(cut: the message had {} bytes)", long.len())));
    }

    #[test]
    fn only_the_most_recent_keys_are_remembered() {
        let cancelled = Recent::new(100);
        let first = Uuid::new_v4();
        cancelled.insert([first, first]);
        assert_eq!(
            cancelled.lock().order.len(),
            1,
            "a repeated cancel is remembered once"
        );
        for _ in 0..100 {
            cancelled.insert([Uuid::new_v4()]);
        }
        assert_eq!(cancelled.lock().set.len(), 100);
        assert!(!cancelled.contains(&first), "the oldest was forgotten");
    }

    #[test]
    fn a_superseded_dispatch_is_known_by_step_and_token() {
        let inflight = InFlight::default();
        let (step, old, new) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        inflight.supersede([(step, old)]);
        assert!(inflight.is_superseded(step, old));
        assert!(
            !inflight.is_superseded(step, new),
            "the newer dispatch runs"
        );
    }

    #[tokio::test]
    async fn a_superseded_dispatch_that_runs_here_is_aborted() {
        let inflight = InFlight::default();
        let (step, running, other) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        let run = tokio::spawn(std::future::pending::<()>());
        inflight.lock().insert(
            (step, running),
            Running {
                task_id: Uuid::new_v4(),
                abort: run.abort_handle(),
            },
        );
        assert_eq!(inflight.supersede([(step, other)]), 0, "another dispatch");
        assert!(!run.is_finished());
        assert_eq!(inflight.supersede([(step, running)]), 1);
        assert!(run.await.unwrap_err().is_cancelled());
    }

    /// A step dispatched again while its earlier dispatch still runs here (its lease
    /// expired): two runs, each beating, superseded and forgotten on its own.
    #[tokio::test]
    async fn two_dispatches_of_one_step_are_two_runs() {
        let inflight = InFlight::default();
        let (task, step, old, new) = (
            Uuid::new_v4(),
            Uuid::new_v4(),
            Uuid::new_v4(),
            Uuid::new_v4(),
        );
        let mut runs = Vec::new();
        for token in [old, new] {
            let run = tokio::spawn(std::future::pending::<()>());
            let abort = run.abort_handle();
            inflight.lock().insert(
                (step, token),
                Running {
                    task_id: task,
                    abort,
                },
            );
            runs.push(run);
        }
        let mut beating: Vec<Uuid> = inflight
            .running()
            .iter()
            .map(|r| r.dispatch_token)
            .collect();
        beating.sort();
        let mut both = vec![old, new];
        both.sort();
        assert_eq!(beating, both, "the heartbeat names both dispatches");

        assert_eq!(inflight.supersede([(step, old)]), 1);
        let new_run = runs.pop().unwrap();
        assert!(runs.pop().unwrap().await.unwrap_err().is_cancelled());
        assert!(!new_run.is_finished(), "the newer run goes on");
        inflight.remove(step, old);
        assert!(
            inflight.is_running(step, new),
            "forgetting the old run keeps the new"
        );
        assert!(!inflight.is_running(step, old));
    }

    /// Blocks its thread for its duration (a synchronous call in an async handler).
    struct Blocking(Duration);

    #[async_trait::async_trait]
    impl StepHandler for Blocking {
        async fn call(&self, _: &StepContext) -> Result<Value, StepError> {
            std::thread::sleep(self.0);
            Ok(json!({}))
        }
    }

    /// A handler past its timeout is reported at once, but a blocked one keeps its slot
    /// until it has really ended: no more handlers run at once than the slots allow.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_blocked_handler_past_its_timeout_keeps_its_slot_until_it_ends() {
        let slots = Arc::new(tokio::sync::Semaphore::new(1));
        let message = StepMessage {
            schema_version: SCHEMA_VERSION,
            task_id: Uuid::new_v4(),
            step_id: Uuid::new_v4(),
            step_name: "block".into(),
            namespace: "ns".into(),
            template: "t@1".into(),
            handler: "block".into(),
            config: json!({}),
            context: json!({}),
            parents: Default::default(),
            attempt: 1,
            retry_limit: 3,
            deferrals: 0,
            dispatch_token: Uuid::new_v4(),
            timeout_ms: 50,
            dispatched_at: Utc::now(),
            item: None,
            index: None,
        };
        let slot = slots.clone().acquire_owned().await.unwrap();
        let started = std::time::Instant::now();
        let result = execute(
            Arc::new(Blocking(Duration::from_secs(3))),
            &message,
            "w",
            &InFlight::default(),
            DEFAULT_MAX_RESULT_BYTES,
            slot,
        )
        .await
        .expect("a result");
        assert_eq!(
            result.error.and_then(|e| e.code).as_deref(),
            Some("timeout")
        );
        // The timeout answered long before the handler's 3 s are over, even on a slow
        // machine: its slot is still taken.
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(slots.available_permits(), 0, "the handler still runs");
        let freed = tokio::time::timeout(Duration::from_secs(10), slots.acquire()).await;
        assert!(freed.is_ok(), "the slot comes back once the handler ends");
        assert!(started.elapsed() >= Duration::from_secs(3));
    }
}
