//! Generators shared by the fuzz properties: arbitrary JSON trees, hostile text, and
//! mutations of valid documents.

use proptest::collection::{btree_map, vec};
use proptest::prelude::*;
use proptest::sample::select;
use serde_json::{Map, Number, Value};

/// Keys the parsers and decoders know, so generated objects reach past the first check:
/// the template parsers' own lists, and these.
const OTHER_KNOWN_KEYS: &[&str] = &[
    // YAML merge key, and an environment name of tasker-engine templates
    "<<",
    "development",
    // JSON Schema
    "$ref",
    "$schema",
    "$defs",
    "type",
    "properties",
    "required",
    "pattern",
    "format",
    "items",
    // messages
    "schema_version",
    "task_id",
    "step_id",
    "step_name",
    "template",
    "context",
    "parents",
    "attempt",
    "deferrals",
    "dispatch_token",
    "dispatched_at",
    "outcome",
    "results",
    "error",
    "message",
    "code",
    "retry_after_seconds",
    "started_at",
    "finished_at",
    "worker_id",
    "redelivered",
    "namespaces",
    "all_namespaces",
    "concurrency",
    "in_flight",
    "interval_ms",
];

/// String values the parsers and decoders give meaning to.
const KNOWN_STRINGS: &[&str] = &[
    "",
    " ",
    "a",
    "s0",
    "tasker.noop",
    "1.0.0",
    "1.0",
    "v1",
    "result",
    "started",
    "heartbeat",
    "namespaces",
    "hello",
    "cancel_task",
    "worker_status",
    "success",
    "retryable_error",
    "permanent_error",
    "deferred",
    "0199c7a2-4b1e-7c3d-9a55-3e1f0b6d2c01",
    "00000000-0000-0000-0000-000000000000",
    "2025-10-09T08:53:20.123456Z",
    "9999-12-31T23:59:59Z",
    "-262143-01-01T00:00:00Z",
    "#",
    "#/$defs/a",
    "object",
    "email",
    "^(a+)+$",
    "(",
    "development",
    "\u{0}",
    "\u{feff}",
    "\u{202e}",
    "é",
];

/// Numbers at the edges: of i32, i64, u64, f64 and of the parsers' ranges.
pub(crate) fn edge_number() -> impl Strategy<Value = Value> {
    prop_oneof![
        select(vec![
            0_i64,
            -1,
            1,
            100,
            101,
            10_000,
            10_001,
            86_400_000,
            86_400_001,
            i64::from(i32::MAX),
            i64::from(i32::MAX) + 1,
            i64::from(i32::MIN),
            i64::from(u32::MAX) + 1,
            i64::MAX,
            i64::MIN,
        ])
        .prop_map(Value::from),
        Just(Value::from(u64::MAX)),
        select(vec![
            -0.0_f64,
            0.5,
            1e-300,
            5e-324,
            1e300,
            f64::MAX,
            f64::MIN,
            86_400.0,
            86_400.001,
            9_007_199_254_740_993.0,
        ])
        .prop_map(float),
    ]
}

/// A JSON number from any finite `f64` (non-finite ones become `null`, as in JSON).
pub(crate) fn float(value: f64) -> Value {
    Number::from_f64(value).map_or(Value::Null, Value::Number)
}

/// Any string, biased towards the ones the parsers know.
pub(crate) fn any_string() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => select(KNOWN_STRINGS).prop_map(str::to_owned),
        2 => any::<String>(),
        1 => "[a-z_]{1,8}",
    ]
}

fn known_keys() -> Vec<&'static str> {
    let keys = tasker_shared::template::template_keys();
    let mut all: Vec<&'static str> = keys
        .top
        .into_iter()
        .chain(keys.step)
        .chain(OTHER_KNOWN_KEYS.iter().copied())
        .collect();
    all.sort_unstable();
    all.dedup();
    all
}

fn any_key() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => select(known_keys()).prop_map(str::to_owned),
        1 => any::<String>(),
    ]
}

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(float),
        edge_number(),
        any_string().prop_map(Value::String),
    ]
}

