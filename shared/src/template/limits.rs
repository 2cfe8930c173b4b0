//! The flow-control keys of a step, and the CEL expressions that name their keys.
//!
//! ```yaml
//! concurrency: {key: "context.customer_id", limit: 2}          # at most 2 running per customer
//! rate_limit: {key: "'partner-api'", limit: 100, per: 1s}      # 100 starts a second, fleet-wide
//! ```
//!
//! A key is a CEL expression over `context` (the task's context) and `task` (`namespace`,
//! `name`, `version`, `priority`, `tags`). It is compiled when the template is registered
//! (a key that does not compile, or names another variable, is a problem there) and
//! evaluated once per task, when it is created ([`LimitKeys`]); the values are stored with
//! the steps, where the claim counts them (migrations/0013).

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};

use serde_json::{Map, Value, json};

use super::walker::{Walker, field, join};
use super::{ConcurrencyLimit, Problem, RateLimit, TemplateDefinition, codes};

pub(super) const CONCURRENCY_KEYS: &[&str] = &["key", "limit"];
pub(super) const RATE_LIMIT_KEYS: &[&str] = &["key", "limit", "per"];
pub(super) const HINTS: &[(&str, &str)] = &[
    ("max", "limit"),
    ("max_concurrency", "limit"),
    ("window", "per"),
    ("interval", "per"),
    ("expression", "key"),
];

/// Most steps of one key at once.
pub const MAX_CONCURRENCY: i64 = 10_000;
/// Most starts of one key per window: the claim keeps the window's start times.
pub const MAX_RATE: i64 = 10_000;
/// Longest rate window: one day.
const MAX_WINDOW_MS: i64 = 86_400_000;
/// The variables a key may use.
const VARIABLES: &[&str] = &["context", "task"];
/// Longest key value, in bytes.
pub const MAX_KEY_BYTES: usize = 256;

/// Read a step's `concurrency`.
pub(super) fn walk_concurrency(
    w: &mut Walker,
    object: &Map<String, Value>,
    path: &str,
    step: Option<&str>,
) -> Option<ConcurrencyLimit> {
    let spec = limit_object(w, object, path, "concurrency", CONCURRENCY_KEYS)?;
    let path = join(path, "concurrency");
    let key = key(w, spec, &path, step);
    let limit = limit(w, spec, &path, step, MAX_CONCURRENCY);
    Some(ConcurrencyLimit {
        key: key?,
        limit: limit?,
    })
}

/// Read a step's `rate_limit`.
pub(super) fn walk_rate_limit(
    w: &mut Walker,
    object: &Map<String, Value>,
    path: &str,
    step: Option<&str>,
) -> Option<RateLimit> {
    let spec = limit_object(w, object, path, "rate_limit", RATE_LIMIT_KEYS)?;
    let path = join(path, "rate_limit");
    let key = key(w, spec, &path, step);
    let limit = limit(w, spec, &path, step, MAX_RATE);
    let per = window(w, spec, &path, step);
    Some(RateLimit {
        key: key?,
        limit: limit?,
        per: per?,
    })
}

fn limit_object<'a>(
    w: &mut Walker,
    object: &'a Map<String, Value>,
    path: &str,
    name: &str,
    keys: &[&str],
) -> Option<&'a Map<String, Value>> {
    let value = field(object, name)?;
    let path = join(path, name);
    let Some(spec) = value.as_object() else {
        w.not_an_object(&path, value, &format!("`{name}`"));
        return None;
    };
    w.unknown_keys(spec, &path, keys, HINTS);
    Some(spec)
}

/// How a message names the step: by name when it has a usable one.
fn about(step: Option<&str>) -> String {
    step.map_or_else(|| "this step".to_owned(), |name| format!("step `{name}`"))
}

fn key(
    w: &mut Walker,
    spec: &Map<String, Value>,
    path: &str,
    step: Option<&str>,
) -> Option<String> {
    let key_path = join(path, "key");
    let Some(value) = field(spec, "key") else {
        w.report(
            key_path,
            codes::MISSING_KEY,
            format!(
                "{}: missing required key `key` (a CEL expression such as `context.customer_id`)",
                about(step)
            ),
        );
        return None;
    };
    let source = w.string(value, &key_path)?;
    match compile(source) {
        Ok(_) => Some(source.to_owned()),
        Err(error) => {
            w.report(
                key_path,
                codes::INVALID_EXPRESSION,
                format!("{}: the key {error}", about(step)),
            );
            None
        }
    }
}

