//! Keeps the published JSON Schemas of the wire protocol (`docs/schemas/*.schema.json`)
//! and the examples of `docs/protocol.md` true to the Rust message types.
//!
//! - Every message type, built in Rust with its optional fields present and absent,
//!   serialises to JSON that its schema accepts, and decodes back to the same value.
//! - Each schema's `required` list and `properties` are exactly the keys Rust writes
//!   (minus the `#[serde(default)]` fields, which are written but optional on input).
//! - Invalid messages are refused by the schema *and* by the Rust decoder.
//! - Unknown fields, at any level of a message, are accepted by the schema *and* by the
//!   Rust decoder, which ignores them (producers exact, consumers tolerant); no schema
//!   forbids additional properties.
//! - The known differences between schema and decoder are pinned, so the protocol
//!   document that lists them stays right.
//! - Every ` ```json ` block of `docs/protocol.md` is a valid message for both.
//!
//! Adding a message, a variant or an outcome breaks the exhaustive `match`es below at
//! compile time; adding a field breaks the struct literals. Either way: update the schema.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, TimeZone, Utc};
use jsonschema::Validator;
use serde::Serialize;
use serde_json::{Value, json};
use tasker_shared::messages::{
    BatchedResult, BatchedStep, ControlMessage, DecodeError, HeartbeatBatch, Outcome, ResultBatch,
    RunningStep, SCHEMA_VERSION, StartedBatch, StepBatch, StepError, StepMessage, StepResult,
    StepStarted, WorkerMessage, step_batch_body,
};
use uuid::Uuid;

const STEP_SCHEMA: &str = include_str!("../../docs/schemas/step.schema.json");
const STEPS_SCHEMA: &str = include_str!("../../docs/schemas/steps.schema.json");
const RESULT_SCHEMA: &str = include_str!("../../docs/schemas/result.schema.json");
const RESULTS_SCHEMA: &str = include_str!("../../docs/schemas/results.schema.json");
const STARTED_SCHEMA: &str = include_str!("../../docs/schemas/started.schema.json");
const HEARTBEAT_SCHEMA: &str = include_str!("../../docs/schemas/heartbeat.schema.json");
const CONTROL_SCHEMA: &str = include_str!("../../docs/schemas/control.schema.json");
const PROTOCOL_MD: &str = include_str!("../../docs/protocol.md");

const ALL_SCHEMAS: [(&str, &str); 7] = [
    ("step.schema.json", STEP_SCHEMA),
    ("steps.schema.json", STEPS_SCHEMA),
    ("result.schema.json", RESULT_SCHEMA),
    ("results.schema.json", RESULTS_SCHEMA),
    ("started.schema.json", STARTED_SCHEMA),
    ("heartbeat.schema.json", HEARTBEAT_SCHEMA),
    ("control.schema.json", CONTROL_SCHEMA),
];

/// The schemas of the messages that share the results queue.
const WORKER_SCHEMAS: [(&str, &str); 4] = [
    ("result.schema.json", RESULT_SCHEMA),
    ("results.schema.json", RESULTS_SCHEMA),
    ("started.schema.json", STARTED_SCHEMA),
    ("heartbeat.schema.json", HEARTBEAT_SCHEMA),
];

/// Fields that are `#[serde(default)]` without `skip_serializing_if`: always written by
/// Rust, optional on input, so not in the schema's `required` list.
const STEP_DEFAULTED: [&str; 1] = ["deferrals"];
const STARTED_ITEM_DEFAULTED: [&str; 1] = ["redelivered"];

// ---------------------------------------------------------------------------------------
// Exhaustive maps from Rust variants to schemas (a new variant fails to compile here)
// ---------------------------------------------------------------------------------------

/// The schema file of a message on the results queue, and its `type` tag.
fn worker_schema(message: &WorkerMessage) -> (&'static str, &'static str, &'static str) {
    match message {
        WorkerMessage::Result(_) => ("result.schema.json", RESULT_SCHEMA, "result"),
        WorkerMessage::Results(_) => ("results.schema.json", RESULTS_SCHEMA, "results"),
        WorkerMessage::Started(_) => ("started.schema.json", STARTED_SCHEMA, "started"),
        WorkerMessage::Heartbeat(_) => ("heartbeat.schema.json", HEARTBEAT_SCHEMA, "heartbeat"),
    }
}

/// The `$defs` entry of `control.schema.json` that describes a control message.
fn control_def(message: &ControlMessage) -> &'static str {
    match message {
        ControlMessage::Namespaces { .. } => "namespaces",
        ControlMessage::Hello { .. } => "hello",
        ControlMessage::CancelTask { .. } => "cancel_task",
        ControlMessage::WorkerStatus { .. } => "worker_status",
        ControlMessage::Superseded { .. } => "superseded",
    }
}

const OUTCOMES: [Outcome; 4] = [
    Outcome::Success,
    Outcome::RetryableError,
    Outcome::PermanentError,
    Outcome::Deferred,
];

fn outcome_name(outcome: Outcome) -> &'static str {
    match outcome {
        Outcome::Success => "success",
        Outcome::RetryableError => "retryable_error",
        Outcome::PermanentError => "permanent_error",
        Outcome::Deferred => "deferred",
    }
}

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

fn parse(text: &str) -> Value {
    serde_json::from_str(text).expect("the schema file is JSON")
}

/// A validator that asserts `format` (draft 2020-12 only annotates it by default).
fn validator(text: &str) -> Validator {
    jsonschema::options()
        .should_validate_formats(true)
        .build(&parse(text))
        .expect("the schema compiles")
}

fn errors(validator: &Validator, instance: &Value) -> Vec<String> {
    validator
        .iter_errors(instance)
        .map(|error| format!("{error} (at `{}`)", error.instance_path().as_str()))
        .collect()
}

#[track_caller]
fn assert_valid(schema: &str, name: &str, instance: &Value) {
    let problems = errors(&validator(schema), instance);
    assert!(
        problems.is_empty(),
        "{name} should accept\n{instance:#}\nbut says: {problems:#?}"
    );
}

fn to_value(message: &impl Serialize) -> Value {
    serde_json::to_value(message).expect("messages serialise")
}

fn keys(value: &Value) -> BTreeSet<String> {
    value
        .as_object()
        .expect("an object")
        .keys()
        .cloned()
        .collect()
}

fn required(schema: &Value) -> BTreeSet<String> {
    schema["required"]
        .as_array()
        .expect("a required list")
        .iter()
        .map(|v| v.as_str().expect("names").to_owned())
        .collect()
}

fn properties(schema: &Value) -> BTreeSet<String> {
    keys(&schema["properties"])
}

/// `required` is what Rust writes when every optional field is absent, less the fields
/// that are written anyway but defaulted on input; `properties` is what Rust writes when
/// every optional field is present.
#[track_caller]
fn assert_fields(schema: &Value, bare: &Value, full: &Value, defaulted: &[&str]) {
    let mut expected_required = keys(bare);
    for field in defaulted {
        assert!(expected_required.remove(*field), "{field} is not written");
    }
    assert_eq!(required(schema), expected_required, "the required list");
    assert_eq!(properties(schema), keys(full), "the properties");
}

