//! The message decoders: never a panic on anything; whatever decodes speaks this build's
//! version and re-encodes to itself; generated messages round-trip.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use proptest::collection::{btree_map, vec};
use proptest::option;
use proptest::prelude::*;
use proptest::sample::select;
use serde_json::{Map, Value, json};
use tasker_shared::messages::{
    BatchedResult, ControlMessage, DecodeError, HeartbeatBatch, Outcome, ResultBatch, RunningStep,
    SCHEMA_VERSION, StartedBatch, StepError, StepMessage, StepResult, StepStarted, WorkerMessage,
    nul_pointers,
};
use uuid::Uuid;

use crate::strategies::{any_string, edge_number, json_value, mutate, mutations};

const REGRESSIONS: &str = "proptest-regressions/fuzz-messages.txt";

/// Run every decoder on `body`. None may panic; what decodes must re-encode to a body
/// that decodes to the same message, and step and worker messages must speak
/// [`SCHEMA_VERSION`].
pub(crate) fn decode_every_way(body: &[u8]) -> (bool, bool, bool) {
    let step = StepMessage::decode(body).inspect(|message| {
        assert_eq!(message.schema_version, SCHEMA_VERSION);
        let again = serde_json::to_vec(message).expect("encodes");
        assert_eq!(
            &StepMessage::decode(&again).expect("decodes again"),
            message
        );
    });
    let worker = WorkerMessage::decode(body).inspect(|message| {
        let versions = match message {
            WorkerMessage::Result(result) => vec![result.schema_version],
            WorkerMessage::Results(batch) => std::iter::once(batch.schema_version)
                .chain(batch.results.iter().map(|b| b.result.schema_version))
                .collect(),
            WorkerMessage::Started(batch) => vec![batch.schema_version],
            WorkerMessage::Heartbeat(batch) => vec![batch.schema_version],
        };
        assert!(versions.iter().all(|v| *v == SCHEMA_VERSION));
        let again = serde_json::to_vec(message).expect("encodes");
        assert_eq!(
            &WorkerMessage::decode(&again).expect("decodes again"),
            message
        );
    });
    let control = ControlMessage::decode(body).inspect(|message| {
        let again = serde_json::to_vec(message).expect("encodes");
        assert_eq!(
            &ControlMessage::decode(&again).expect("decodes again"),
            message
        );
    });
    // A DecodeError always renders, for the dead-letter header.
    let decoded = (step.is_ok(), worker.is_ok(), control.is_ok());
    for error in [step.err(), worker.err(), control.err()]
        .into_iter()
        .flatten()
    {
        assert!(!error.to_string().is_empty());
    }
    decoded
}

/// The valid messages of the corpus, as JSON values: seeds for mutations.
fn valid_corpus_messages() -> Vec<Value> {
    crate::corpus::files("messages")
        .into_iter()
        .filter(|(name, _)| crate::corpus::expect_valid(name))
        .map(|(name, bytes)| {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|error| panic!("corpus message {name}: {error}"))
        })
        .collect()
}

/// Objects with the keys of a message and values of any shape.
fn message_shaped() -> impl Strategy<Value = Value> {
    const KEYS: &[&str] = &[
        "schema_version",
        "task_id",
        "step_id",
        "step_name",
        "namespace",
        "template",
        "handler",
        "config",
        "context",
        "parents",
        "attempt",
        "retry_limit",
        "deferrals",
        "dispatch_token",
        "timeout_ms",
        "dispatched_at",
        "outcome",
        "results",
        "error",
        "started_at",
        "finished_at",
        "worker_id",
        "steps",
        "namespaces",
        "all_namespaces",
        "concurrency",
        "in_flight",
        "interval_ms",
    ];
    let value = prop_oneof![
        3 => json_value(),
        1 => Just(json!(SCHEMA_VERSION)),
        1 => edge_number(),
        1 => any::<u128>().prop_map(|n| json!(Uuid::from_u128(n))),
        1 => Just(json!("2025-10-09T08:53:20.123456Z")),
        1 => Just(json!([{"step_id": Uuid::nil(), "dispatch_token": Uuid::nil()}])),
    ];
    (
        option::of(select(vec![
            "result",
            "started",
            "heartbeat",
            "namespaces",
            "hello",
            "cancel_task",
            "worker_status",
            "Result",
            "",
        ])),
        btree_map(select(KEYS), value, 0..16),
    )
        .prop_map(|(kind, fields)| {
            let mut object: Map<String, Value> =
                fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
            if let Some(kind) = kind {
                object.insert("type".into(), json!(kind));
            }
            Value::Object(object)
        })
}

// ---------------------------------------------------------------------------------------
// Generated valid messages
// ---------------------------------------------------------------------------------------

