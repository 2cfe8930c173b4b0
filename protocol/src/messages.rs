//! The message protocol between coordinators and workers (AMQP 0-9-1, JSON bodies).
//!
//! - [`StepMessage`]: coordinator → worker, on the steps exchange, routed by namespace;
//!   or a [`StepBatch`] of up to [`STEPS_PER_MESSAGE`] steps of one namespace in one
//!   message (AMQP `type` [`STEP_BATCH_TYPE`]).
//! - [`WorkerMessage`]: worker → coordinator, on the results queue: a step's
//!   [`StepResult`], a [`ResultBatch`] of several, a batch of [`StepStarted`] notices,
//!   or a heartbeat.
//! - [`ControlMessage`]: anyone → everyone, on the fanout control exchange.
//!
//! Step and worker messages carry `schema_version`; a receiver refuses versions it does
//! not know (the message goes to the dead-letter queue with the reason). Control messages
//! carry no `schema_version`: they are advisory, and a receiver ignores one it cannot
//! decode.
//!
//! Producers are exact, consumers tolerant: a producer writes exactly the fields of the
//! version it speaks, and a receiver ignores fields it does not know. So a field can be
//! added within a version (optional on input, since older producers do not send it, and
//! safe for older consumers to ignore); a new version is needed only to remove a field or
//! change its meaning. The decoders still refuse unknown `schema_version`s, unknown `type`
//! tags and unknown enum values (such as an `outcome`): adding one of those is not a
//! compatible change.
//!
//! The JSON Schemas of these messages live in `docs/schemas/`, one per message, and are
//! described in `docs/protocol.md`.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

/// The protocol version this build speaks.
pub const SCHEMA_VERSION: u32 = 1;

/// Longest worker id.
pub const MAX_WORKER_ID_LEN: usize = 128;

/// Whether `id` may name a worker (or a namespace in a worker's status): 1 to
/// [`MAX_WORKER_ID_LEN`] letters, digits, `.`, `_`, `:` and `-`. Ids are shown by
/// `/health/status` and stored in the history, so nothing else gets in.
pub fn valid_worker_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_WORKER_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

/// Whether the JSON text `json` holds U+0000 in a string or a key, which PostgreSQL's
/// `text` and `jsonb` cannot store. JSON can only write it escaped (`\u0000`: a raw
/// control character in a string is not JSON), and a backslash starts an escape of at
/// least two characters wherever it appears, so one pass over the escapes is exact.
pub fn json_holds_nul(json: &[u8]) -> bool {
    let mut rest = json;
    while let Some(at) = rest.iter().position(|&b| b == b'\\') {
        if rest[at + 1..].starts_with(b"u0000") {
            return true;
        }
        rest = rest.get(at + 2..).unwrap_or_default();
    }
    false
}

/// How many arrays and objects inside each other a JSON value Tasker stores and carries
/// may hold (a task's context, a step's config, a result): every message that carries one
/// wraps it a few levels deeper, and its readers (serde_json in the coordinator, the
/// workers and the CLI) refuse more than 128 levels. `{}` and `[1]` are one level, `1` none.
pub const MAX_JSON_DEPTH: usize = 100;

/// What is wrong with a value nested deeper than [`MAX_JSON_DEPTH`], after its name:
/// "`context` nests arrays and objects more than 100 levels deep…".
pub fn too_deep_problem() -> String {
    format!(
        "nests arrays and objects more than {MAX_JSON_DEPTH} levels deep, more than Tasker \
         carries"
    )
}

/// Whether `value` holds more than `max` arrays and objects inside each other. Iterative,
/// so no value, however deep, can exhaust the stack.
pub fn nests_deeper_than(value: &Value, max: usize) -> bool {
    let mut pending: Vec<(&Value, usize)> = vec![(value, 1)];
    while let Some((value, depth)) = pending.pop() {
        match value {
            Value::Array(_) | Value::Object(_) if depth > max => return true,
            Value::Array(items) => pending.extend(items.iter().map(|item| (item, depth + 1))),
            Value::Object(map) => pending.extend(map.values().map(|item| (item, depth + 1))),
            _ => {}
        }
    }
    false
}