fn limit(
    w: &mut Walker,
    spec: &Map<String, Value>,
    path: &str,
    step: Option<&str>,
    max: i64,
) -> Option<i32> {
    let limit_path = join(path, "limit");
    let Some(value) = field(spec, "limit") else {
        w.report(
            limit_path,
            codes::MISSING_KEY,
            format!("{}: missing required key `limit`", about(step)),
        );
        return None;
    };
    match value.as_i64() {
        Some(limit) if (1..=max).contains(&limit) => i32::try_from(limit).ok(),
        _ => {
            w.report(
                limit_path,
                codes::INVALID_VALUE,
                format!(
                    "{}: `limit` must be an integer between 1 and {max}, got {value}",
                    about(step)
                ),
            );
            None
        }
    }
}

fn window(
    w: &mut Walker,
    spec: &Map<String, Value>,
    path: &str,
    step: Option<&str>,
) -> Option<String> {
    let per_path = join(path, "per");
    let Some(value) = field(spec, "per") else {
        w.report(
            per_path,
            codes::MISSING_KEY,
            format!(
                "{}: missing required key `per` (`1s`, `1m` or `1h`)",
                about(step)
            ),
        );
        return None;
    };
    match value.as_str().and_then(window_ms) {
        Some(_) => value.as_str().map(str::to_owned),
        None => {
            w.report(
                per_path,
                codes::INVALID_VALUE,
                format!(
                    "{}: `per` must be a window such as `1s`, `1m`, `1h` or `10s` (at most \
                     a day), got {value}",
                    about(step)
                ),
            );
            None
        }
    }
}

/// A rate window in milliseconds: a whole number of seconds, minutes or hours (`1s`,
/// `10s`, `1m`, `1h`), from one second to one day.
pub fn window_ms(per: &str) -> Option<i64> {
    let unit = match per.chars().last()? {
        's' => 1_000,
        'm' => 60_000,
        'h' => 3_600_000,
        _ => return None,
    };
    let count = &per[..per.len() - 1];
    if count.is_empty() || !count.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let ms = count.parse::<i64>().ok()?.checked_mul(unit)?;
    (1_000..=MAX_WINDOW_MS).contains(&ms).then_some(ms)
}

/// Compiled keys, by source: a template's keys are compiled when it is registered, and
/// again at most once per coordinator (and then at most [`MAX_CACHED`] of them).
static PROGRAMS: LazyLock<Mutex<HashMap<String, Arc<cel::Program>>>> =
    LazyLock::new(Mutex::default);
const MAX_CACHED: usize = 10_000;