fn id(n: u128) -> Uuid {
    Uuid::from_u128(0x0190_0000_0000_7000_8000_0000_0000_0000 | n)
}

fn at(seconds: i64, nanos: u32) -> DateTime<Utc> {
    Utc.timestamp_opt(1_760_000_000 + seconds, nanos).unwrap()
}

fn decodes_as_step(value: &Value) -> Result<StepMessage, DecodeError> {
    StepMessage::decode(value.to_string().as_bytes())
}

fn decodes_as_step_batch(value: &Value) -> Result<StepBatch, DecodeError> {
    StepBatch::decode(value.to_string().as_bytes())
}

fn decodes_as_worker_message(value: &Value) -> Result<WorkerMessage, DecodeError> {
    WorkerMessage::decode(value.to_string().as_bytes())
}

/// Control messages have no `decode`: receivers use serde_json directly.
fn decodes_as_control(value: &Value) -> Result<ControlMessage, serde_json::Error> {
    serde_json::from_slice(value.to_string().as_bytes())
}

fn without(mut value: Value, pointer: &str) -> Value {
    let (parent, key) = pointer.rsplit_once('/').unwrap();
    value
        .pointer_mut(parent)
        .and_then(Value::as_object_mut)
        .unwrap()
        .remove(key)
        .unwrap_or_else(|| panic!("no {pointer}"));
    value
}

fn with(mut value: Value, pointer: &str, new: Value) -> Value {
    let (parent, key) = pointer.rsplit_once('/').unwrap();
    value
        .pointer_mut(parent)
        .and_then(Value::as_object_mut)
        .unwrap()
        .insert(key.to_owned(), new);
    value
}

// ---------------------------------------------------------------------------------------
// Representative messages
// ---------------------------------------------------------------------------------------

fn step_message() -> StepMessage {
    StepMessage {
        schema_version: SCHEMA_VERSION,
        task_id: id(1),
        step_id: id(2),
        step_name: "charge_card".into(),
        namespace: "payments".into(),
        template: "checkout@1.2.0".into(),
        handler: "payments.charge".into(),
        config: json!({"currency": "EUR", "capture": true}),
        context: json!({"order_id": 42, "total": 19.99}),
        parents: BTreeMap::from([
            ("reserve_stock".into(), json!({"reserved": 3})),
            ("validate".into(), json!({})),
            ("resolved_by_hand".into(), Value::Null),
        ]),
        attempt: 2,
        retry_limit: 3,
        deferrals: 4,
        dispatch_token: id(3),
        timeout_ms: 30_000,
        dispatched_at: at(0, 123_456_789),
        item: None,
        index: None,
    }
}

/// An instance of a `for_each` step: its element and index.
fn instance_message() -> StepMessage {
    StepMessage {
        step_name: "load[2]".into(),
        item: Some(json!({"file": "c.csv"})),
        index: Some(2),
        ..step_message()
    }
}

/// A root step: no parents, a null context, the smallest numbers.
fn root_step_message() -> StepMessage {
    StepMessage {
        step_name: "start".into(),
        handler: "tasker.echo".into(),
        config: json!({}),
        context: Value::Null,
        parents: BTreeMap::new(),
        attempt: 1,
        retry_limit: 1,
        deferrals: 0,
        timeout_ms: 1,
        dispatched_at: at(0, 0),
        ..step_message()
    }
}

/// Every step shape.
fn step_messages() -> Vec<(&'static str, StepMessage)> {
    vec![
        ("a step with parents", step_message()),
        ("an instance of a `for_each` step", instance_message()),
        ("a root step", root_step_message()),
    ]
}

fn step_batch(steps: Vec<BatchedStep>) -> StepBatch {
    StepBatch {
        schema_version: SCHEMA_VERSION,
        steps,
    }
}

fn batched(step: StepMessage, traceparent: Option<&str>) -> BatchedStep {
    BatchedStep {
        step,
        traceparent: traceparent.map(str::to_owned),
    }
}

/// Batches of steps: every step shape, traced and not; one alone, traced and not.
fn step_batches() -> Vec<(&'static str, StepBatch)> {
    let every_shape = step_messages()
        .into_iter()
        .flat_map(|(_, step)| [(step.clone(), Some(TRACEPARENT)), (step, None)])
        .enumerate()
        .map(|(n, (step, traceparent))| {
            let step = StepMessage {
                step_id: id(100 + n as u128),
                dispatch_token: id(200 + n as u128),
                ..step
            };
            batched(step, traceparent)
        })
        .collect();
    vec![
        ("every step shape, traced and not", step_batch(every_shape)),
        (
            "one step, traced",
            step_batch(vec![batched(step_message(), Some(TRACEPARENT))]),
        ),
        (
            "one root step, not traced",
            step_batch(vec![batched(root_step_message(), None)]),
        ),
    ]
}

fn result(outcome: Outcome, results: Option<Value>, error: Option<StepError>) -> StepResult {
    StepResult {
        schema_version: SCHEMA_VERSION,
        task_id: id(1),
        step_id: id(2),
        dispatch_token: id(3),
        outcome,
        results,
        error,
        started_at: at(1, 5_000),
        finished_at: at(2, 0),
        worker_id: "worker-a-4711".into(),
    }
}

fn error(message: &str, code: Option<&str>, retry_after_seconds: Option<f64>) -> StepError {
    StepError {
        message: message.into(),
        code: code.map(Into::into),
        retry_after_seconds,
    }
}

/// Every result shape: each outcome, optional fields present and absent.
fn results() -> Vec<(&'static str, StepResult)> {
    let unknown_handler = "unknown handler `payments.charge`; this worker has: tasker.echo";
    vec![
        (
            "success with results",
            result(Outcome::Success, Some(json!({"charge_id": "ch_1"})), None),
        ),
        (
            "success with scalar results",
            result(Outcome::Success, Some(json!([1, 2, 3])), None),
        ),
        (
            "success without results",
            result(Outcome::Success, None, None),
        ),
        (
            "retryable error with code and retry_after_seconds",
            result(
                Outcome::RetryableError,
                None,
                Some(error("HTTP 503", Some("http_503"), Some(2.5))),
            ),
        ),
        (
            "retryable error, integral retry_after_seconds",
            result(
                Outcome::RetryableError,
                None,
                Some(error("rate limited", None, Some(30.0))),
            ),
        ),
        (
            "retryable error without error object",
            result(Outcome::RetryableError, None, None),
        ),
        (
            "permanent error with message only",
            result(
                Outcome::PermanentError,
                None,
                Some(error("card declined", None, None)),
            ),
        ),
        (
            "unknown handler",
            result(
                Outcome::PermanentError,
                None,
                Some(error(unknown_handler, Some("unknown_handler"), None)),
            ),
        ),
        (
            "deferred with a delay",
            result(
                Outcome::Deferred,
                None,
                Some(error("provider busy", None, Some(0.25))),
            ),
        ),
        (
            "deferred without error",
            result(Outcome::Deferred, None, None),
        ),
    ]
}

const TRACEPARENT: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