/// The JSON pointers of the first `limit` strings and keys in `value` that hold U+0000
/// (which PostgreSQL's `jsonb` cannot store), each with `prefix` in front. A value
/// without any, the usual case, is walked once without building a pointer.
pub fn nul_pointers(value: &Value, prefix: &str, limit: usize) -> Vec<String> {
    if !holds_nul(value) {
        return Vec::new();
    }
    let mut found = Vec::new();
    // Iterative, so no input can exhaust the stack (parsed JSON is at most 128 deep anyway).
    let mut pending: Vec<(String, &Value)> = vec![(prefix.to_owned(), value)];
    while let Some((pointer, value)) = pending.pop() {
        if found.len() >= limit {
            break;
        }
        match value {
            Value::String(text) if text.contains('\0') => found.push(pointer),
            Value::Array(items) => pending.extend(
                items
                    .iter()
                    .enumerate()
                    .rev()
                    .map(|(index, item)| (format!("{pointer}/{index}"), item)),
            ),
            Value::Object(map) => {
                for (key, item) in map.iter().rev() {
                    let child = format!("{pointer}/{}", key.replace('~', "~0").replace('/', "~1"));
                    if key.contains('\0') {
                        found.push(child.clone());
                    }
                    pending.push((child, item));
                }
            }
            _ => {}
        }
    }
    found.truncate(limit);
    found
}

/// Whether a string or key in `value` holds U+0000.
fn holds_nul(value: &Value) -> bool {
    let mut pending = vec![value];
    while let Some(value) = pending.pop() {
        match value {
            Value::String(text) if text.contains('\0') => return true,
            Value::Array(items) => pending.extend(items),
            Value::Object(map) => {
                if map.keys().any(|key| key.contains('\0')) {
                    return true;
                }
                pending.extend(map.values());
            }
            _ => {}
        }
    }
    false
}

/// Everything a stateless worker needs to run one attempt of one step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepMessage {
    /// Always [`SCHEMA_VERSION`] when produced by this build.
    pub schema_version: u32,
    /// The task the step belongs to.
    pub task_id: Uuid,
    /// The step.
    pub step_id: Uuid,
    /// The step's name within its template.
    pub step_name: String,
    /// The task's namespace (also the routing key).
    pub namespace: String,
    /// `name@version` of the task's template.
    pub template: String,
    /// The handler to run.
    pub handler: String,
    /// The step's handler configuration from the template.
    pub config: Value,
    /// The task's context.
    pub context: Value,
    /// Results of the step's parents, by parent step name.
    pub parents: BTreeMap<String, Value>,
    /// This attempt's number, starting at 1.
    pub attempt: i32,
    /// The maximum number of attempts.
    pub retry_limit: i32,
    /// How many times the step has been deferred so far ("not now" answers, which
    /// spend no attempt).
    #[serde(default)]
    pub deferrals: i32,
    /// Fences the result: only a result carrying the step's current token is applied.
    pub dispatch_token: Uuid,
    /// How long the handler may run before the worker cancels it.
    pub timeout_ms: i64,
    /// When the coordinator claimed the step.
    pub dispatched_at: DateTime<Utc>,
    /// An instance of a `for_each` step: its element of the list.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub item: Option<Value>,
    /// An instance of a `for_each` step: its element's index in the list, from 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index: Option<i32>,
}

/// Most steps one [`StepBatch`] carries.
pub const STEPS_PER_MESSAGE: usize = 8;

/// The AMQP `type` property of a message that carries a [`StepBatch`] (a single step's
/// message has none).
pub const STEP_BATCH_TYPE: &str = "steps";