fn uuid() -> impl Strategy<Value = Uuid> {
    any::<u128>().prop_map(Uuid::from_u128)
}

fn timestamp() -> impl Strategy<Value = DateTime<Utc>> {
    // Years -9999 to 9999, nanosecond precision.
    (-377_705_116_800_i64..253_402_300_799, 0_u32..1_000_000_000)
        .prop_map(|(secs, nanos)| DateTime::from_timestamp(secs, nanos).expect("in chrono's range"))
}

/// JSON that survives a trip through JSON text exactly.
fn exact_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<i32>().prop_map(|n| json!(f64::from(n) / 8.0)),
        any_string().prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 32, 5, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..5).prop_map(Value::Array),
            btree_map(any_string(), inner, 0..5)
                .prop_map(|map| Value::Object(map.into_iter().collect())),
        ]
    })
}

fn step_message() -> impl Strategy<Value = StepMessage> {
    (
        (
            uuid(),
            uuid(),
            any::<String>(),
            any::<String>(),
            any::<String>(),
        ),
        (any::<String>(), exact_json(), exact_json()),
        (
            btree_map(any::<String>(), exact_json(), 0..4),
            any::<i32>(),
            any::<i32>(),
            any::<i32>(),
        ),
        (uuid(), any::<i64>(), timestamp()),
    )
        .prop_map(
            |(
                (task_id, step_id, step_name, namespace, template),
                (handler, config, context),
                (parents, attempt, retry_limit, deferrals),
                (dispatch_token, timeout_ms, dispatched_at),
            )| StepMessage {
                schema_version: SCHEMA_VERSION,
                task_id,
                step_id,
                step_name,
                namespace,
                template,
                handler,
                config,
                context,
                parents: parents.into_iter().collect::<BTreeMap<_, _>>(),
                attempt,
                retry_limit,
                deferrals,
                dispatch_token,
                timeout_ms,
                dispatched_at,
                item: None,
                index: None,
            },
        )
}

fn outcome() -> impl Strategy<Value = Outcome> {
    select(vec![
        Outcome::Success,
        Outcome::RetryableError,
        Outcome::PermanentError,
        Outcome::Deferred,
    ])
}

fn step_error() -> impl Strategy<Value = StepError> {
    (
        any::<String>(),
        option::of(any::<String>()),
        // Binary fractions: exact through JSON text.
        option::of(any::<i32>().prop_map(|n| f64::from(n) / 4.0)),
    )
        .prop_map(|(message, code, retry_after_seconds)| StepError {
            message,
            code,
            retry_after_seconds,
        })
}

fn step_result() -> impl Strategy<Value = StepResult> {
    (
        (uuid(), uuid(), uuid(), outcome()),
        (option::of(exact_json()), option::of(step_error())),
        (timestamp(), timestamp(), any::<String>()),
    )
        .prop_map(
            |(
                (task_id, step_id, dispatch_token, outcome),
                (results, error),
                (started_at, finished_at, worker_id),
            )| {
                StepResult {
                    schema_version: SCHEMA_VERSION,
                    task_id,
                    step_id,
                    dispatch_token,
                    outcome,
                    // `null` results are absent results.
                    results: results.filter(|r| !r.is_null()),
                    error,
                    started_at,
                    finished_at,
                    worker_id,
                }
            },
        )
}

fn worker_message() -> impl Strategy<Value = WorkerMessage> {
    let result = step_result().prop_map(WorkerMessage::Result);
    let results = vec(
        (step_result(), option::of(any::<String>())).prop_map(|(result, traceparent)| {
            BatchedResult {
                result,
                traceparent,
            }
        }),
        0..4,
    )
    .prop_map(|results| {
        WorkerMessage::Results(ResultBatch {
            schema_version: SCHEMA_VERSION,
            results,
        })
    });
    let started = (
        any::<String>(),
        vec(
            (uuid(), uuid(), timestamp(), any::<bool>()).prop_map(
                |(step_id, dispatch_token, started_at, redelivered)| StepStarted {
                    step_id,
                    dispatch_token,
                    started_at,
                    redelivered,
                },
            ),
            0..4,
        ),
    )
        .prop_map(|(worker_id, steps)| {
            WorkerMessage::Started(StartedBatch {
                schema_version: SCHEMA_VERSION,
                worker_id,
                steps,
            })
        });
    let heartbeat = (
        any::<String>(),
        vec(
            (uuid(), uuid()).prop_map(|(step_id, dispatch_token)| RunningStep {
                step_id,
                dispatch_token,
            }),
            0..4,
        ),
    )
        .prop_map(|(worker_id, steps)| {
            WorkerMessage::Heartbeat(HeartbeatBatch {
                schema_version: SCHEMA_VERSION,
                worker_id,
                steps,
            })
        });
    prop_oneof![result, results, started, heartbeat]
}