/// Batches of results: every result shape, traced and not; one alone; none.
fn result_batches() -> Vec<(&'static str, ResultBatch)> {
    let every_shape = results()
        .into_iter()
        .enumerate()
        .map(|(n, (_, result))| BatchedResult {
            result: StepResult {
                step_id: id(100 + n as u128),
                ..result
            },
            traceparent: n.is_multiple_of(2).then(|| TRACEPARENT.to_owned()),
        })
        .collect();
    let batch = |results| ResultBatch {
        schema_version: SCHEMA_VERSION,
        results,
    };
    vec![
        ("every result shape, half traced", batch(every_shape)),
        (
            "one result, not traced",
            batch(vec![BatchedResult {
                result: result(Outcome::Success, None, None),
                traceparent: None,
            }]),
        ),
        ("no results", batch(Vec::new())),
    ]
}

fn started_batches() -> Vec<(&'static str, StartedBatch)> {
    let notice = |n: u128, redelivered: bool| StepStarted {
        step_id: id(10 + n),
        dispatch_token: id(20 + n),
        started_at: at(1, 999_999_999),
        redelivered,
    };
    vec![
        (
            "two notices, one redelivered",
            StartedBatch {
                schema_version: SCHEMA_VERSION,
                worker_id: "worker-a-4711".into(),
                steps: vec![notice(1, false), notice(2, true)],
            },
        ),
        (
            "no notices",
            StartedBatch {
                schema_version: SCHEMA_VERSION,
                worker_id: "w".into(),
                steps: Vec::new(),
            },
        ),
    ]
}

fn heartbeats() -> Vec<(&'static str, HeartbeatBatch)> {
    let running = |n: u128| RunningStep {
        step_id: id(10 + n),
        dispatch_token: id(20 + n),
    };
    vec![
        (
            "two running steps",
            HeartbeatBatch {
                schema_version: SCHEMA_VERSION,
                worker_id: "worker-a-4711".into(),
                steps: vec![running(1), running(2)],
            },
        ),
        (
            "nothing running",
            HeartbeatBatch {
                schema_version: SCHEMA_VERSION,
                worker_id: "w".into(),
                steps: Vec::new(),
            },
        ),
    ]
}

fn worker_messages() -> Vec<(&'static str, WorkerMessage)> {
    let mut all: Vec<(&str, WorkerMessage)> = Vec::new();
    all.extend(
        results()
            .into_iter()
            .map(|(n, m)| (n, WorkerMessage::Result(m))),
    );
    all.extend(
        result_batches()
            .into_iter()
            .map(|(n, m)| (n, WorkerMessage::Results(m))),
    );
    all.extend(
        started_batches()
            .into_iter()
            .map(|(n, m)| (n, WorkerMessage::Started(m))),
    );
    all.extend(
        heartbeats()
            .into_iter()
            .map(|(n, m)| (n, WorkerMessage::Heartbeat(m))),
    );
    all
}

fn control_messages() -> Vec<(&'static str, ControlMessage)> {
    vec![
        (
            "namespaces",
            ControlMessage::Namespaces {
                namespaces: vec!["payments".into(), "shipping".into()],
            },
        ),
        (
            "no namespaces",
            ControlMessage::Namespaces {
                namespaces: Vec::new(),
            },
        ),
        (
            "hello",
            ControlMessage::Hello {
                worker_id: "worker-a-4711".into(),
            },
        ),
        ("cancel task", ControlMessage::CancelTask { task_id: id(1) }),
        (
            "worker status",
            ControlMessage::WorkerStatus {
                worker_id: "worker-a-4711".into(),
                namespaces: vec!["payments".into()],
                all_namespaces: false,
                concurrency: 16,
                in_flight: 3,
                interval_ms: 10_000,
            },
        ),
        (
            "superseded",
            ControlMessage::Superseded {
                dispatches: vec![RunningStep {
                    step_id: id(2),
                    dispatch_token: id(3),
                }],
            },
        ),
    ]
}

// ---------------------------------------------------------------------------------------
// The schema files themselves
// ---------------------------------------------------------------------------------------

/// Every `properties` entry in `value` (recursively) that has no description.
fn undescribed_properties(value: &Value, path: &str, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            if let Some(Value::Object(props)) = map.get("properties") {
                for (name, property) in props {
                    if property
                        .get("description")
                        .and_then(Value::as_str)
                        .is_none()
                    {
                        out.push(format!("{path}/properties/{name}"));
                    }
                }
            }
            for (key, child) in map {
                undescribed_properties(child, &format!("{path}/{key}"), out);
            }
        }
        Value::Array(items) => {
            for (i, child) in items.iter().enumerate() {
                undescribed_properties(child, &format!("{path}/{i}"), out);
            }
        }
        _ => {}
    }
}

#[test]
fn the_schemas_are_draft_2020_12_with_ids_titles_and_described_properties() {
    for (file, text) in ALL_SCHEMAS {
        let schema = parse(text);
        if let Err(error) = jsonschema::meta::validate(&schema) {
            panic!("{file} is not a valid JSON Schema: {error}");
        }
        assert_eq!(
            schema["$schema"], "https://json-schema.org/draft/2020-12/schema",
            "{file}"
        );
        assert_eq!(
            schema["$id"],
            format!("https://tasker.dev/schemas/{file}"),
            "{file}"
        );
        assert!(schema["title"].is_string(), "{file} has no title");
        assert!(
            schema["description"].is_string(),
            "{file} has no description"
        );
        let mut missing = Vec::new();
        undescribed_properties(&schema, "#", &mut missing);
        assert!(
            missing.is_empty(),
            "{file}: properties without a description: {missing:?}"
        );
        validator(text);
    }
}

/// Every place in `value` (recursively) that forbids properties it does not list.
fn closed_objects(value: &Value, path: &str, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for keyword in ["additionalProperties", "unevaluatedProperties"] {
                if map.get(keyword) == Some(&Value::Bool(false)) {
                    out.push(format!("{path}/{keyword}"));
                }
            }
            for (key, child) in map {
                closed_objects(child, &format!("{path}/{key}"), out);
            }
        }
        Value::Array(items) => {
            for (i, child) in items.iter().enumerate() {
                closed_objects(child, &format!("{path}/{i}"), out);
            }
        }
        _ => {}
    }
}

/// Producers exact, consumers tolerant: no schema refuses a property it does not know,
/// and each says so.
#[test]
fn no_schema_forbids_additional_properties() {
    for (file, text) in ALL_SCHEMAS {
        let schema = parse(text);
        let mut closed = Vec::new();
        closed_objects(&schema, "#", &mut closed);
        assert!(
            closed.is_empty(),
            "{file} forbids additional properties at {closed:?}"
        );
        let description = schema["description"].as_str().unwrap_or_default();
        assert!(
            description.contains("Consumers must ignore properties they do not know"),
            "{file}'s description does not tell consumers to ignore unknown properties"
        );
    }
}