/// Steps of one namespace claimed together and sent in one message: each is what a step
/// message would carry, with its own trace context (a single step carries that in the
/// `traceparent` header). A worker runs each as it would run a step message of its own
/// and acknowledges the message once every step in it is answered.
///
/// Generic over how a step is held so that a coordinator can publish borrowed steps
/// (`StepBatch<&StepMessage>`); a worker decodes owned ones.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepBatch<S = StepMessage> {
    /// Always [`SCHEMA_VERSION`] when produced by this build.
    pub schema_version: u32,
    /// The steps, 1 to [`STEPS_PER_MESSAGE`] of them.
    pub steps: Vec<BatchedStep<S>>,
}

/// One step of a [`StepBatch`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BatchedStep<S = StepMessage> {
    /// The step, its fields inline.
    #[serde(flatten)]
    pub step: S,
    /// The W3C `traceparent` of the step's dispatch span, if it was traced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
}

/// A message a worker sends to the coordinators' results queue.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum WorkerMessage {
    /// The outcome of one attempt.
    Result(StepResult),
    /// The outcomes of several attempts, in one message.
    Results(ResultBatch),
    /// Steps the worker has started since its last notice.
    Started(StartedBatch),
    /// Steps the worker is still running: keeps their leases alive.
    Heartbeat(HeartbeatBatch),
}

/// How an attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The handler succeeded; `results` holds its output.
    Success,
    /// The handler failed and may succeed if tried again.
    RetryableError,
    /// The handler failed and trying again would not help.
    PermanentError,
    /// The handler said "not now" (rate limited, resource busy): run it again after
    /// `retry_after_seconds` without spending an attempt, up to the step's
    /// `max_deferrals`.
    Deferred,
}

/// The error half of a failed attempt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepError {
    /// What went wrong, for people.
    pub message: String,
    /// A machine-readable code, if the handler gave one (`timeout`, `panic`, `http_404`…).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    /// The handler's own idea of when to try again, in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_seconds: Option<f64>,
}

/// The result of one attempt of one step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepResult {
    /// Always [`SCHEMA_VERSION`] when produced by this build.
    pub schema_version: u32,
    /// The task the step belongs to.
    pub task_id: Uuid,
    /// The step.
    pub step_id: Uuid,
    /// The token of the dispatch this result answers.
    pub dispatch_token: Uuid,
    /// How the attempt ended.
    pub outcome: Outcome,
    /// The handler's output, on success.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub results: Option<Value>,
    /// The failure, on error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<StepError>,
    /// When the handler started.
    pub started_at: DateTime<Utc>,
    /// When the handler finished.
    pub finished_at: DateTime<Utc>,
    /// The worker that ran the attempt.
    pub worker_id: String,
}

impl StepResult {
    /// A failed attempt of `step` that no handler ran (an unknown handler, a message the
    /// broker dead-lettered, one too large to publish): `outcome` with `code` and
    /// `message`, started and finished now, by `by` (a worker id, or what stood in for
    /// one).
    pub fn not_run(
        step: &StepMessage,
        outcome: Outcome,
        code: &str,
        message: String,
        by: String,
    ) -> Self {
        let now = Utc::now();
        StepResult {
            schema_version: SCHEMA_VERSION,
            task_id: step.task_id,
            step_id: step.step_id,
            dispatch_token: step.dispatch_token,
            outcome,
            results: None,
            error: Some(StepError {
                message,
                code: Some(code.to_owned()),
                retry_after_seconds: None,
            }),
            started_at: now,
            finished_at: now,
            worker_id: by,
        }
    }
}

/// Results sent together: each is what a [`WorkerMessage::Result`] would carry, with its
/// own trace context (a single result carries that in the `traceparent` header).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResultBatch {
    /// Always [`SCHEMA_VERSION`] when produced by this build.
    pub schema_version: u32,
    /// The results.
    pub results: Vec<BatchedResult>,
}