/// A JSON value of arbitrary shape: up to 6 levels, biased towards known keys.
pub(crate) fn json_value() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(6, 96, 8, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..8).prop_map(Value::Array),
            btree_map(any_key(), inner, 0..8)
                .prop_map(|map| Value::Object(map.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// Fragments of YAML and JSON syntax, glued together at random: reaches the syntax
/// checks (anchors, aliases, tags, merge keys, flow and block collections) far more often
/// than uniformly random text does.
pub(crate) fn syntax_soup() -> impl Strategy<Value = String> {
    const TOKENS: &[&str] = &[
        "{",
        "}",
        "[",
        "]",
        ":",
        ": ",
        ",",
        "\n",
        "  ",
        "- ",
        "? ",
        "&a ",
        "*a",
        "&b ",
        "*b",
        "<<: ",
        "!!str ",
        "!!binary ",
        "!tag ",
        "---\n",
        "...\n",
        "#c\n",
        "|\n",
        ">-\n",
        "\"",
        "'",
        "\\u0000",
        "\\ud800",
        "~",
        "null",
        "true",
        "1e999",
        "-0",
        ".nan",
        ".inf",
        "18446744073709551616",
        "0x1F",
        "0o7",
        "namespace",
        "name",
        "steps",
        "step_templates",
        "task_handler_class",
        "handler",
        "depends_on",
        "backoff",
        "schedule",
        "environments",
        "context_schema",
        "$ref",
        "\"#\"",
        "s0",
        "s1",
        "tasker.noop",
        "\t",
        "\r",
        "\u{feff}",
        "%YAML 1.2\n",
        "%TAG ! tag:x,2000:\n",
    ];
    vec(select(TOKENS), 0..64).prop_map(|tokens| tokens.concat())
}

/// One change to a document: the target is picked by position in a pre-order walk.
#[derive(Debug, Clone)]
pub(crate) enum Mutation {
    /// Remove a key of an object or an item of a list.
    Drop { target: usize, child: usize },
    /// Replace a node by an arbitrary value (usually of the wrong type).
    Replace { target: usize, value: Value },
    /// Replace a node by a number at the edge of some range.
    Edge { target: usize, value: Value },
    /// Bury a node under `depth` levels of lists or objects.
    Nest {
        target: usize,
        depth: usize,
        object: bool,
    },
    /// Rename a key (to a near miss or to anything).
    Rename {
        target: usize,
        child: usize,
        key: String,
    },
    /// Repeat an item of a list (duplicate step names, repeated dependencies).
    Repeat {
        target: usize,
        child: usize,
        times: usize,
    },
}

pub(crate) fn mutation() -> impl Strategy<Value = Mutation> {
    let target = any::<usize>();
    prop_oneof![
        (target, any::<usize>()).prop_map(|(target, child)| Mutation::Drop { target, child }),
        (target, json_value()).prop_map(|(target, value)| Mutation::Replace { target, value }),
        (target, edge_number()).prop_map(|(target, value)| Mutation::Edge { target, value }),
        (target, 1_usize..300, any::<bool>()).prop_map(|(target, depth, object)| {
            Mutation::Nest {
                target,
                depth,
                object,
            }
        }),
        (target, any::<usize>(), any_key())
            .prop_map(|(target, child, key)| { Mutation::Rename { target, child, key } }),
        (target, any::<usize>(), 1_usize..4).prop_map(|(target, child, times)| {
            Mutation::Repeat {
                target,
                child,
                times,
            }
        }),
    ]
}

/// Up to four mutations, applied in order.
pub(crate) fn mutations() -> impl Strategy<Value = Vec<Mutation>> {
    vec(mutation(), 1..5)
}

/// Apply `mutations` to `value`.
pub(crate) fn mutate(value: &mut Value, mutations: &[Mutation]) {
    for mutation in mutations {
        apply(value, mutation);
    }
}

fn count(value: &Value) -> usize {
    1 + match value {
        Value::Array(items) => items.iter().map(count).sum(),
        Value::Object(map) => map.values().map(count).sum(),
        _ => 0,
    }
}

/// The node at pre-order position `index` (`index < count(value)`).
fn node_at(value: &mut Value, index: usize) -> &mut Value {
    if index == 0 {
        return value;
    }
    let mut index = index - 1;
    let children: Box<dyn Iterator<Item = &mut Value>> = match value {
        Value::Array(items) => Box::new(items.iter_mut()),
        Value::Object(map) => Box::new(map.values_mut()),
        _ => unreachable!("a leaf has no position after its own"),
    };
    for child in children {
        let size = count(child);
        if index < size {
            return node_at(child, index);
        }
        index -= size;
    }
    unreachable!("index within the tree")
}

fn apply(value: &mut Value, mutation: &Mutation) {
    let size = count(value);
    let pick = |target: usize| target % size;
    match mutation {
        Mutation::Drop { target, child } => match node_at(value, pick(*target)) {
            Value::Array(items) if !items.is_empty() => {
                let at = child % items.len();
                items.remove(at);
            }
            Value::Object(map) if !map.is_empty() => {
                let key = map.keys().nth(child % map.len()).cloned();
                if let Some(key) = key {
                    map.remove(&key);
                }
            }
            _ => {}
        },
        Mutation::Replace { target, value: new } | Mutation::Edge { target, value: new } => {
            *node_at(value, pick(*target)) = new.clone();
        }
        Mutation::Nest {
            target,
            depth,
            object,
        } => {
            let node = node_at(value, pick(*target));
            let mut nested = node.take();
            for _ in 0..*depth {
                nested = if *object {
                    Value::Object(Map::from_iter([("k".to_owned(), nested)]))
                } else {
                    Value::Array(vec![nested])
                };
            }
            *node = nested;
        }
        Mutation::Rename { target, child, key } => {
            if let Value::Object(map) = node_at(value, pick(*target))
                && !map.is_empty()
            {
                let old = map.keys().nth(child % map.len()).cloned();
                if let Some(old) = old
                    && let Some(moved) = map.remove(&old)
                {
                    map.insert(key.clone(), moved);
                }
            }
        }
        Mutation::Repeat {
            target,
            child,
            times,
        } => {
            if let Value::Array(items) = node_at(value, pick(*target))
                && !items.is_empty()
            {
                let copy = items[child % items.len()].clone();
                for _ in 0..*times {
                    items.push(copy.clone());
                }
            }
        }
    }
}