#[test]
fn the_outcome_enum_is_exactly_the_rust_outcomes() {
    let schema = parse(RESULT_SCHEMA);
    let listed: BTreeSet<&str> = schema["properties"]["outcome"]["enum"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    let rust: BTreeSet<&str> = OUTCOMES.into_iter().map(outcome_name).collect();
    assert_eq!(listed, rust);
    for outcome in OUTCOMES {
        assert_eq!(to_value(&outcome), outcome_name(outcome));
    }
}

#[test]
fn the_control_schema_has_one_branch_per_variant() {
    let schema = parse(CONTROL_SCHEMA);
    let branches: BTreeSet<String> = schema["oneOf"]
        .as_array()
        .unwrap()
        .iter()
        .map(|branch| {
            branch["$ref"]
                .as_str()
                .unwrap()
                .trim_start_matches("#/$defs/")
                .to_owned()
        })
        .collect();
    let rust: BTreeSet<String> = control_messages()
        .iter()
        .map(|(_, message)| control_def(message).to_owned())
        .collect();
    assert_eq!(branches, rust);
}

// ---------------------------------------------------------------------------------------
// (a) What Rust writes, the schemas accept
// ---------------------------------------------------------------------------------------

#[test]
fn step_messages_validate_and_the_schema_lists_exactly_their_fields() {
    let schema = parse(STEP_SCHEMA);
    for message in [step_message(), root_step_message()] {
        let value = to_value(&message);
        assert_valid(STEP_SCHEMA, "step.schema.json", &value);
        assert_eq!(decodes_as_step(&value).unwrap(), message);
        // Every field but an instance's is always written; all but the defaulted ones
        // are required.
        assert_fields(
            &schema,
            &value,
            &to_value(&instance_message()),
            &STEP_DEFAULTED,
        );
    }
    // An instance of a `for_each` step carries its element and index as well.
    let instance = to_value(&instance_message());
    assert_valid(STEP_SCHEMA, "step.schema.json", &instance);
    assert_eq!(decodes_as_step(&instance).unwrap(), instance_message());
}

#[test]
fn step_batches_validate_and_decode() {
    for (name, batch) in step_batches() {
        let value = to_value(&batch);
        assert_valid(STEPS_SCHEMA, "steps.schema.json", &value);
        assert_eq!(decodes_as_step_batch(&value).unwrap(), batch, "{name}");
        // The coordinator writes the steps one by one, then puts them together: the same
        // bytes as serde's.
        let members: Vec<Vec<u8>> = batch
            .steps
            .iter()
            .map(|step| serde_json::to_vec(step).unwrap())
            .collect();
        let body = step_batch_body(&members);
        assert_eq!(body, serde_json::to_vec(&batch).unwrap(), "{name}");
        assert_eq!(StepBatch::decode(&body).unwrap(), batch, "{name}");
        // Each entry is its step's message, plus its trace context when it has one.
        let entries = value["steps"].as_array().unwrap();
        assert_eq!(entries.len(), batch.steps.len(), "{name}");
        for (entry, batched) in entries.iter().zip(&batch.steps) {
            let step = to_value(&batched.step);
            assert_valid(STEP_SCHEMA, "step.schema.json", &step);
            match &batched.traceparent {
                Some(traceparent) => {
                    assert_eq!(entry["traceparent"], traceparent.as_str(), "{name}");
                    assert_eq!(without(entry.clone(), "/traceparent"), step, "{name}");
                }
                None => assert_eq!(entry, &step, "{name}"),
            }
        }
    }
}

/// The two messages of a step queue are told apart by the AMQP `type` property, not by
/// the body; neither body passes for the other, nor does a message of the results queue.
#[test]
fn step_batches_and_step_messages_validate_against_their_own_schema_only() {
    for (name, batch) in step_batches() {
        let value = to_value(&batch);
        assert!(
            !validator(STEP_SCHEMA).is_valid(&value),
            "{name} also passes step.schema.json"
        );
        assert!(
            decodes_as_step(&value).is_err(),
            "{name} decodes as a step message"
        );
    }
    for (name, step) in step_messages() {
        let value = to_value(&step);
        assert!(
            !validator(STEPS_SCHEMA).is_valid(&value),
            "{name} also passes steps.schema.json"
        );
        assert!(
            decodes_as_step_batch(&value).is_err(),
            "{name} decodes as a batch of steps"
        );
    }
    for (name, message) in worker_messages() {
        let value = to_value(&message);
        assert!(
            !validator(STEPS_SCHEMA).is_valid(&value),
            "{name} passes steps.schema.json"
        );
        assert!(
            decodes_as_step_batch(&value).is_err(),
            "{name} decodes as a batch of steps"
        );
    }
}

#[test]
fn worker_messages_validate_against_their_own_schema_only() {
    for (name, message) in worker_messages() {
        let value = to_value(&message);
        let (file, schema, tag) = worker_schema(&message);
        assert_eq!(value["type"], tag, "{name}");
        assert_valid(schema, file, &value);
        for (other_file, other) in WORKER_SCHEMAS {
            if other_file != file {
                assert!(
                    !validator(other).is_valid(&value),
                    "{name} also passes {other_file}"
                );
            }
        }
        assert_eq!(
            decodes_as_worker_message(&value).unwrap(),
            message,
            "{name}"
        );
    }
}

#[test]
fn the_result_schema_lists_exactly_the_fields_rust_writes() {
    let schema = parse(RESULT_SCHEMA);
    let bare = to_value(&WorkerMessage::Result(result(Outcome::Success, None, None)));
    let full = to_value(&WorkerMessage::Result(result(
        Outcome::RetryableError,
        Some(json!({"partial": true})),
        Some(error("m", Some("c"), Some(1.0))),
    )));
    assert_valid(RESULT_SCHEMA, "result.schema.json", &full);
    assert_fields(&schema, &bare, &full, &[]);

    let error_schema = &schema["$defs"]["step_error"];
    let bare_error = to_value(&error("m", None, None));
    assert_fields(error_schema, &bare_error, &full["error"], &[]);
}

#[test]
fn the_results_schema_lists_exactly_the_fields_rust_writes() {
    let schema = parse(RESULTS_SCHEMA);
    let batch = |result, traceparent: Option<&str>| {
        to_value(&WorkerMessage::Results(ResultBatch {
            schema_version: SCHEMA_VERSION,
            results: vec![BatchedResult {
                result,
                traceparent: traceparent.map(str::to_owned),
            }],
        }))
    };
    let bare = batch(result(Outcome::Success, None, None), None);
    let full = batch(
        result(
            Outcome::RetryableError,
            Some(json!({"partial": true})),
            Some(error("m", Some("c"), Some(1.0))),
        ),
        Some(TRACEPARENT),
    );
    assert_valid(RESULTS_SCHEMA, "results.schema.json", &full);
    assert_fields(&schema, &bare, &full, &[]);
    let item = &schema["properties"]["results"]["items"];
    assert_fields(item, &bare["results"][0], &full["results"][0], &[]);
    let error_schema = &schema["$defs"]["step_error"];
    let bare_error = to_value(&error("m", None, None));
    assert_fields(error_schema, &bare_error, &full["results"][0]["error"], &[]);

    // Each entry is a result message without its type tag, plus its trace context.
    let single = to_value(&WorkerMessage::Result(result(
        Outcome::RetryableError,
        Some(json!({"partial": true})),
        Some(error("m", Some("c"), Some(1.0))),
    )));
    let entry = without(full["results"][0].clone(), "/traceparent");
    assert_eq!(without(single, "/type"), entry);
    assert_eq!(
        parse(RESULT_SCHEMA)["$defs"],
        schema["$defs"],
        "the two schemas describe `error` alike"
    );
}

#[test]
fn the_steps_schema_lists_exactly_the_fields_rust_writes() {
    let schema = parse(STEPS_SCHEMA);
    let bare = to_value(&step_batch(vec![batched(step_message(), None)]));
    let full = to_value(&step_batch(vec![batched(
        instance_message(),
        Some(TRACEPARENT),
    )]));
    assert_valid(STEPS_SCHEMA, "steps.schema.json", &full);
    assert_fields(&schema, &bare, &full, &[]);
    let item = &schema["properties"]["steps"]["items"];
    assert_fields(item, &bare["steps"][0], &full["steps"][0], &STEP_DEFAULTED);
    // Traced without the optional fields, and untraced with them.
    let traced = to_value(&step_batch(vec![batched(
        step_message(),
        Some(TRACEPARENT),
    )]));
    let mut expected = keys(&bare["steps"][0]);
    expected.insert("traceparent".to_owned());
    assert_eq!(keys(&traced["steps"][0]), expected);
    let untraced = to_value(&step_batch(vec![batched(instance_message(), None)]));
    assert_eq!(
        keys(&untraced["steps"][0]),
        keys(&to_value(&instance_message()))
    );

    // Each entry is a step message plus its trace context, described alike: the same
    // required list, and each field with the same keywords but its description.
    let entry = without(full["steps"][0].clone(), "/traceparent");
    assert_eq!(entry, to_value(&instance_message()));
    let step_schema = parse(STEP_SCHEMA);
    assert_eq!(required(item), required(&step_schema), "the required list");
    let mut expected = properties(&step_schema);
    expected.insert("traceparent".to_owned());
    assert_eq!(properties(item), expected, "the properties");
    for (field, described) in step_schema["properties"].as_object().unwrap() {
        let keywords = |property: &Value| without(property.clone(), "/description");
        assert_eq!(
            keywords(&item["properties"][field]),
            keywords(described),
            "`{field}` differs from step.schema.json's"
        );
    }
    assert_eq!(item["properties"]["traceparent"]["type"], "string");
}

#[test]
fn the_started_and_heartbeat_schemas_list_exactly_the_fields_rust_writes() {
    let schema = parse(STARTED_SCHEMA);
    let value = to_value(&WorkerMessage::Started(started_batches()[0].1.clone()));
    assert_fields(&schema, &value, &value, &[]);
    let item = &schema["properties"]["steps"]["items"];
    assert_fields(
        item,
        &value["steps"][0],
        &value["steps"][0],
        &STARTED_ITEM_DEFAULTED,
    );

    let schema = parse(HEARTBEAT_SCHEMA);
    let value = to_value(&WorkerMessage::Heartbeat(heartbeats()[0].1.clone()));
    assert_fields(&schema, &value, &value, &[]);
    let item = &schema["properties"]["steps"]["items"];
    assert_fields(item, &value["steps"][0], &value["steps"][0], &[]);
}

#[test]
fn defaulted_fields_may_be_left_out_in_both() {
    let step = without(to_value(&step_message()), "/deferrals");
    assert_valid(STEP_SCHEMA, "step.schema.json", &step);
    assert_eq!(decodes_as_step(&step).unwrap().deferrals, 0);

    let batch = without(to_value(&step_batches()[0].1), "/steps/1/deferrals");
    assert_valid(STEPS_SCHEMA, "steps.schema.json", &batch);
    let decoded = decodes_as_step_batch(&batch).unwrap();
    assert_eq!(decoded.steps[1].step.deferrals, 0);
    assert_eq!(decoded.steps[0].step.deferrals, step_message().deferrals);

    let started = without(
        to_value(&WorkerMessage::Started(started_batches()[0].1.clone())),
        "/steps/1/redelivered",
    );
    assert_valid(STARTED_SCHEMA, "started.schema.json", &started);
    let WorkerMessage::Started(batch) = decodes_as_worker_message(&started).unwrap() else {
        panic!("not a started batch");
    };
    assert!(!batch.steps[1].redelivered);
}

#[test]
fn control_messages_validate_and_the_schema_lists_exactly_their_fields() {
    let schema = parse(CONTROL_SCHEMA);
    for (name, message) in control_messages() {
        let value = to_value(&message);
        assert_valid(CONTROL_SCHEMA, "control.schema.json", &value);
        assert_eq!(decodes_as_control(&value).unwrap(), message, "{name}");
        let def = control_def(&message);
        assert_eq!(value["type"], def, "{name}");
        assert_fields(&schema["$defs"][def], &value, &value, &[]);
    }
}

// ---------------------------------------------------------------------------------------
// (b) What Rust refuses, the schemas refuse
// ---------------------------------------------------------------------------------------

#[track_caller]
fn assert_refused(schema: &str, case: &str, value: &Value, decodes: bool) {
    assert!(
        !validator(schema).is_valid(value),
        "the schema accepts {case}:\n{value:#}"
    );
    assert!(!decodes, "the Rust decoder accepts {case}:\n{value:#}");
}

#[test]
fn invalid_step_messages_are_refused_by_the_schema_and_the_decoder() {
    let good = to_value(&step_message());
    let cases = [
        (
            "no dispatch_token",
            without(good.clone(), "/dispatch_token"),
        ),
        ("no config", without(good.clone(), "/config")),
        ("no parents", without(good.clone(), "/parents")),
        (
            "schema_version 2",
            with(good.clone(), "/schema_version", json!(2)),
        ),
        (
            "a bad task_id",
            with(good.clone(), "/task_id", json!("not-a-uuid")),
        ),
        (
            "a bad dispatched_at",
            with(good.clone(), "/dispatched_at", json!("yesterday")),
        ),
        (
            "attempt as a string",
            with(good.clone(), "/attempt", json!("2")),
        ),
        (
            "deferrals as null",
            with(good.clone(), "/deferrals", Value::Null),
        ),
        (
            "parents as a list",
            with(good.clone(), "/parents", json!([])),
        ),
    ];
    for (case, value) in &cases {
        let case = format!("a step message with {case}");
        assert_refused(STEP_SCHEMA, &case, value, decodes_as_step(value).is_ok());
    }
}

#[test]
fn invalid_results_are_refused_by_the_schema_and_the_decoder() {
    let good = to_value(&WorkerMessage::Result(result(
        Outcome::RetryableError,
        None,
        Some(error("boom", Some("http_503"), Some(2.0))),
    )));
    let cases = [
        (
            "no dispatch_token",
            without(good.clone(), "/dispatch_token"),
        ),
        ("no worker_id", without(good.clone(), "/worker_id")),
        ("no finished_at", without(good.clone(), "/finished_at")),
        ("no type tag", without(good.clone(), "/type")),
        ("no error message", without(good.clone(), "/error/message")),
        (
            "outcome `failed`",
            with(good.clone(), "/outcome", json!("failed")),
        ),
        (
            "outcome `Success`",
            with(good.clone(), "/outcome", json!("Success")),
        ),
        (
            "outcome `defer`",
            with(good.clone(), "/outcome", json!("defer")),
        ),
        ("outcome null", with(good.clone(), "/outcome", Value::Null)),
        (
            "type `results`",
            with(good.clone(), "/type", json!("results")),
        ),
        (
            "schema_version 2",
            with(good.clone(), "/schema_version", json!(2)),
        ),
        (
            "a bad dispatch_token",
            with(good.clone(), "/dispatch_token", json!("0190-nope")),
        ),
        (
            "a numeric started_at",
            with(good.clone(), "/started_at", json!(1_760_000_000)),
        ),
        (
            "error as a string",
            with(good.clone(), "/error", json!("boom")),
        ),
        (
            "retry_after_seconds as a string",
            with(good.clone(), "/error/retry_after_seconds", json!("2")),
        ),
    ];
    for (case, value) in &cases {
        let case = format!("a result with {case}");
        let decodes = decodes_as_worker_message(value).is_ok();
        assert_refused(RESULT_SCHEMA, &case, value, decodes);
    }
}

#[test]
fn invalid_result_batches_are_refused_by_the_schema_and_the_decoder() {
    let good = to_value(&WorkerMessage::Results(result_batches()[0].1.clone()));
    let cases = [
        ("no results", without(good.clone(), "/results")),
        (
            "results as an object",
            with(good.clone(), "/results", json!({})),
        ),
        (
            "schema_version 2",
            with(good.clone(), "/schema_version", json!(2)),
        ),
        (
            "a result of schema_version 2",
            with(good.clone(), "/results/1/schema_version", json!(2)),
        ),
        (
            "a result without dispatch_token",
            without(good.clone(), "/results/0/dispatch_token"),
        ),
        (
            "a result without schema_version",
            without(good.clone(), "/results/2/schema_version"),
        ),
        (
            "a result with outcome `failed`",
            with(good.clone(), "/results/3/outcome", json!("failed")),
        ),
        (
            "a result with a bad step_id",
            with(good.clone(), "/results/0/step_id", json!("nope")),
        ),
        (
            "a numeric traceparent",
            with(good.clone(), "/results/0/traceparent", json!(7)),
        ),
        (
            "type `result`",
            with(good.clone(), "/type", json!("result")),
        ),
    ];
    for (case, value) in &cases {
        let case = format!("a batch of results with {case}");
        let decodes = decodes_as_worker_message(value).is_ok();
        assert_refused(RESULTS_SCHEMA, &case, value, decodes);
    }
}

#[test]
fn invalid_step_batches_are_refused_by_the_schema_and_the_decoder() {
    let good = to_value(&step_batches()[0].1);
    let cases = [
        ("no steps", without(good.clone(), "/steps")),
        (
            "steps as an object",
            with(good.clone(), "/steps", json!({})),
        ),
        ("steps as null", with(good.clone(), "/steps", Value::Null)),
        (
            "no steps in `steps`",
            with(good.clone(), "/steps", json!([])),
        ),
        (
            "no schema_version",
            without(good.clone(), "/schema_version"),
        ),
        (
            "schema_version 2",
            with(good.clone(), "/schema_version", json!(2)),
        ),
        (
            "a step of schema_version 2",
            with(good.clone(), "/steps/3/schema_version", json!(2)),
        ),
        (
            "a step without schema_version",
            without(good.clone(), "/steps/1/schema_version"),
        ),
        (
            "a step without dispatch_token",
            without(good.clone(), "/steps/0/dispatch_token"),
        ),
        (
            "a step without handler",
            without(good.clone(), "/steps/5/handler"),
        ),
        (
            "a step with a bad step_id",
            with(good.clone(), "/steps/2/step_id", json!("nope")),
        ),
        (
            "a step with attempt as a string",
            with(good.clone(), "/steps/4/attempt", json!("2")),
        ),
        (
            "a numeric traceparent",
            with(good.clone(), "/steps/0/traceparent", json!(7)),
        ),
        (
            "a step as a string",
            with(good.clone(), "/steps", json!(["{}"])),
        ),
    ];
    for (case, value) in &cases {
        let case = format!("a batch of steps with {case}");
        let decodes = decodes_as_step_batch(value).is_ok();
        assert_refused(STEPS_SCHEMA, &case, value, decodes);
    }
}

#[test]
fn invalid_started_notices_and_heartbeats_are_refused_by_the_schema_and_the_decoder() {
    let started = to_value(&WorkerMessage::Started(started_batches()[0].1.clone()));
    let heartbeat = to_value(&WorkerMessage::Heartbeat(heartbeats()[0].1.clone()));
    let cases = [
        (
            STARTED_SCHEMA,
            "a started batch without steps",
            without(started.clone(), "/steps"),
        ),
        (
            STARTED_SCHEMA,
            "a started batch without worker_id",
            without(started.clone(), "/worker_id"),
        ),
        (
            STARTED_SCHEMA,
            "a started batch of schema_version 2",
            with(started.clone(), "/schema_version", json!(2)),
        ),
        (
            STARTED_SCHEMA,
            "a notice without dispatch_token",
            without(started.clone(), "/steps/0/dispatch_token"),
        ),
        (
            STARTED_SCHEMA,
            "a notice without started_at",
            without(started.clone(), "/steps/0/started_at"),
        ),
        (
            STARTED_SCHEMA,
            "a notice with redelivered as a string",
            with(started.clone(), "/steps/0/redelivered", json!("yes")),
        ),
        (
            HEARTBEAT_SCHEMA,
            "a heartbeat without steps",
            without(heartbeat.clone(), "/steps"),
        ),
        (
            HEARTBEAT_SCHEMA,
            "a heartbeat of schema_version 2",
            with(heartbeat.clone(), "/schema_version", json!(2)),
        ),
        (
            HEARTBEAT_SCHEMA,
            "a running step without dispatch_token",
            without(heartbeat.clone(), "/steps/0/dispatch_token"),
        ),
        (
            HEARTBEAT_SCHEMA,
            "a heartbeat typed `heartbeats`",
            with(heartbeat.clone(), "/type", json!("heartbeats")),
        ),
    ];
    for (schema, case, value) in &cases {
        assert_refused(
            schema,
            case,
            value,
            decodes_as_worker_message(value).is_ok(),
        );
    }
}

#[test]
fn invalid_control_messages_are_refused_by_the_schema_and_the_decoder() {
    let cases = [
        ("a hello without worker_id", json!({"type": "hello"})),
        (
            "a control message of unknown type",
            json!({"type": "goodbye", "worker_id": "w"}),
        ),
        (
            "a control message without type",
            json!({"namespaces": ["a"]}),
        ),
        (
            "namespaces as a string",
            json!({"type": "namespaces", "namespaces": "a,b"}),
        ),
        ("a cancel without task_id", json!({"type": "cancel_task"})),
        (
            "a cancel with a bad task_id",
            json!({"type": "cancel_task", "task_id": "42"}),
        ),
    ];
    for (case, value) in &cases {
        assert_refused(
            CONTROL_SCHEMA,
            case,
            value,
            decodes_as_control(value).is_ok(),
        );
    }
}

#[test]
fn a_future_schema_version_is_refused_with_the_dead_letter_reason() {
    let step = with(to_value(&step_message()), "/schema_version", json!(2));
    let error = decodes_as_step(&step).unwrap_err();
    assert!(matches!(error, DecodeError::UnsupportedVersion(2)));
    assert_eq!(
        error.to_string(),
        "unsupported schema_version 2 (this build speaks 1)"
    );
    for (name, message) in worker_messages() {
        let value = with(to_value(&message), "/schema_version", json!(2));
        assert!(
            matches!(
                decodes_as_worker_message(&value),
                Err(DecodeError::UnsupportedVersion(2))
            ),
            "{name}"
        );
    }
    // A batch of steps, whether the batch or one of its steps speaks another version.
    let batch = to_value(&step_batches()[0].1);
    for pointer in ["/schema_version", "/steps/1/schema_version"] {
        let value = with(batch.clone(), pointer, json!(2));
        assert!(
            matches!(
                decodes_as_step_batch(&value),
                Err(DecodeError::UnsupportedVersion(2))
            ),
            "a batch of steps with {pointer} 2"
        );
    }
}

#[test]
fn a_batch_without_steps_is_refused_with_the_dead_letter_reason() {
    let empty = with(to_value(&step_batches()[1].1), "/steps", json!([]));
    assert!(!validator(STEPS_SCHEMA).is_valid(&empty));
    let error = decodes_as_step_batch(&empty).unwrap_err();
    assert!(matches!(error, DecodeError::Empty));
    assert_eq!(error.to_string(), "a steps message without steps");
}

// ---------------------------------------------------------------------------------------
// Where schema and decoder agree on leniency, and where they differ (both documented)
// ---------------------------------------------------------------------------------------

#[test]
fn null_optional_fields_read_as_absent_in_both() {
    let bare = to_value(&WorkerMessage::Result(result(Outcome::Success, None, None)));
    let nulls = with(
        with(bare.clone(), "/results", Value::Null),
        "/error",
        Value::Null,
    );
    assert_valid(RESULT_SCHEMA, "result.schema.json", &nulls);
    assert_eq!(
        decodes_as_worker_message(&nulls).unwrap(),
        decodes_as_worker_message(&bare).unwrap()
    );

    let failure = to_value(&WorkerMessage::Result(result(
        Outcome::PermanentError,
        None,
        Some(error("m", None, None)),
    )));
    let nulls = with(
        with(failure.clone(), "/error/code", Value::Null),
        "/error/retry_after_seconds",
        Value::Null,
    );
    assert_valid(RESULT_SCHEMA, "result.schema.json", &nulls);
    assert_eq!(
        decodes_as_worker_message(&nulls).unwrap(),
        decodes_as_worker_message(&failure).unwrap()
    );
}

#[test]
fn fields_may_come_in_any_order_with_the_type_tag_anywhere() {
    let text = r#"{"worker_id":"w","steps":[],"schema_version":1,"type":"heartbeat"}"#;
    let value: Value = serde_json::from_str(text).unwrap();
    assert_valid(HEARTBEAT_SCHEMA, "heartbeat.schema.json", &value);
    assert!(WorkerMessage::decode(text.as_bytes()).is_ok());
}

#[test]
fn unknown_fields_are_accepted_by_the_schema_and_ignored_by_the_decoder() {
    let step = step_message();
    let step_value = to_value(&step);
    let step_cases = [
        (
            "an unknown field",
            with(step_value.clone(), "/priority", json!(5)),
        ),
        (
            "an unknown object field",
            with(
                step_value.clone(),
                "/trace",
                json!({"id": "abc", "sampled": true}),
            ),
        ),
        (
            "an unknown null field",
            with(step_value.clone(), "/region", Value::Null),
        ),
        (
            "a type tag (step messages have none)",
            with(step_value.clone(), "/type", json!("step")),
        ),
    ];
    for (case, value) in &step_cases {
        assert_valid(STEP_SCHEMA, "step.schema.json", value);
        let decoded = decodes_as_step(value)
            .unwrap_or_else(|error| panic!("the decoder refuses a step with {case}: {error}"));
        assert_eq!(decoded, step, "a step with {case}");
    }

    let batch = step_batches()[0].1.clone();
    let batch_value = to_value(&batch);
    let batch_cases = [
        (
            "a batch of steps with an unknown field",
            with(batch_value.clone(), "/priority", json!(5)),
        ),
        (
            "a batch of steps with a type tag (the AMQP `type` property says what it is)",
            with(batch_value.clone(), "/type", json!("steps")),
        ),
        (
            "a batched step with an unknown field",
            with(batch_value.clone(), "/steps/1/priority", json!(5)),
        ),
        (
            "a batched step with an unknown object field",
            with(
                batch_value.clone(),
                "/steps/2/trace",
                json!({"id": "abc", "sampled": true}),
            ),
        ),
        (
            "a batched step with an unknown null field",
            with(batch_value.clone(), "/steps/3/region", Value::Null),
        ),
        (
            "a batched step with a tracestate",
            with(
                batch_value.clone(),
                "/steps/0/tracestate",
                json!("vendor=value"),
            ),
        ),
    ];
    for (case, value) in &batch_cases {
        assert_valid(STEPS_SCHEMA, "steps.schema.json", value);
        let decoded = decodes_as_step_batch(value)
            .unwrap_or_else(|error| panic!("the decoder refuses {case}: {error}"));
        assert_eq!(decoded, batch, "{case}");
    }

    let failure = WorkerMessage::Result(result(
        Outcome::RetryableError,
        None,
        Some(error("boom", Some("http_503"), Some(2.0))),
    ));
    let started = WorkerMessage::Started(started_batches()[0].1.clone());
    let heartbeat = WorkerMessage::Heartbeat(heartbeats()[0].1.clone());
    let batch = WorkerMessage::Results(result_batches()[0].1.clone());
    let cases = [
        (
            &batch,
            "a batch of results with an unknown field",
            "/worker_id",
            json!("w"),
        ),
        (
            &batch,
            "a batched result with an unknown field",
            "/results/2/duration_ms",
            json!(12),
        ),
        (
            &batch,
            "a batched result with an unknown field in error",
            "/results/3/error/stack",
            json!("at line 3"),
        ),
        (
            &failure,
            "a result with an unknown field",
            "/duration_ms",
            json!(12),
        ),
        (
            &failure,
            "a result with an unknown field in error",
            "/error/stack",
            json!("at line 3"),
        ),
        (
            &started,
            "a started batch with an unknown field",
            "/host",
            json!("h"),
        ),
        (
            &started,
            "a notice with an unknown field",
            "/steps/1/attempt",
            json!(1),
        ),
        (
            &heartbeat,
            "a heartbeat with an unknown field",
            "/sent_at",
            json!("now"),
        ),
        (
            &heartbeat,
            "a running step with a started_at (heartbeats carry none)",
            "/steps/0/started_at",
            json!("2025-10-09T08:53:20Z"),
        ),
    ];
    for (message, case, pointer, extra) in cases {
        let value = with(to_value(message), pointer, extra);
        let (file, schema, _) = worker_schema(message);
        assert_valid(schema, file, &value);
        let decoded = decodes_as_worker_message(&value)
            .unwrap_or_else(|error| panic!("the decoder refuses {case}: {error}"));
        assert_eq!(&decoded, message, "{case}");
    }
}

#[test]
fn control_messages_ignore_unknown_fields_in_both() {
    let hello = json!({"type": "hello", "worker_id": "w", "schema_version": 1, "pid": 7});
    assert_valid(CONTROL_SCHEMA, "control.schema.json", &hello);
    assert_eq!(
        decodes_as_control(&hello).unwrap(),
        ControlMessage::Hello {
            worker_id: "w".into()
        }
    );
}

/// The schemas are the contract: stricter than the decoder in these places.
#[test]
fn the_decoder_accepts_some_messages_the_schema_refuses() {
    let step = to_value(&step_message());
    let result = to_value(&WorkerMessage::Result(result(
        Outcome::RetryableError,
        None,
        Some(error("m", None, Some(1.0))),
    )));
    let steps = to_value(&step_batches()[0].1);
    let results = to_value(&WorkerMessage::Results(result_batches()[0].1.clone()));
    let cases = [
        (
            STEP_SCHEMA,
            "a UUID without hyphens",
            with(step.clone(), "/task_id", json!(id(1).simple().to_string())),
        ),
        (
            STEP_SCHEMA,
            "a braced UUID",
            with(step.clone(), "/step_id", json!(id(2).braced().to_string())),
        ),
        (
            STEP_SCHEMA,
            "a URN UUID",
            with(
                step.clone(),
                "/dispatch_token",
                json!(id(3).urn().to_string()),
            ),
        ),
        (
            STEP_SCHEMA,
            "a timestamp with a space for `T`",
            with(
                step.clone(),
                "/dispatched_at",
                json!("2025-10-09 08:53:20Z"),
            ),
        ),
        (
            STEP_SCHEMA,
            "attempt 0",
            with(step.clone(), "/attempt", json!(0)),
        ),
        (
            STEP_SCHEMA,
            "retry_limit 0",
            with(step.clone(), "/retry_limit", json!(0)),
        ),
        (
            STEP_SCHEMA,
            "negative deferrals",
            with(step.clone(), "/deferrals", json!(-1)),
        ),
        (
            STEP_SCHEMA,
            "timeout_ms 0",
            with(step.clone(), "/timeout_ms", json!(0)),
        ),
        (
            RESULT_SCHEMA,
            "a negative retry_after_seconds",
            with(result.clone(), "/error/retry_after_seconds", json!(-1.5)),
        ),
        (
            STEP_SCHEMA,
            "an instance's index as null",
            with(to_value(&instance_message()), "/index", Value::Null),
        ),
        (
            STEPS_SCHEMA,
            "a batched step's traceparent as null",
            with(steps.clone(), "/steps/0/traceparent", Value::Null),
        ),
        (
            STEPS_SCHEMA,
            "a batched step with attempt 0",
            with(steps.clone(), "/steps/1/attempt", json!(0)),
        ),
        (
            RESULTS_SCHEMA,
            "a batched result's traceparent as null",
            with(results.clone(), "/results/0/traceparent", Value::Null),
        ),
    ];
    for (schema, case, value) in &cases {
        let decodes = if *schema == STEP_SCHEMA {
            decodes_as_step(value).is_ok()
        } else if *schema == STEPS_SCHEMA {
            decodes_as_step_batch(value).is_ok()
        } else {
            decodes_as_worker_message(value).is_ok()
        };
        assert!(decodes, "the decoder should accept {case}");
        assert!(
            !validator(schema).is_valid(value),
            "the schema should refuse {case}"
        );
    }
}

/// JSON Schema cannot tell `1` from `1.0`; serde can.
#[test]
fn integers_written_with_a_decimal_point_pass_the_schema_but_not_the_decoder() {
    let step = with(to_value(&step_message()), "/attempt", json!(2.0));
    assert_valid(STEP_SCHEMA, "step.schema.json", &step);
    assert!(decodes_as_step(&step).is_err());
    let version = with(to_value(&step_message()), "/schema_version", json!(1.0));
    assert_valid(STEP_SCHEMA, "step.schema.json", &version);
    assert!(decodes_as_step(&version).is_err());
}

// ---------------------------------------------------------------------------------------
// docs/protocol.md's examples
// ---------------------------------------------------------------------------------------

/// The body of every ` ```json ` block of `docs/protocol.md`.
fn json_blocks(markdown: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in markdown.lines() {
        let fence = line.trim();
        match &mut current {
            None if fence == "```json" => current = Some(String::new()),
            Some(_) if fence == "```" => blocks.extend(current.take()),
            Some(body) => {
                body.push_str(line);
                body.push('\n');
            }
            None => {}
        }
    }
    assert!(current.is_none(), "an unclosed ```json block");
    blocks
}

#[test]
fn every_json_example_in_protocol_md_is_a_valid_message() {
    let mut seen = BTreeSet::new();
    for block in json_blocks(PROTOCOL_MD) {
        let value: Value = serde_json::from_str(&block)
            .unwrap_or_else(|error| panic!("not JSON ({error}):\n{block}"));
        // The step queues' messages have no `type` in the body (a batch of steps has it
        // as an AMQP property): a batch is the one with `steps`.
        let kind = match value["type"].as_str() {
            Some(kind) => kind,
            None if value.get("steps").is_some() => "steps",
            None => "step",
        }
        .to_owned();
        match kind.as_str() {
            "step" => {
                assert_valid(STEP_SCHEMA, "step.schema.json", &value);
                decodes_as_step(&value).expect("the step example decodes");
            }
            "steps" => {
                assert_valid(STEPS_SCHEMA, "steps.schema.json", &value);
                decodes_as_step_batch(&value).unwrap_or_else(|error| panic!("{error}:\n{block}"));
            }
            "result" | "results" | "started" | "heartbeat" => {
                let message = decodes_as_worker_message(&value)
                    .unwrap_or_else(|error| panic!("{error}:\n{block}"));
                let (file, schema, _) = worker_schema(&message);
                assert_valid(schema, file, &value);
            }
            "namespaces" | "hello" | "cancel_task" | "worker_status" | "superseded" => {
                assert_valid(CONTROL_SCHEMA, "control.schema.json", &value);
                decodes_as_control(&value).expect("the control example decodes");
            }
            other => panic!("an example of unknown type `{other}`:\n{block}"),
        }
        seen.insert(kind);
    }
    for kind in [
        "step",
        "steps",
        "result",
        "results",
        "started",
        "heartbeat",
        "namespaces",
        "hello",
        "cancel_task",
        "worker_status",
        "superseded",
    ] {
        assert!(
            seen.contains(kind),
            "docs/protocol.md has no `{kind}` example"
        );
    }
}