/// One result of a [`ResultBatch`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BatchedResult {
    /// The result, its fields inline.
    #[serde(flatten)]
    pub result: StepResult,
    /// The W3C `traceparent` of the attempt's span, if it was traced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
}

/// A batch of "I have started these steps" notices from one worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StartedBatch {
    /// Always [`SCHEMA_VERSION`] when produced by this build.
    pub schema_version: u32,
    /// The worker that started the steps.
    pub worker_id: String,
    /// The steps.
    pub steps: Vec<StepStarted>,
}

/// One started step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepStarted {
    /// The step.
    pub step_id: Uuid,
    /// The token of the dispatch being run.
    pub dispatch_token: Uuid,
    /// When the handler started.
    pub started_at: DateTime<Utc>,
    /// The broker delivered this message before (the worker that had it may have died
    /// mid-step): if the step was already running, this run counts as a new attempt.
    #[serde(default)]
    pub redelivered: bool,
}

/// Steps one worker is still running.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeartbeatBatch {
    /// Always [`SCHEMA_VERSION`] when produced by this build.
    pub schema_version: u32,
    /// The worker.
    pub worker_id: String,
    /// The running steps, each with the token of the dispatch being run.
    pub steps: Vec<RunningStep>,
}

/// A step a worker is running.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunningStep {
    /// The step.
    pub step_id: Uuid,
    /// The token of the dispatch being run.
    pub dispatch_token: Uuid,
}

/// Broadcast on the control exchange; every coordinator and worker receives every one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ControlMessage {
    /// The namespaces that have templates. Workers that serve every namespace start
    /// consuming the queues of the ones they did not know.
    Namespaces {
        /// Every namespace with at least one template.
        namespaces: Vec<String>,
    },
    /// A worker has started and asks coordinators to announce the namespaces.
    Hello {
        /// The worker's id.
        worker_id: String,
    },
    /// A task was cancelled: workers abort what they run for it and report nothing.
    CancelTask {
        /// The cancelled task.
        task_id: Uuid,
    },
    /// A worker says it is alive, every heartbeat interval: coordinators list the
    /// workers seen recently in `/health/status`.
    WorkerStatus {
        /// The worker's id.
        worker_id: String,
        /// The namespaces it consumes now.
        namespaces: Vec<String>,
        /// Whether it follows every namespace (no `TASKER_NAMESPACES`).
        all_namespaces: bool,
        /// Steps it may run at once.
        concurrency: u16,
        /// Steps it runs now.
        in_flight: usize,
        /// How often it sends this message.
        interval_ms: u64,
    },
    /// These dispatches are no longer wanted: replaced by a newer dispatch of the same
    /// step (handed back because its message may have been lost), ended with their task's
    /// deadline, or reported running although their step was cancelled. Any copy of them
    /// is stale: its result would be dropped, so a worker aborts a run of one and acks a
    /// queued one without running it.
    Superseded {
        /// The replaced dispatches: each step with the token of the dispatch replaced.
        dispatches: Vec<RunningStep>,
    },
}

/// Why a message could not be used, for the dead-letter queue's `x-tasker-reason` header.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The body is not JSON of the expected shape.
    #[error("undecodable message: {0}")]
    Malformed(#[from] serde_json::Error),
    /// The message speaks a protocol version this build does not.
    #[error("unsupported schema_version {0} (this build speaks {SCHEMA_VERSION})")]
    UnsupportedVersion(u32),
    /// A batch that carries nothing.
    #[error("a steps message without steps")]
    Empty,
    /// A string or key holds U+0000: the message cannot be applied.
    #[error("holds a NUL character (U+0000), which PostgreSQL cannot store")]
    Nul,
}

impl StepMessage {
    /// Decode and check the version.
    pub fn decode(body: &[u8]) -> Result<Self, DecodeError> {
        let message: StepMessage = serde_json::from_slice(body)?;
        check_version(message.schema_version)?;
        Ok(message)
    }
}