/// Compile a key, or say why it cannot be: it does not parse, or it uses a variable
/// other than `context` and `task`.
fn compile(source: &str) -> Result<Arc<cel::Program>, String> {
    if let Some(program) = PROGRAMS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(source)
    {
        return Ok(program.clone());
    }
    let program = cel::Program::compile(source)
        .map_err(|error| format!("`{source}` does not compile: {error}"))?;
    let references = program.references();
    let mut unknown: Vec<&str> = references
        .variables()
        .into_iter()
        .filter(|name| !VARIABLES.contains(name))
        .collect();
    if !unknown.is_empty() {
        unknown.sort_unstable();
        return Err(format!(
            "`{source}` uses {}; a key may use `context` (the task's context) and `task` \
             (its namespace, name, version, priority and tags)",
            unknown
                .iter()
                .map(|name| format!("`{name}`"))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    let program = Arc::new(program);
    let mut cache = PROGRAMS.lock().unwrap_or_else(|e| e.into_inner());
    if cache.len() >= MAX_CACHED {
        cache.clear();
    }
    cache.insert(source.to_owned(), program.clone());
    Ok(program)
}

/// What a key is evaluated with: the task being created.
#[derive(Debug, Clone, Copy)]
pub struct KeyInputs<'a> {
    /// The task's context.
    pub context: &'a Value,
    /// Its tags.
    pub tags: &'a Value,
    /// Its priority.
    pub priority: i16,
}

/// The limits of one step of a task being created, with their keys evaluated.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LimitKeys {
    /// The concurrency key, scoped to the template and step
    /// (`namespace/name.step=value`), and its limit.
    pub concurrency: Option<(String, i32)>,
    /// The rate key (its value: shared by every step with the same one), its limit and
    /// window in milliseconds.
    pub rate: Option<(String, i32, i32)>,
}

impl TemplateDefinition {
    /// Whether any step has a limit.
    pub fn has_limits(&self) -> bool {
        self.steps
            .iter()
            .any(|step| step.concurrency.is_some() || step.rate_limit.is_some())
    }

    /// Evaluate the limit keys of every step (in template order) for a task created with
    /// `inputs`: empty when no step has a limit.
    ///
    /// # Errors
    ///
    /// Every key that cannot be evaluated (a missing context field, say) or gives
    /// something other than a string, number or boolean, named by step and key.
    pub fn limit_keys(&self, inputs: KeyInputs<'_>) -> Result<Vec<LimitKeys>, Vec<Problem>> {
        if !self.has_limits() {
            return Ok(Vec::new());
        }
        let task = json!({
            "namespace": self.namespace,
            "name": self.name,
            "version": self.version,
            "priority": inputs.priority,
            "tags": inputs.tags,
        });
        let mut context = cel::Context::default();
        let mut problems = Vec::new();
        for (name, value) in [("context", inputs.context), ("task", &task)] {
            if let Err(error) = context.add_variable(name, value) {
                problems.push(Problem::new(
                    "",
                    codes::INVALID_EXPRESSION,
                    format!("the {name} cannot be given to a key: {error}"),
                ));
            }
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        let mut evaluate = |source: &str, path: String, step: &str| {
            evaluate(&context, source).map_err(|error| {
                problems.push(Problem::new(
                    path,
                    codes::INVALID_EXPRESSION,
                    format!("step `{step}`: the key `{source}` {error}"),
                ));
            })
        };
        let keys: Vec<LimitKeys> = self
            .steps
            .iter()
            .enumerate()
            .map(|(n, step)| LimitKeys {
                concurrency: step.concurrency.as_ref().and_then(|limit| {
                    let path = format!("steps[{n}].concurrency.key");
                    evaluate(&limit.key, path, &step.name).ok().map(|value| {
                        let scoped =
                            format!("{}/{}.{}={value}", self.namespace, self.name, step.name);
                        (scoped, limit.limit)
                    })
                }),
                rate: step.rate_limit.as_ref().and_then(|limit| {
                    let path = format!("steps[{n}].rate_limit.key");
                    let window = i32::try_from(limit.per_ms()).unwrap_or(i32::MAX);
                    evaluate(&limit.key, path, &step.name)
                        .ok()
                        .map(|value| (value, limit.limit, window))
                }),
            })
            .collect();
        if problems.is_empty() {
            Ok(keys)
        } else {
            Err(problems)
        }
    }
}

/// A key's value as text: a string as it is, a number or boolean written out.
fn evaluate(context: &cel::Context<'_, '_>, source: &str) -> Result<String, String> {
    let program = compile(source)?;
    let value = program
        .execute(context)
        .map_err(|error| format!("cannot be evaluated: {error}"))?;
    let text = match value {
        cel::Value::String(text) => text.to_string(),
        cel::Value::Int(n) => n.to_string(),
        cel::Value::UInt(n) => n.to_string(),
        cel::Value::Float(n) => n.to_string(),
        cel::Value::Bool(b) => b.to_string(),
        other => {
            return Err(format!(
                "gave a {}; a key must be a string, a number or a boolean",
                other.type_of()
            ));
        }
    };
    if text.len() > MAX_KEY_BYTES {
        return Err(format!(
            "gave {} bytes; a key value may have at most {MAX_KEY_BYTES}",
            text.len()
        ));
    }
    Ok(text)
}