fn control_message() -> impl Strategy<Value = ControlMessage> {
    prop_oneof![
        vec(any::<String>(), 0..4).prop_map(|namespaces| ControlMessage::Namespaces { namespaces }),
        any::<String>().prop_map(|worker_id| ControlMessage::Hello { worker_id }),
        uuid().prop_map(|task_id| ControlMessage::CancelTask { task_id }),
        (
            any::<String>(),
            vec(any::<String>(), 0..4),
            any::<bool>(),
            any::<u16>(),
            any::<usize>(),
            any::<u64>()
        )
            .prop_map(
                |(worker_id, namespaces, all_namespaces, concurrency, in_flight, interval_ms)| {
                    ControlMessage::WorkerStatus {
                        worker_id,
                        namespaces,
                        all_namespaces,
                        concurrency,
                        in_flight,
                        interval_ms,
                    }
                }
            ),
        vec(
            (uuid(), uuid()).prop_map(|(step_id, dispatch_token)| RunningStep {
                step_id,
                dispatch_token
            }),
            0..4
        )
        .prop_map(|dispatches| ControlMessage::Superseded { dispatches }),
    ]
}

proptest! {
    #![proptest_config(crate::config(256, REGRESSIONS))]

    #[test]
    fn any_bytes_are_refused_without_panicking(bytes in vec(any::<u8>(), 0..1024)) {
        decode_every_way(&bytes);
    }

    #[test]
    fn json_trees_of_any_shape_never_panic(value in json_value()) {
        decode_every_way(&serde_json::to_vec(&value).expect("serialises"));
    }

    #[test]
    fn message_shaped_objects_with_wrong_values_never_panic(value in message_shaped()) {
        decode_every_way(&serde_json::to_vec(&value).expect("serialises"));
    }

    #[test]
    fn mutated_corpus_messages_never_panic(
        seed in select(valid_corpus_messages()),
        mutations in mutations(),
    ) {
        let mut value = seed;
        mutate(&mut value, &mutations);
        decode_every_way(&serde_json::to_vec(&value).expect("serialises"));
    }

    #[test]
    fn truncated_and_spliced_bodies_never_panic(
        seed in select(valid_corpus_messages()),
        cut in any::<usize>(),
        splice in vec(any::<u8>(), 0..16),
    ) {
        let body = serde_json::to_vec(&seed).expect("serialises");
        let at = cut % (body.len() + 1);
        let mut spliced = body[..at].to_vec();
        spliced.extend_from_slice(&splice);
        spliced.extend_from_slice(&body[at..]);
        decode_every_way(&body[..at]);
        decode_every_way(&spliced);
    }

    #[test]
    fn generated_step_messages_round_trip(message in step_message()) {
        let body = serde_json::to_vec(&message).expect("encodes");
        prop_assert_eq!(StepMessage::decode(&body).expect("decodes"), message);
        prop_assert_eq!(decode_every_way(&body), (true, false, false));
    }

    #[test]
    fn generated_worker_messages_round_trip(message in worker_message()) {
        let body = serde_json::to_vec(&message).expect("encodes");
        // A message holding U+0000 anywhere is refused: PostgreSQL could not store it.
        let value = serde_json::to_value(&message).expect("encodes");
        if !nul_pointers(&value, "", 1).is_empty() {
            prop_assert!(matches!(WorkerMessage::decode(&body), Err(DecodeError::Nul)));
            prop_assert_eq!(decode_every_way(&body), (false, false, false));
            return Ok(());
        }
        prop_assert_eq!(WorkerMessage::decode(&body).expect("decodes"), message);
        prop_assert_eq!(decode_every_way(&body), (false, true, false));
    }

    #[test]
    fn generated_control_messages_round_trip(message in control_message()) {
        let body = serde_json::to_vec(&message).expect("encodes");
        prop_assert_eq!(ControlMessage::decode(&body).expect("decodes"), message);
        prop_assert_eq!(decode_every_way(&body), (false, false, true));
    }

    #[test]
    fn other_schema_versions_are_refused(
        message in step_message(),
        version in any::<u32>().prop_filter("not ours", |v| *v != SCHEMA_VERSION),
    ) {
        let mut value = serde_json::to_value(&message).expect("encodes");
        value["schema_version"] = json!(version);
        let body = serde_json::to_vec(&value).expect("serialises");
        let error = StepMessage::decode(&body).expect_err("another version is refused");
        prop_assert!(error.to_string().contains(&version.to_string()));
    }
}