/// The body of a [`StepBatch`] whose steps serialize (each as a [`BatchedStep`]) to
/// `steps`: what `serde_json::to_vec` of the batch writes, from steps serialized one by
/// one (so a publisher can weigh each before it chooses which go together).
pub fn step_batch_body(steps: &[Vec<u8>]) -> Vec<u8> {
    const HEAD: &[u8] = b"{\"schema_version\":";
    let version = SCHEMA_VERSION.to_string();
    let size = steps.iter().map(|s| s.len() + 1).sum::<usize>() + HEAD.len() + 16;
    let mut body = Vec::with_capacity(size);
    body.extend_from_slice(HEAD);
    body.extend_from_slice(version.as_bytes());
    body.extend_from_slice(b",\"steps\":[");
    for (i, step) in steps.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(step);
    }
    body.extend_from_slice(b"]}");
    body
}

/// The steps a message on a step queue carries: a batch's (`batch`, its AMQP `type` is
/// [`STEP_BATCH_TYPE`]), or a step message's one step.
pub fn steps_of(body: &[u8], batch: bool) -> Result<Vec<StepMessage>, DecodeError> {
    if batch {
        Ok(StepBatch::decode(body)?
            .steps
            .into_iter()
            .map(|batched| batched.step)
            .collect())
    } else {
        Ok(vec![StepMessage::decode(body)?])
    }
}

impl StepBatch {
    /// Decode and check the versions (the batch's and each step's); a batch without
    /// steps is refused.
    pub fn decode(body: &[u8]) -> Result<Self, DecodeError> {
        let batch: StepBatch = serde_json::from_slice(body)?;
        check_version(batch.schema_version)?;
        for batched in &batch.steps {
            check_version(batched.step.schema_version)?;
        }
        if batch.steps.is_empty() {
            return Err(DecodeError::Empty);
        }
        Ok(batch)
    }
}

impl WorkerMessage {
    /// Decode and check the version.
    pub fn decode(body: &[u8]) -> Result<Self, DecodeError> {
        let message: WorkerMessage = serde_json::from_slice(body)?;
        match &message {
            WorkerMessage::Result(result) => check_version(result.schema_version)?,
            WorkerMessage::Results(batch) => {
                check_version(batch.schema_version)?;
                for batched in &batch.results {
                    check_version(batched.result.schema_version)?;
                }
            }
            WorkerMessage::Started(batch) => check_version(batch.schema_version)?,
            WorkerMessage::Heartbeat(batch) => check_version(batch.schema_version)?,
        }
        // Refused here, as poison, rather than by the database inside a batch.
        if json_holds_nul(body) {
            return Err(DecodeError::Nul);
        }
        Ok(message)
    }

    /// The steps whose results the message carries (none for notices and heartbeats).
    pub fn result_steps(&self) -> Vec<Uuid> {
        match self {
            WorkerMessage::Result(result) => vec![result.step_id],
            WorkerMessage::Results(batch) => {
                batch.results.iter().map(|b| b.result.step_id).collect()
            }
            WorkerMessage::Started(_) | WorkerMessage::Heartbeat(_) => Vec::new(),
        }
    }

    /// How many steps the message is about (without listing them).
    pub fn step_count(&self) -> usize {
        match self {
            WorkerMessage::Result(_) => 1,
            WorkerMessage::Results(batch) => batch.results.len(),
            WorkerMessage::Started(batch) => batch.steps.len(),
            WorkerMessage::Heartbeat(batch) => batch.steps.len(),
        }
    }

    /// The steps the message is about.
    pub fn steps(&self) -> Vec<Uuid> {
        match self {
            WorkerMessage::Result(_) | WorkerMessage::Results(_) => self.result_steps(),
            WorkerMessage::Started(batch) => batch.steps.iter().map(|s| s.step_id).collect(),
            WorkerMessage::Heartbeat(batch) => batch.steps.iter().map(|s| s.step_id).collect(),
        }
    }
}

impl ControlMessage {
    /// Decode a control message. There is no version to check: control messages are
    /// advisory, and a receiver drops (and logs) one it cannot decode.
    pub fn decode(body: &[u8]) -> Result<Self, DecodeError> {
        Ok(serde_json::from_slice(body)?)
    }
}

fn check_version(version: u32) -> Result<(), DecodeError> {
    if version == SCHEMA_VERSION {
        Ok(())
    } else {
        Err(DecodeError::UnsupportedVersion(version))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_result_round_trips_and_carries_its_type_tag() {
        let result = WorkerMessage::Result(StepResult {
            schema_version: SCHEMA_VERSION,
            task_id: Uuid::nil(),
            step_id: Uuid::nil(),
            dispatch_token: Uuid::nil(),
            outcome: Outcome::RetryableError,
            results: None,
            error: Some(StepError {
                message: "boom".into(),
                code: None,
                retry_after_seconds: Some(2.0),
            }),
            started_at: Utc::now(),
            finished_at: Utc::now(),
            worker_id: "w1".into(),
        });
        let body = serde_json::to_vec(&result).unwrap();
        let value: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(value["type"], "result");
        assert_eq!(value["outcome"], "retryable_error");
        assert_eq!(WorkerMessage::decode(&body).unwrap(), result);
    }

    fn step(n: u128) -> StepMessage {
        StepMessage {
            schema_version: SCHEMA_VERSION,
            task_id: Uuid::from_u128(n),
            step_id: Uuid::from_u128(n + 1),
            step_name: format!("s{n}"),
            namespace: "ns".into(),
            template: "t@1".into(),
            handler: "noop".into(),
            config: json!({"k": "v"}),
            context: json!({"order": n as u64}),
            parents: BTreeMap::from([("a".to_owned(), json!({"x": 1}))]),
            attempt: 1,
            retry_limit: 3,
            deferrals: 0,
            dispatch_token: Uuid::from_u128(n + 2),
            timeout_ms: 1_000,
            dispatched_at: Utc::now(),
            item: None,
            index: None,
        }
    }

    #[test]
    fn a_step_batch_carries_each_step_inline_with_its_trace_context_and_is_written_as_serde_would()
    {
        let traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let (first, second) = (step(10), step(20));
        let borrowed = StepBatch {
            schema_version: SCHEMA_VERSION,
            steps: vec![
                BatchedStep {
                    step: &first,
                    traceparent: Some(traceparent.to_owned()),
                },
                BatchedStep {
                    step: &second,
                    traceparent: None,
                },
            ],
        };
        let body = serde_json::to_vec(&borrowed).unwrap();
        // Assembled from the steps written one by one: the same bytes.
        let one_by_one: Vec<Vec<u8>> = borrowed
            .steps
            .iter()
            .map(|s| serde_json::to_vec(s).unwrap())
            .collect();
        assert_eq!(step_batch_body(&one_by_one), body);
        // A batched step without a trace context is written as the step alone.
        assert_eq!(one_by_one[1], serde_json::to_vec(&second).unwrap());

        let value: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            value["steps"][0]["step_id"],
            Uuid::from_u128(11).to_string()
        );
        assert_eq!(value["steps"][0]["traceparent"], traceparent);
        assert!(value["steps"][1].get("traceparent").is_none());
        let decoded = StepBatch::decode(&body).unwrap();
        assert_eq!(decoded.steps[0].step, first);
        assert_eq!(decoded.steps[0].traceparent.as_deref(), Some(traceparent));
        assert_eq!(decoded.steps[1].step, second);

        let mut future = value.clone();
        future["steps"][1]["schema_version"] = json!(2);
        assert!(matches!(
            StepBatch::decode(future.to_string().as_bytes()),
            Err(DecodeError::UnsupportedVersion(2))
        ));
        let empty = json!({"schema_version": 1, "steps": []});
        assert!(matches!(
            StepBatch::decode(empty.to_string().as_bytes()),
            Err(DecodeError::Empty)
        ));
        // A single step's message is not a batch.
        assert!(StepBatch::decode(&serde_json::to_vec(&first).unwrap()).is_err());
    }

    #[test]
    fn a_result_batch_carries_each_result_inline_with_its_trace_context() {
        let result = |n: u128, traceparent: Option<&str>| BatchedResult {
            result: StepResult {
                schema_version: SCHEMA_VERSION,
                task_id: Uuid::from_u128(n),
                step_id: Uuid::from_u128(n + 1),
                dispatch_token: Uuid::from_u128(n + 2),
                outcome: Outcome::Success,
                results: Some(json!({"n": n as u64})),
                error: None,
                started_at: Utc::now(),
                finished_at: Utc::now(),
                worker_id: "w1".into(),
            },
            traceparent: traceparent.map(str::to_owned),
        };
        let batch = WorkerMessage::Results(ResultBatch {
            schema_version: SCHEMA_VERSION,
            results: vec![
                result(
                    10,
                    Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
                ),
                result(20, None),
            ],
        });
        let body = serde_json::to_vec(&batch).unwrap();
        let value: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(value["type"], "results");
        assert_eq!(
            value["results"][0]["step_id"],
            Uuid::from_u128(11).to_string()
        );
        assert_eq!(value["results"][0]["results"], json!({"n": 10}));
        assert!(value["results"][0]["traceparent"].is_string());
        assert!(value["results"][1].get("traceparent").is_none());
        assert_eq!(WorkerMessage::decode(&body).unwrap(), batch);
        assert_eq!(
            batch.result_steps(),
            vec![Uuid::from_u128(11), Uuid::from_u128(21)]
        );
        assert_eq!(batch.steps(), batch.result_steps());
        assert_eq!(batch.step_count(), 2);

        let mut future = value.clone();
        future["results"][1]["schema_version"] = json!(2);
        assert!(matches!(
            WorkerMessage::decode(future.to_string().as_bytes()),
            Err(DecodeError::UnsupportedVersion(2))
        ));
    }

    /// `levels` arrays inside each other around `1`.
    fn nested(levels: usize) -> Value {
        serde_json::from_str(&format!("{}1{}", "[".repeat(levels), "]".repeat(levels))).unwrap()
    }

    #[test]
    fn values_at_the_depth_limit_travel_in_every_message_that_carries_them() {
        let deepest = json!({"nest": nested(MAX_JSON_DEPTH - 1)});
        assert!(!nests_deeper_than(&deepest, MAX_JSON_DEPTH));
        assert!(nests_deeper_than(
            &json!({"nest": nested(MAX_JSON_DEPTH)}),
            MAX_JSON_DEPTH
        ));
        assert!(!nests_deeper_than(&json!(1), 0));
        assert!(nests_deeper_than(&json!([]), 0));
        // A value nested far past what any parser reads is judged without recursion.
        let mut huge = json!(1);
        for _ in 0..200_000 {
            huge = Value::Array(vec![huge]);
        }
        assert!(nests_deeper_than(&huge, MAX_JSON_DEPTH));
        std::mem::forget(huge); // dropping it would recurse 200,000 deep

        // As a step's config, context, parent's result and item, in a batch of steps.
        let mut deep_step = step(1);
        deep_step.config = deepest.clone();
        deep_step.context = deepest.clone();
        deep_step.parents = BTreeMap::from([("a".to_owned(), deepest.clone())]);
        deep_step.item = Some(deepest.clone());
        let batch = StepBatch {
            schema_version: SCHEMA_VERSION,
            steps: vec![BatchedStep {
                step: &deep_step,
                traceparent: None,
            }],
        };
        let decoded = StepBatch::decode(&serde_json::to_vec(&batch).unwrap()).unwrap();
        assert_eq!(decoded.steps[0].step, deep_step);
        // As a result in a batch of results.
        let result = StepResult {
            schema_version: SCHEMA_VERSION,
            task_id: Uuid::from_u128(1),
            step_id: Uuid::from_u128(2),
            dispatch_token: Uuid::from_u128(3),
            outcome: Outcome::Success,
            results: Some(deepest.clone()),
            error: None,
            started_at: Utc::now(),
            finished_at: Utc::now(),
            worker_id: "w1".into(),
        };
        let batch = WorkerMessage::Results(ResultBatch {
            schema_version: SCHEMA_VERSION,
            results: vec![BatchedResult {
                result,
                traceparent: None,
            }],
        });
        let body = serde_json::to_vec(&batch).unwrap();
        assert_eq!(WorkerMessage::decode(&body).unwrap(), batch);
        // What the API answers a task's reader with carries a step's result one level
        // deeper than a batch does (`steps[i].results`): still well within the parser's 128.
        let answer = json!({"task": {"steps": [{"results": deepest}]}});
        assert!(serde_json::from_slice::<Value>(&serde_json::to_vec(&answer).unwrap()).is_ok());
    }

    #[test]
    fn wrong_shapes_and_versions_are_refused() {
        assert!(matches!(
            WorkerMessage::decode(b"not json"),
            Err(DecodeError::Malformed(_))
        ));
        let wrong_shape = json!({"type": "result", "step_id": 7});
        assert!(WorkerMessage::decode(wrong_shape.to_string().as_bytes()).is_err());
        let future =
            json!({"type": "started", "schema_version": 99, "worker_id": "w", "steps": []});
        assert!(matches!(
            WorkerMessage::decode(future.to_string().as_bytes()),
            Err(DecodeError::UnsupportedVersion(99))
        ));
    }

    #[test]
    fn a_nul_anywhere_in_a_worker_message_is_refused_and_only_a_nul() {
        let result = |results: Value, worker_id: &str| {
            let message = json!({
                "type": "result", "schema_version": SCHEMA_VERSION,
                "task_id": Uuid::from_u128(1), "step_id": Uuid::from_u128(2),
                "dispatch_token": Uuid::from_u128(3), "outcome": "success",
                "results": results, "started_at": "2026-12-06T00:00:00Z",
                "finished_at": "2026-12-06T00:00:01Z", "worker_id": worker_id,
            });
            serde_json::to_vec(&message).unwrap()
        };
        for refused in [
            result(json!({"text": "a\u{0}b"}), "w"),
            result(json!({"key\u{0}": 1}), "w"),
            result(json!(["\\\u{0}"]), "w"),
            result(Value::Null, "w\u{0}"),
        ] {
            assert!(
                json_holds_nul(&refused),
                "{}",
                String::from_utf8_lossy(&refused)
            );
            assert!(matches!(
                WorkerMessage::decode(&refused),
                Err(DecodeError::Nul)
            ));
        }
        // A backslash written as text before `u0000` is no NUL.
        for stored in [
            result(json!({"text": "\\u0000"}), "w"),
            result(json!({"text": "\\\\u0000", "u0000": "\\"}), "w"),
            result(json!({"text": "\u{1}\n\"\\"}), "w"),
        ] {
            assert!(
                !json_holds_nul(&stored),
                "{}",
                String::from_utf8_lossy(&stored)
            );
            assert!(WorkerMessage::decode(&stored).is_ok());
        }
        let mut pointers = nul_pointers(
            &json!({"a": ["ok", "x\u{0}"], "b\u{0}": {"c/d": "\u{0}"}}),
            "",
            10,
        );
        pointers.sort();
        assert_eq!(pointers, ["/a/1", "/b\u{0}", "/b\u{0}/c~1d"]);
    }
}
