//! Workflow templates: parsing, validation and normalisation.
//!
//! Tasker reads two template formats and turns both into one normalised
//! [`TemplateDefinition`], which is what the rest of the system stores (as
//! JSON) and executes:
//!
//! * the **project format** (`namespace`, `name`, `steps`, ...), written in
//!   YAML or JSON;
//! * the **tasker-engine 1.x format** (`step_templates`, `task_handler_class`,
//!   ...), read unchanged from the Ruby predecessor, including its per
//!   environment `handler_config` overrides.
//!
//! Validation never stops at the first mistake: [`parse_template`] and
//! [`template_from_value`] walk the whole document and return every
//! [`Problem`] they find (wrong types, missing and unknown keys, bad values,
//! duplicate step names, unknown or self dependencies, dependency cycles and
//! invalid context schemas), each with a path such as `steps[2].handler`.
//!
//! ```text
//! let template = parse_template(&text, "production")?;
//! template.validate_context(&context)?;
//! for step in template.topological_order() { /* parents first */ }
//! ```

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::fmt::{self, Write as _};
use std::panic::{self, AssertUnwindSafe};

use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

/// Problem codes carried in [`Problem::code`].
///
/// Callers can match on these constants instead of repeating the strings.
pub mod codes {
    /// The text is not valid YAML/JSON (also: duplicate keys, non-finite numbers).
    pub const SYNTAX: &str = "syntax";
    /// An object (mapping) was expected.
    pub const NOT_AN_OBJECT: &str = "not_an_object";
    /// A required key is absent (or `null`).
    pub const MISSING_KEY: &str = "missing_key";
    /// A key that the format does not know.
    pub const UNKNOWN_KEY: &str = "unknown_key";
    /// A value has the wrong JSON type.
    pub const WRONG_TYPE: &str = "wrong_type";
    /// A value has the right type but is not acceptable (empty, out of range, malformed).
    pub const INVALID_VALUE: &str = "invalid_value";
    /// The step list is empty.
    pub const NO_STEPS: &str = "no_steps";
    /// Two or more steps share a name.
    pub const DUPLICATE_STEP: &str = "duplicate_step";
    /// A step depends on a name that is not a step of the template.
    pub const UNKNOWN_DEPENDENCY: &str = "unknown_dependency";
    /// A step depends on itself.
    pub const SELF_DEPENDENCY: &str = "self_dependency";
    /// The dependencies form a cycle.
    pub const CYCLE: &str = "cycle";
    /// The context schema is not a usable JSON Schema.
    pub const INVALID_SCHEMA: &str = "invalid_schema";
    /// A task context violates the template's context schema.
    pub const SCHEMA: &str = "schema";
}

/// Template version used when a template does not declare one.
pub const DEFAULT_VERSION: &str = "0.1.0";
/// Default for [`StepDefinition::retry_limit`] (maximum number of attempts).
pub const DEFAULT_RETRY_LIMIT: i32 = 3;
/// Default for [`StepDefinition::timeout_ms`] (five minutes).
pub const DEFAULT_TIMEOUT_MS: i64 = 300_000;
/// Largest accepted [`StepDefinition::retry_limit`].
pub const MAX_RETRY_LIMIT: i32 = 100;
/// Largest accepted [`StepDefinition::timeout_ms`] (24 hours).
pub const MAX_TIMEOUT_MS: i64 = 86_400_000;
/// Largest number of steps a template may have.
pub const MAX_STEPS: usize = 10_000;

/// Longest template or step name.
const MAX_NAME_LEN: usize = 128;
/// Longest namespace.
const MAX_NAMESPACE_LEN: usize = 64;
/// Longest handler class name or dependent system name.
const MAX_LABEL_LEN: usize = 256;
/// At most this many cycles are listed individually.
const MAX_REPORTED_CYCLES: usize = 100;
/// Cycles longer than this many steps are shown with the middle elided.
const MAX_CYCLE_NAMES_SHOWN: usize = 40;

/// A validated, normalised template (the project's own format, as stored in the DB as JSON).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TemplateDefinition {
    /// Namespace the template belongs to (1–64 characters, identifier rules).
    pub namespace: String,
    /// Template name, unique within the namespace and version (1–128 characters).
    pub name: String,
    /// Semantic version of the template; `"0.1.0"` when the source does not say.
    pub version: String,
    /// Free-text description.
    pub description: Option<String>,
    /// JSON Schema that task contexts must satisfy; see [`TemplateDefinition::validate_context`].
    pub context_schema: Option<serde_json::Value>,
    /// The steps, in the order of the source file.
    pub steps: Vec<StepDefinition>,
}

/// One step of a [`TemplateDefinition`].
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StepDefinition {
    /// Step name, unique within the template (1–128 characters, identifier rules).
    pub name: String,
    /// Name of the handler that executes the step (for example a Ruby class name).
    pub handler: String,
    /// Free-text description.
    pub description: Option<String>,
    /// Names of the steps that must complete before this one, without duplicates.
    pub depends_on: Vec<String>,
    /// Whether a failed attempt may be retried; default `true`.
    pub retryable: bool,
    /// Maximum number of attempts, `1..=100`; default 3.
    pub retry_limit: i32,
    /// Timeout of one attempt in milliseconds, `1..=86_400_000`; default `300_000`.
    pub timeout_ms: i64,
    /// Handler configuration, any JSON value; default `{}`.
    pub config: serde_json::Value,
    /// Whether the step may be skipped; default `false` (tasker-engine key, kept).
    pub skippable: bool,
    /// External system the step talks to (tasker-engine key, kept).
    pub dependent_system: Option<String>,
}

/// One thing wrong with a template (or with a task context).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Problem {
    /// Where: a template path such as `steps[2].handler` (empty for the whole
    /// document), or a JSON pointer such as `/customer/email` for context problems.
    pub path: String,
    /// What kind of problem; one of the constants in [`codes`].
    pub code: String,
    /// Human-readable explanation.
    pub message: String,
}

impl Problem {
    fn new(path: impl Into<String>, code: &str, message: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            code: code.to_owned(),
            message: message.into(),
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "{} [{}]", self.message, self.code)
        } else {
            write!(f, "{}: {} [{}]", self.path, self.message, self.code)
        }
    }
}

/// Every problem found in a template; never empty when returned as an error.
#[derive(Debug, Clone, thiserror::Error)]
#[error("invalid template: {} problem(s)", .0.len())]
pub struct TemplateError(pub Vec<Problem>);

impl TemplateError {
    /// The problems, in the order they were found.
    #[must_use]
    pub fn problems(&self) -> &[Problem] {
        &self.0
    }
}

/// Parse a template from YAML or JSON text.
///
/// JSON is accepted by the YAML parser (JSON-looking text is tried with the
/// JSON parser first, for better error messages). A syntax error is one
/// [`Problem`] with code `syntax` and the parser's line/column in the message.
/// `environment` selects the tasker-engine `environments.<env>` overrides
/// (e.g. `"development"`); it is ignored by project-format templates.
///
/// Besides plain syntax errors, duplicate keys in one mapping, YAML tags and
/// non-finite numbers are reported as `syntax` problems. YAML merge keys
/// (`<<: *anchor`) are applied.
///
/// # Errors
///
/// Returns every problem found; see [`codes`] for the possible codes.
pub fn parse_template(text: &str, environment: &str) -> Result<TemplateDefinition, TemplateError> {
    let value = parse_document(text).map_err(|problem| TemplateError(vec![problem]))?;
    template_from_value(&value, environment)
}

/// Same as [`parse_template`], from an already-parsed JSON value.
///
/// The format is detected from the top-level keys: a document with
/// `step_templates` or `task_handler_class` is read as a tasker-engine 1.x
/// template, anything else as a project-format template.
///
/// # Errors
///
/// Returns every problem found; see [`codes`] for the possible codes.
pub fn template_from_value(
    value: &serde_json::Value,
    environment: &str,
) -> Result<TemplateDefinition, TemplateError> {
    let mut walker = Walker::default();
    let Some(root) = value.as_object() else {
        let message = if value.is_null() {
            "the template is empty; expected an object (mapping) at the top level".to_owned()
        } else {
            format!(
                "expected an object (mapping) at the top level, found {}",
                kind(value)
            )
        };
        return Err(TemplateError(vec![Problem::new(
            "",
            codes::NOT_AN_OBJECT,
            message,
        )]));
    };
    let legacy = root.contains_key("step_templates") || root.contains_key("task_handler_class");
    let draft = if legacy {
        walk_legacy(&mut walker, root, environment)
    } else {
        walk_project(&mut walker, root)
    };
    check_graph(&mut walker, &draft);
    if walker.problems.is_empty() {
        Ok(draft.into_definition())
    } else {
        Err(TemplateError(walker.problems))
    }
}

/// Validate `instance` against the JSON Schema `schema`, listing every violation.
///
/// Each violation is a [`Problem`] with code `schema`, the JSON pointer of the
/// offending instance location as path (`""` for the root) and the validator's
/// message. `format` keywords (such as `email` or `date-time`) are enforced.
/// A schema that cannot be compiled yields a single `invalid_schema` problem.
///
/// # Errors
///
/// Returns the violations when the instance does not conform.
pub fn validate_against_schema(
    schema: &serde_json::Value,
    instance: &serde_json::Value,
) -> Result<(), Vec<Problem>> {
    let outcome = guarded(|| {
        let validator = compile_schema(schema).map_err(|error| {
            vec![Problem::new(
                "",
                codes::INVALID_SCHEMA,
                format!("the schema cannot be compiled: {error}"),
            )]
        })?;
        let problems: Vec<Problem> = validator
            .iter_errors(instance)
            .map(|error| {
                Problem::new(
                    error.instance_path().as_str(),
                    codes::SCHEMA,
                    error.to_string(),
                )
            })
            .collect();
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    });
    outcome.unwrap_or_else(|| {
        Err(vec![Problem::new(
            "",
            codes::INVALID_SCHEMA,
            "the JSON Schema validator failed unexpectedly on this schema",
        )])
    })
}

impl TemplateDefinition {
    /// Validate a task context against `context_schema`; `Ok` when there is no schema.
    ///
    /// Each violation is a [`Problem`] whose path is the JSON pointer of the
    /// offending instance location (e.g. `"/customer/email"`, `""` for the
    /// root), whose message is the validator's message and whose code is
    /// `schema`.
    ///
    /// # Errors
    ///
    /// Returns every violation; see [`validate_against_schema`].
    pub fn validate_context(&self, context: &serde_json::Value) -> Result<(), Vec<Problem>> {
        match &self.context_schema {
            Some(schema) => validate_against_schema(schema, context),
            None => Ok(()),
        }
    }

    /// The steps in a topological order (parents first), ties broken by file order.
    ///
    /// Among the steps whose dependencies have all been emitted, the one that
    /// comes first in the file is emitted next. Every step appears exactly
    /// once: for a definition that did not come from validation (and so may
    /// contain a cycle), steps that cannot be ordered are appended in file
    /// order; dependencies naming no step are ignored.
    pub fn topological_order(&self) -> Vec<&StepDefinition> {
        let n = self.steps.len();
        let mut index: HashMap<&str, usize> = HashMap::with_capacity(n);
        for (i, step) in self.steps.iter().enumerate() {
            index.entry(step.name.as_str()).or_insert(i);
        }
        let mut children: Vec<Vec<usize>> = vec![Vec::new(); n];
        let mut pending = vec![0_usize; n];
        for (i, step) in self.steps.iter().enumerate() {
            let mut seen = HashSet::new();
            for dep in &step.depends_on {
                if let Some(&parent) = index.get(dep.as_str())
                    && parent != i
                    && seen.insert(parent)
                {
                    children[parent].push(i);
                    pending[i] += 1;
                }
            }
        }
        let mut ready: BinaryHeap<Reverse<usize>> =
            (0..n).filter(|&i| pending[i] == 0).map(Reverse).collect();
        let mut emitted = vec![false; n];
        let mut order = Vec::with_capacity(n);
        while let Some(Reverse(i)) = ready.pop() {
            emitted[i] = true;
            order.push(&self.steps[i]);
            for &child in &children[i] {
                pending[child] -= 1;
                if pending[child] == 0 {
                    ready.push(Reverse(child));
                }
            }
        }
        if order.len() < n {
            order.extend(
                self.steps
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| !emitted[*i])
                    .map(|(_, step)| step),
            );
        }
        order
    }
}

// ---------------------------------------------------------------------------
// Text parsing
// ---------------------------------------------------------------------------

/// Parse the text into a JSON value, rejecting duplicate keys.
fn parse_document(text: &str) -> Result<Value, Problem> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let looks_like_json = matches!(text.trim_start().chars().next(), Some('{' | '['));
    if looks_like_json {
        match serde_json::from_str::<StrictValue<false>>(text) {
            Ok(StrictValue(value)) => return Ok(value),
            Err(json_error) => {
                // Flow-style YAML (`{a: 1}`) is not JSON; give YAML a chance
                // but report the JSON error, which is the likelier intent.
                return match yaml_serde::from_str::<StrictValue<true>>(text) {
                    Ok(StrictValue(value)) => Ok(value),
                    Err(_) => Err(Problem::new(
                        "",
                        codes::SYNTAX,
                        format!("JSON syntax error: {json_error}"),
                    )),
                };
            }
        }
    }
    yaml_serde::from_str::<StrictValue<true>>(text)
        .map(|StrictValue(value)| value)
        .map_err(|error| {
            let mut message = format!("YAML syntax error: {error}");
            if let Some(location) = error.location()
                && !message.contains(" line ")
            {
                let _ = write!(
                    message,
                    " at line {} column {}",
                    location.line(),
                    location.column()
                );
            }
            Problem::new("", codes::SYNTAX, message)
        })
}

/// A JSON value deserialised strictly: duplicate keys and non-finite numbers
/// are errors. With `YAML`, merge keys (`<<`) are applied.
struct StrictValue<const YAML: bool>(Value);

impl<'de, const YAML: bool> Deserialize<'de> for StrictValue<YAML> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer
            .deserialize_any(StrictVisitor::<YAML>)
            .map(StrictValue)
    }
}

struct StrictVisitor<const YAML: bool>;

impl<'de, const YAML: bool> Visitor<'de> for StrictVisitor<YAML> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON-compatible value (null, boolean, number, string, list or mapping)")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_i128<E: de::Error>(self, v: i128) -> Result<Value, E> {
        if let Ok(small) = i64::try_from(v) {
            Ok(Value::Number(small.into()))
        } else if let Ok(small) = u64::try_from(v) {
            Ok(Value::Number(small.into()))
        } else {
            // Like serde_json: integers beyond 64 bits become floats.
            #[allow(clippy::cast_precision_loss)]
            let approximate = v as f64;
            self.visit_f64(approximate)
        }
    }

    fn visit_u128<E: de::Error>(self, v: u128) -> Result<Value, E> {
        match u64::try_from(v) {
            Ok(small) => Ok(Value::Number(small.into())),
            Err(_) => {
                #[allow(clippy::cast_precision_loss)]
                let approximate = v as f64;
                self.visit_f64(approximate)
            }
        }
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        Number::from_f64(v)
            .map(Value::Number)
            .ok_or_else(|| E::custom(format!("the number {v} is not supported (not finite)")))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_none<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        StrictValue::<YAML>::deserialize(deserializer).map(|StrictValue(value)| value)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
        while let Some(StrictValue(item)) = seq.next_element::<StrictValue<YAML>>()? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut object = Map::new();
        let mut merges = Vec::new();
        while let Some(key) = map.next_key::<String>()? {
            let StrictValue(value) = map.next_value::<StrictValue<YAML>>()?;
            if YAML && key == "<<" {
                merges.push(value);
                continue;
            }
            if object.contains_key(&key) {
                // The YAML parser places the error at the start of the
                // mapping; the JSON parser just after the repeated entry.
                let message = if YAML {
                    format!("duplicate key `{key}` in the mapping that starts")
                } else {
                    format!("duplicate key `{key}`")
                };
                return Err(de::Error::custom(message));
            }
            object.insert(key, value);
        }
        // YAML merge keys: explicit keys win, then earlier merged mappings win.
        for merge in merges {
            let sources = match merge {
                Value::Object(source) => vec![source],
                Value::Array(items) => {
                    let mut sources = Vec::with_capacity(items.len());
                    for item in items {
                        match item {
                            Value::Object(source) => sources.push(source),
                            _ => return Err(merge_error()),
                        }
                    }
                    sources
                }
                _ => return Err(merge_error()),
            };
            for source in sources {
                for (key, value) in source {
                    object.entry(key).or_insert(value);
                }
            }
        }
        Ok(Value::Object(object))
    }
}

fn merge_error<E: de::Error>() -> E {
    E::custom("the merge key `<<` needs a mapping or a list of mappings")
}

// ---------------------------------------------------------------------------
// JSON Schema helpers
// ---------------------------------------------------------------------------

fn compile_schema(
    schema: &Value,
) -> Result<jsonschema::Validator, jsonschema::ValidationError<'static>> {
    jsonschema::options()
        .should_validate_formats(true)
        .build(schema)
}

/// Run `f`, turning a panic inside the JSON Schema library into `None`.
fn guarded<T>(f: impl FnOnce() -> T) -> Option<T> {
    panic::catch_unwind(AssertUnwindSafe(f)).ok()
}

/// Every reason why `schema` is not a usable JSON Schema (empty when it is).
fn schema_problems(schema: &Value) -> Vec<String> {
    let outcome = guarded(|| {
        let meta = match jsonschema::meta::validator_for(schema) {
            Ok(meta) => meta,
            Err(error) => {
                return vec![format!("cannot determine the JSON Schema dialect: {error}")];
            }
        };
        let reasons: Vec<String> = meta
            .iter_errors(schema)
            .map(|error| describe_schema_error(&error))
            .collect();
        if !reasons.is_empty() {
            return reasons;
        }
        match compile_schema(schema) {
            Ok(_) => Vec::new(),
            Err(error) => vec![describe_schema_error(&error)],
        }
    });
    outcome.unwrap_or_else(|| vec!["the JSON Schema validator failed unexpectedly".to_owned()])
}

fn describe_schema_error(error: &jsonschema::ValidationError<'_>) -> String {
    let pointer = error.instance_path().as_str();
    if pointer.is_empty() {
        error.to_string()
    } else {
        format!("{error} (at `{pointer}`)")
    }
}

// ---------------------------------------------------------------------------
// Document walking
// ---------------------------------------------------------------------------

const PROJECT_TOP_KEYS: &[&str] = &[
    "namespace",
    "name",
    "version",
    "description",
    "context_schema",
    "defaults",
    "steps",
];
const PROJECT_TOP_HINTS: &[(&str, &str)] = &[
    ("namespace_name", "namespace"),
    ("schema", "context_schema"),
];
const PROJECT_DEFAULT_KEYS: &[&str] = &["retryable", "retry_limit", "timeout_ms"];
const PROJECT_DEFAULT_HINTS: &[(&str, &str)] = &[
    ("default_retryable", "retryable"),
    ("default_retry_limit", "retry_limit"),
    ("timeout_seconds", "timeout_ms"),
];
const PROJECT_STEP_KEYS: &[&str] = &[
    "name",
    "handler",
    "description",
    "depends_on",
    "retryable",
    "retry_limit",
    "timeout_ms",
    "config",
    "skippable",
    "dependent_system",
];
const PROJECT_STEP_HINTS: &[(&str, &str)] = &[
    ("handler_class", "handler"),
    ("handler_config", "config"),
    ("depends_on_step", "depends_on"),
    ("depends_on_steps", "depends_on"),
    ("default_retryable", "retryable"),
    ("default_retry_limit", "retry_limit"),
    ("timeout_seconds", "timeout_ms"),
];
const LEGACY_TOP_KEYS: &[&str] = &[
    "name",
    "task_handler_class",
    "step_templates",
    "namespace_name",
    "version",
    "module_namespace",
    "concurrent",
    "default_dependent_system",
    "named_steps",
    "description",
    "schema",
    "environments",
];
const LEGACY_TOP_HINTS: &[(&str, &str)] = &[
    ("namespace", "namespace_name"),
    ("context_schema", "schema"),
    ("steps", "step_templates"),
];
const LEGACY_STEP_KEYS: &[&str] = &[
    "name",
    "handler_class",
    "description",
    "dependent_system",
    "default_retryable",
    "default_retry_limit",
    "skippable",
    "depends_on_step",
    "depends_on_steps",
    "handler_config",
    "custom_events",
];
const LEGACY_STEP_HINTS: &[(&str, &str)] = &[
    ("handler", "handler_class"),
    ("config", "handler_config"),
    ("depends_on", "depends_on_steps"),
    ("retryable", "default_retryable"),
    ("retry_limit", "default_retry_limit"),
];
const LEGACY_EVENT_KEYS: &[&str] = &["name", "description"];
const LEGACY_ENVIRONMENT_KEYS: &[&str] = &["step_templates"];
const LEGACY_OVERRIDE_KEYS: &[&str] = &["name", "handler_config"];

/// A dependency reference as written in the source.
struct Dep {
    name: String,
    path: String,
}

/// A step as read from the source, before the graph checks.
struct StepDraft {
    /// Path of the step itself, e.g. `steps[2]`.
    path: String,
    /// Name used for the graph (present even when the name was reported as invalid).
    name: Option<String>,
    name_path: String,
    handler: Option<String>,
    description: Option<String>,
    deps: Vec<Dep>,
    retryable: bool,
    retry_limit: i32,
    timeout_ms: i64,
    config: Value,
    skippable: bool,
    dependent_system: Option<String>,
}

/// A template as read from the source, before the graph checks.
struct Draft {
    namespace: Option<String>,
    name: Option<String>,
    version: String,
    description: Option<String>,
    context_schema: Option<Value>,
    steps: Vec<StepDraft>,
}

impl Draft {
    /// Only called when no problem was found, so every required field is set.
    fn into_definition(self) -> TemplateDefinition {
        TemplateDefinition {
            namespace: self.namespace.unwrap_or_default(),
            name: self.name.unwrap_or_default(),
            version: self.version,
            description: self.description,
            context_schema: self.context_schema,
            steps: self
                .steps
                .into_iter()
                .map(|step| StepDefinition {
                    name: step.name.unwrap_or_default(),
                    handler: step.handler.unwrap_or_default(),
                    description: step.description,
                    depends_on: step.deps.into_iter().map(|dep| dep.name).collect(),
                    retryable: step.retryable,
                    retry_limit: step.retry_limit,
                    timeout_ms: step.timeout_ms,
                    config: step.config,
                    skippable: step.skippable,
                    dependent_system: step.dependent_system,
                })
                .collect(),
        }
    }
}

/// Step settings that `defaults` (project format) can change.
#[derive(Clone, Copy)]
struct StepDefaults {
    retryable: bool,
    retry_limit: i32,
    timeout_ms: i64,
}

impl Default for StepDefaults {
    fn default() -> Self {
        Self {
            retryable: true,
            retry_limit: DEFAULT_RETRY_LIMIT,
            timeout_ms: DEFAULT_TIMEOUT_MS,
        }
    }
}

/// Collects problems while walking a document.
#[derive(Default)]
struct Walker {
    problems: Vec<Problem>,
}

/// The value of `key`, treating an explicit `null` like an absent key.
fn field<'a>(object: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    object.get(key).filter(|value| !value.is_null())
}

/// Path of `key` inside the object at `parent`.
fn join(parent: &str, key: &str) -> String {
    let plain = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if !plain {
        format!("{parent}[{}]", Value::String(key.to_owned()))
    } else if parent.is_empty() {
        key.to_owned()
    } else {
        format!("{parent}.{key}")
    }
}

/// Path of item `index` of the list at `parent`.
fn item(parent: &str, index: usize) -> String {
    format!("{parent}[{index}]")
}

/// Describes the JSON type of a value for messages.
fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(number) if number.is_f64() => "a number",
        Value::Number(_) => "an integer",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// Levenshtein distance between two short strings.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    let mut current = vec![0; b.len() + 1];
    for (i, ca) in a.chars().enumerate() {
        current[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let substitution = previous[j] + usize::from(ca != *cb);
            current[j + 1] = substitution.min(previous[j + 1] + 1).min(current[j] + 1);
        }
        std::mem::swap(&mut previous, &mut current);
    }
    previous[b.len()]
}

/// The known key to suggest for an unknown one, if any.
fn suggestion<'k>(key: &str, known: &[&'k str], hints: &[(&str, &'k str)]) -> Option<&'k str> {
    if let Some((_, target)) = hints.iter().find(|(from, _)| *from == key) {
        return Some(target);
    }
    known
        .iter()
        .map(|candidate| (edit_distance(key, candidate), *candidate))
        .filter(|(distance, _)| *distance <= 2)
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, candidate)| candidate)
}

/// Why `value` breaks the identifier rule, if it does.
fn identifier_error(value: &str, max_len: usize) -> Option<String> {
    let length = value.chars().count();
    let mut chars = value.chars();
    let first = chars.next()?;
    if length > max_len {
        return Some(format!(
            "is {length} characters long; at most {max_len} are allowed"
        ));
    }
    if !first.is_ascii_alphanumeric() {
        return Some(format!(
            "must start with an ASCII letter or digit, not `{}`",
            first.escape_default()
        ));
    }
    chars
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')))
        .map(|bad| {
            format!(
                "contains `{}`; only ASCII letters, digits, `_`, `-` and `.` are allowed",
                bad.escape_default()
            )
        })
}

impl Walker {
    fn report(&mut self, path: impl Into<String>, code: &str, message: impl Into<String>) {
        self.problems.push(Problem::new(path, code, message));
    }

    fn not_an_object(&mut self, path: &str, value: &Value, what: &str) {
        self.report(
            path,
            codes::NOT_AN_OBJECT,
            format!("{what} must be an object (mapping), found {}", kind(value)),
        );
    }

    fn wrong_type(&mut self, path: &str, expected: &str, value: &Value) {
        self.report(
            path,
            codes::WRONG_TYPE,
            format!("expected {expected}, found {}", kind(value)),
        );
    }

    fn unknown_keys(
        &mut self,
        object: &Map<String, Value>,
        parent: &str,
        known: &[&str],
        hints: &[(&str, &str)],
    ) {
        for key in object.keys() {
            if known.contains(&key.as_str()) {
                continue;
            }
            let message = match suggestion(key, known, hints) {
                Some(candidate) => format!("unknown key `{key}`; did you mean `{candidate}`?"),
                None => format!(
                    "unknown key `{key}`; allowed keys here: {}",
                    known.join(", ")
                ),
            };
            self.report(join(parent, key), codes::UNKNOWN_KEY, message);
        }
    }

    /// A required key; reports `missing_key` when absent or null.
    fn required<'a>(
        &mut self,
        object: &'a Map<String, Value>,
        parent: &str,
        key: &str,
        what: &str,
    ) -> Option<&'a Value> {
        let value = field(object, key);
        if value.is_none() {
            let message = if what.replace(' ', "_") == key {
                format!("missing required key `{key}`")
            } else {
                format!("missing required key `{key}` ({what})")
            };
            self.report(join(parent, key), codes::MISSING_KEY, message);
        }
        value
    }

    fn string<'a>(&mut self, value: &'a Value, path: &str) -> Option<&'a str> {
        let text = value.as_str();
        if text.is_none() {
            self.wrong_type(path, "a string", value);
        }
        text
    }

    fn optional_string<'a>(
        &mut self,
        object: &'a Map<String, Value>,
        parent: &str,
        key: &str,
    ) -> Option<&'a str> {
        field(object, key).and_then(|value| self.string(value, &join(parent, key)))
    }

    fn optional_bool(
        &mut self,
        object: &Map<String, Value>,
        parent: &str,
        key: &str,
    ) -> Option<bool> {
        let value = field(object, key)?;
        let flag = value.as_bool();
        if flag.is_none() {
            self.wrong_type(&join(parent, key), "a boolean (true or false)", value);
        }
        flag
    }

    fn optional_int(
        &mut self,
        object: &Map<String, Value>,
        parent: &str,
        key: &str,
        min: i64,
        max: i64,
    ) -> Option<i64> {
        let value = field(object, key)?;
        let path = join(parent, key);
        let out_of_range = |this: &mut Self, shown: &dyn fmt::Display| {
            this.report(
                path.as_str(),
                codes::INVALID_VALUE,
                format!("`{key}` must be between {min} and {max}, got {shown}"),
            );
        };
        match value {
            Value::Number(number) => {
                if let Some(int) = number.as_i64() {
                    if (min..=max).contains(&int) {
                        return Some(int);
                    }
                    out_of_range(self, &int);
                } else if number.is_u64() {
                    out_of_range(self, number);
                } else {
                    self.report(
                        path.as_str(),
                        codes::WRONG_TYPE,
                        format!("expected an integer, found the number {number}"),
                    );
                }
            }
            _ => self.wrong_type(&path, "an integer", value),
        }
        None
    }

    fn check_identifier(&mut self, value: &str, path: &str, what: &str, max_len: usize) {
        if value.is_empty() {
            self.report(
                path,
                codes::INVALID_VALUE,
                format!("{what} must not be empty"),
            );
        } else if let Some(reason) = identifier_error(value, max_len) {
            self.report(
                path,
                codes::INVALID_VALUE,
                format!("{what} `{value}` {reason}"),
            );
        }
    }

    /// Handler class names and dependent systems: non-empty, at most 256
    /// characters, no control characters.
    fn check_label(&mut self, value: &str, path: &str, what: &str) {
        let length = value.chars().count();
        if value.trim().is_empty() {
            self.report(
                path,
                codes::INVALID_VALUE,
                format!("{what} must not be empty"),
            );
        } else if length > MAX_LABEL_LEN {
            self.report(
                path,
                codes::INVALID_VALUE,
                format!("{what} is {length} characters long; at most {MAX_LABEL_LEN} are allowed"),
            );
        } else if let Some(bad) = value.chars().find(|c| c.is_control()) {
            self.report(
                path,
                codes::INVALID_VALUE,
                format!(
                    "{what} contains the control character `{}`",
                    bad.escape_default()
                ),
            );
        }
    }

    /// A required identifier (namespace, template name).
    fn required_identifier(
        &mut self,
        object: &Map<String, Value>,
        parent: &str,
        key: &str,
        what: &str,
        max_len: usize,
    ) -> Option<String> {
        let value = self.required(object, parent, key, what)?;
        let path = join(parent, key);
        let text = self.string(value, &path)?;
        self.check_identifier(text, &path, what, max_len);
        Some(text.to_owned())
    }

    /// A step name. A number or boolean is reported as `wrong_type` but its
    /// text is still used for the dependency checks, to avoid follow-on noise.
    fn step_name(&mut self, object: &Map<String, Value>, parent: &str) -> Option<String> {
        let value = self.required(object, parent, "name", "the step name")?;
        let path = join(parent, "name");
        match value {
            Value::String(text) => {
                self.check_identifier(text, &path, "step name", MAX_NAME_LEN);
                Some(text.clone())
            }
            Value::Number(_) | Value::Bool(_) => {
                self.report(
                    path.as_str(),
                    codes::WRONG_TYPE,
                    format!(
                        "expected a string, found {}; quote the step name",
                        kind(value)
                    ),
                );
                Some(value.to_string())
            }
            _ => {
                self.wrong_type(&path, "a string", value);
                None
            }
        }
    }

    fn required_label(
        &mut self,
        object: &Map<String, Value>,
        parent: &str,
        key: &str,
        what: &str,
    ) -> Option<String> {
        let value = self.required(object, parent, key, what)?;
        let path = join(parent, key);
        let text = self.string(value, &path)?;
        self.check_label(text, &path, what);
        Some(text.to_owned())
    }

    fn optional_label(
        &mut self,
        object: &Map<String, Value>,
        parent: &str,
        key: &str,
        what: &str,
    ) -> Option<String> {
        let text = self.optional_string(object, parent, key)?;
        self.check_label(text, &join(parent, key), what);
        Some(text.to_owned())
    }

    fn version(&mut self, object: &Map<String, Value>, parent: &str) -> String {
        let Some(value) = field(object, "version") else {
            return DEFAULT_VERSION.to_owned();
        };
        let path = join(parent, "version");
        match value {
            Value::String(text) => {
                if let Err(error) = semver::Version::parse(text) {
                    self.report(
                        path,
                        codes::INVALID_VALUE,
                        format!(
                            "version `{text}` is not a semantic version (MAJOR.MINOR.PATCH, e.g. \"1.0.0\"): {error}"
                        ),
                    );
                }
                text.clone()
            }
            Value::Number(_) => {
                self.report(
                    path,
                    codes::WRONG_TYPE,
                    format!(
                        "expected a string, found the number {value}; write the version as a quoted semantic version, e.g. \"1.0.0\""
                    ),
                );
                DEFAULT_VERSION.to_owned()
            }
            _ => {
                self.wrong_type(&path, "a string", value);
                DEFAULT_VERSION.to_owned()
            }
        }
    }

    fn context_schema(&mut self, object: &Map<String, Value>, key: &str) -> Option<Value> {
        let value = field(object, key)?;
        if !value.is_object() {
            self.not_an_object(key, value, "the context schema");
            return None;
        }
        for reason in schema_problems(value) {
            self.report(
                key,
                codes::INVALID_SCHEMA,
                format!("not a valid JSON Schema: {reason}"),
            );
        }
        Some(value.clone())
    }

    /// The step list: present, a list, non-empty, not too long.
    fn step_list<'a>(&mut self, object: &'a Map<String, Value>, key: &str) -> Option<&'a [Value]> {
        let value = self.required(object, "", key, "the list of steps")?;
        let Some(list) = value.as_array() else {
            self.wrong_type(key, "a list of steps", value);
            return None;
        };
        if list.is_empty() {
            self.report(key, codes::NO_STEPS, "a template needs at least one step");
        } else if list.len() > MAX_STEPS {
            self.report(
                key,
                codes::INVALID_VALUE,
                format!(
                    "a template may have at most {MAX_STEPS} steps, this one has {}",
                    list.len()
                ),
            );
        }
        Some(list)
    }

    /// A list of names (each a non-empty string).
    fn name_list(&mut self, value: &Value, path: &str, what: &str) -> Vec<Dep> {
        let Some(list) = value.as_array() else {
            let hint = if value.is_string() {
                "; write a single name as a one-item list, e.g. `[name]`"
            } else {
                ""
            };
            self.report(
                path,
                codes::WRONG_TYPE,
                format!("expected a list of {what}, found {}{hint}", kind(value)),
            );
            return Vec::new();
        };
        let mut names = Vec::with_capacity(list.len());
        for (index, entry) in list.iter().enumerate() {
            let entry_path = item(path, index);
            if let Some(name) = self.string(entry, &entry_path) {
                if name.is_empty() {
                    self.report(
                        entry_path,
                        codes::INVALID_VALUE,
                        "a step name must not be empty",
                    );
                } else {
                    names.push(Dep {
                        name: name.to_owned(),
                        path: entry_path,
                    });
                }
            }
        }
        names
    }

    /// Handler configuration: anything; absent or null means `{}`.
    fn config(object: &Map<String, Value>, key: &str) -> Value {
        field(object, key)
            .cloned()
            .unwrap_or_else(|| Value::Object(Map::new()))
    }
}

/// Removes repeated dependency names, keeping the first occurrence.
fn dedup_deps(deps: Vec<Dep>) -> Vec<Dep> {
    let mut seen = HashSet::new();
    deps.into_iter()
        .filter(|dep| seen.insert(dep.name.clone()))
        .collect()
}

fn walk_project(w: &mut Walker, root: &Map<String, Value>) -> Draft {
    w.unknown_keys(root, "", PROJECT_TOP_KEYS, PROJECT_TOP_HINTS);
    let namespace = w.required_identifier(root, "", "namespace", "namespace", MAX_NAMESPACE_LEN);
    let name = w.required_identifier(root, "", "name", "template name", MAX_NAME_LEN);
    let version = w.version(root, "");
    let description = w
        .optional_string(root, "", "description")
        .map(str::to_owned);
    let context_schema = w.context_schema(root, "context_schema");

    let mut defaults = StepDefaults::default();
    if let Some(value) = field(root, "defaults") {
        match value.as_object() {
            Some(object) => {
                w.unknown_keys(
                    object,
                    "defaults",
                    PROJECT_DEFAULT_KEYS,
                    PROJECT_DEFAULT_HINTS,
                );
                if let Some(flag) = w.optional_bool(object, "defaults", "retryable") {
                    defaults.retryable = flag;
                }
                if let Some(limit) = retry_limit(w, object, "defaults", "retry_limit") {
                    defaults.retry_limit = limit;
                }
                if let Some(timeout) =
                    w.optional_int(object, "defaults", "timeout_ms", 1, MAX_TIMEOUT_MS)
                {
                    defaults.timeout_ms = timeout;
                }
            }
            None => w.not_an_object("defaults", value, "`defaults`"),
        }
    }

    let mut steps = Vec::new();
    if let Some(list) = w.step_list(root, "steps") {
        steps.reserve(list.len());
        for (index, value) in list.iter().enumerate() {
            let path = item("steps", index);
            match value.as_object() {
                Some(object) => steps.push(walk_project_step(w, object, path, defaults)),
                None => w.not_an_object(&path, value, "a step"),
            }
        }
    }

    Draft {
        namespace,
        name,
        version,
        description,
        context_schema,
        steps,
    }
}

fn retry_limit(
    w: &mut Walker,
    object: &Map<String, Value>,
    parent: &str,
    key: &str,
) -> Option<i32> {
    w.optional_int(object, parent, key, 1, i64::from(MAX_RETRY_LIMIT))
        .and_then(|limit| i32::try_from(limit).ok())
}

fn walk_project_step(
    w: &mut Walker,
    object: &Map<String, Value>,
    path: String,
    defaults: StepDefaults,
) -> StepDraft {
    w.unknown_keys(object, &path, PROJECT_STEP_KEYS, PROJECT_STEP_HINTS);
    let name = w.step_name(object, &path);
    let handler = w.required_label(object, &path, "handler", "handler");
    let description = w
        .optional_string(object, &path, "description")
        .map(str::to_owned);
    let deps = match field(object, "depends_on") {
        Some(value) => dedup_deps(w.name_list(value, &join(&path, "depends_on"), "step names")),
        None => Vec::new(),
    };
    let retryable = w
        .optional_bool(object, &path, "retryable")
        .unwrap_or(defaults.retryable);
    let retry_limit = retry_limit(w, object, &path, "retry_limit").unwrap_or(defaults.retry_limit);
    let timeout_ms = w
        .optional_int(object, &path, "timeout_ms", 1, MAX_TIMEOUT_MS)
        .unwrap_or(defaults.timeout_ms);
    let skippable = w.optional_bool(object, &path, "skippable").unwrap_or(false);
    let dependent_system = w.optional_label(object, &path, "dependent_system", "dependent system");
    StepDraft {
        name_path: join(&path, "name"),
        path,
        name,
        handler,
        description,
        deps,
        retryable,
        retry_limit,
        timeout_ms,
        config: Walker::config(object, "config"),
        skippable,
        dependent_system,
    }
}

fn walk_legacy(w: &mut Walker, root: &Map<String, Value>, environment: &str) -> Draft {
    w.unknown_keys(root, "", LEGACY_TOP_KEYS, LEGACY_TOP_HINTS);
    let name = w.required_identifier(root, "", "name", "template name", MAX_NAME_LEN);
    w.required_label(root, "", "task_handler_class", "task handler class");
    let namespace = match field(root, "namespace_name") {
        Some(value) => w.string(value, "namespace_name").map(|text| {
            w.check_identifier(text, "namespace_name", "namespace", MAX_NAMESPACE_LEN);
            text.to_owned()
        }),
        None => Some("default".to_owned()),
    };
    let version = w.version(root, "");
    w.optional_string(root, "", "module_namespace");
    w.optional_bool(root, "", "concurrent");
    let default_system = w.optional_label(
        root,
        "",
        "default_dependent_system",
        "default dependent system",
    );
    if let Some(value) = field(root, "named_steps") {
        w.name_list(value, "named_steps", "step names");
    }
    let description = w
        .optional_string(root, "", "description")
        .map(str::to_owned);
    let context_schema = w.context_schema(root, "schema");

    let mut steps = Vec::new();
    if let Some(list) = w.step_list(root, "step_templates") {
        steps.reserve(list.len());
        for (index, value) in list.iter().enumerate() {
            let path = item("step_templates", index);
            match value.as_object() {
                Some(object) => {
                    steps.push(walk_legacy_step(w, object, path, default_system.as_deref()));
                }
                None => w.not_an_object(&path, value, "a step template"),
            }
        }
    }

    if let Some(value) = field(root, "environments") {
        walk_environments(w, value, environment, &mut steps);
    }

    Draft {
        namespace,
        name,
        version,
        description,
        context_schema,
        steps,
    }
}

fn walk_legacy_step(
    w: &mut Walker,
    object: &Map<String, Value>,
    path: String,
    default_system: Option<&str>,
) -> StepDraft {
    w.unknown_keys(object, &path, LEGACY_STEP_KEYS, LEGACY_STEP_HINTS);
    let name = w.step_name(object, &path);
    let handler = w.required_label(object, &path, "handler_class", "handler class");
    let description = w
        .optional_string(object, &path, "description")
        .map(str::to_owned);
    let dependent_system = w
        .optional_label(object, &path, "dependent_system", "dependent system")
        .or_else(|| default_system.map(str::to_owned));
    let retryable = w
        .optional_bool(object, &path, "default_retryable")
        .unwrap_or(true);
    let retry_limit =
        retry_limit(w, object, &path, "default_retry_limit").unwrap_or(DEFAULT_RETRY_LIMIT);
    let skippable = w.optional_bool(object, &path, "skippable").unwrap_or(false);

    let mut deps = Vec::new();
    if let Some(value) = field(object, "depends_on_step") {
        let dep_path = join(&path, "depends_on_step");
        if let Some(dep) = w.string(value, &dep_path) {
            if dep.is_empty() {
                w.report(
                    dep_path,
                    codes::INVALID_VALUE,
                    "a step name must not be empty",
                );
            } else {
                deps.push(Dep {
                    name: dep.to_owned(),
                    path: dep_path,
                });
            }
        }
    }
    if let Some(value) = field(object, "depends_on_steps") {
        deps.extend(w.name_list(value, &join(&path, "depends_on_steps"), "step names"));
    }

    if let Some(value) = field(object, "custom_events") {
        walk_custom_events(w, value, &join(&path, "custom_events"));
    }

    StepDraft {
        name_path: join(&path, "name"),
        path,
        name,
        handler,
        description,
        deps: dedup_deps(deps),
        retryable,
        retry_limit,
        timeout_ms: DEFAULT_TIMEOUT_MS,
        config: Walker::config(object, "handler_config"),
        skippable,
        dependent_system,
    }
}

/// `custom_events`: a list of `{name, description}`; checked, then ignored.
fn walk_custom_events(w: &mut Walker, value: &Value, path: &str) {
    let Some(list) = value.as_array() else {
        w.wrong_type(path, "a list of events", value);
        return;
    };
    for (index, event) in list.iter().enumerate() {
        let event_path = item(path, index);
        let Some(object) = event.as_object() else {
            w.not_an_object(&event_path, event, "a custom event");
            continue;
        };
        w.unknown_keys(object, &event_path, LEGACY_EVENT_KEYS, &[]);
        w.required_label(object, &event_path, "name", "event name");
        w.optional_string(object, &event_path, "description");
    }
}

/// `environments`: checks every environment; merges the selected one's
/// `handler_config` overrides into the steps.
fn walk_environments(w: &mut Walker, value: &Value, environment: &str, steps: &mut [StepDraft]) {
    let Some(environments) = value.as_object() else {
        w.not_an_object("environments", value, "`environments`");
        return;
    };
    let names: HashSet<&str> = steps
        .iter()
        .filter_map(|step| step.name.as_deref())
        .collect();
    let mut overrides: Vec<(String, Value)> = Vec::new();
    for (env_name, env_value) in environments {
        let env_path = join("environments", env_name);
        if env_value.is_null() {
            continue;
        }
        let Some(env_object) = env_value.as_object() else {
            w.not_an_object(&env_path, env_value, "an environment");
            continue;
        };
        w.unknown_keys(env_object, &env_path, LEGACY_ENVIRONMENT_KEYS, &[]);
        let Some(list_value) = field(env_object, "step_templates") else {
            continue;
        };
        let list_path = join(&env_path, "step_templates");
        let Some(list) = list_value.as_array() else {
            w.wrong_type(&list_path, "a list of step overrides", list_value);
            continue;
        };
        for (index, entry) in list.iter().enumerate() {
            let entry_path = item(&list_path, index);
            let Some(entry_object) = entry.as_object() else {
                w.not_an_object(&entry_path, entry, "a step override");
                continue;
            };
            w.unknown_keys(entry_object, &entry_path, LEGACY_OVERRIDE_KEYS, &[]);
            let Some(name_value) =
                w.required(entry_object, &entry_path, "name", "the step to override")
            else {
                continue;
            };
            let name_path = join(&entry_path, "name");
            let Some(step_name) = w.string(name_value, &name_path) else {
                continue;
            };
            if !names.contains(step_name) {
                w.report(
                    name_path,
                    codes::INVALID_VALUE,
                    format!(
                        "environment `{env_name}` overrides step `{step_name}`, which is not defined in `step_templates`"
                    ),
                );
                continue;
            }
            if env_name == environment
                && let Some(config) = field(entry_object, "handler_config")
            {
                overrides.push((step_name.to_owned(), config.clone()));
            }
        }
    }
    for (step_name, config) in overrides {
        for step in steps
            .iter_mut()
            .filter(|step| step.name.as_deref() == Some(step_name.as_str()))
        {
            deep_merge(&mut step.config, &config);
        }
    }
}

/// Merges `overlay` into `base`: objects merge key by key, recursively; any
/// other overlay value replaces the base value.
fn deep_merge(base: &mut Value, overlay: &Value) {
    match (base, overlay) {
        (Value::Object(base_map), Value::Object(overlay_map)) => {
            for (key, value) in overlay_map {
                match base_map.get_mut(key) {
                    Some(existing) => deep_merge(existing, value),
                    None => {
                        base_map.insert(key.clone(), value.clone());
                    }
                }
            }
        }
        (base, overlay) => *base = overlay.clone(),
    }
}

// ---------------------------------------------------------------------------
// Graph checks
// ---------------------------------------------------------------------------

/// Duplicate names, unknown and self dependencies, cycles.
fn check_graph(w: &mut Walker, draft: &Draft) {
    let steps = &draft.steps;
    let mut positions: HashMap<&str, Vec<usize>> = HashMap::with_capacity(steps.len());
    let mut first_seen: Vec<&str> = Vec::new();
    for (i, step) in steps.iter().enumerate() {
        if let Some(name) = step.name.as_deref() {
            let entry = positions.entry(name).or_default();
            if entry.is_empty() {
                first_seen.push(name);
            }
            entry.push(i);
        }
    }
    for name in first_seen {
        let Some(at) = positions.get(name) else {
            continue;
        };
        if let [_, second, ..] = at.as_slice() {
            let places: Vec<&str> = at.iter().map(|&i| steps[i].path.as_str()).collect();
            w.report(
                steps[*second].name_path.as_str(),
                codes::DUPLICATE_STEP,
                format!(
                    "step name `{name}` is used {} times ({})",
                    at.len(),
                    places.join(", ")
                ),
            );
        }
    }

    // Edges run parent -> child ("runs before"); `closing[child]` keeps, for
    // each parent, the path of the reference that created the edge.
    let mut children: Vec<Vec<usize>> = vec![Vec::new(); steps.len()];
    let mut references: Vec<Vec<(usize, &str)>> = vec![Vec::new(); steps.len()];
    for (i, step) in steps.iter().enumerate() {
        let own = step.name.as_deref().unwrap_or("(unnamed)");
        for dep in &step.deps {
            if step.name.as_deref() == Some(dep.name.as_str()) {
                w.report(
                    dep.path.as_str(),
                    codes::SELF_DEPENDENCY,
                    format!("step `{own}` depends on itself"),
                );
                continue;
            }
            match positions.get(dep.name.as_str()).and_then(|at| at.first()) {
                Some(&parent) => {
                    children[parent].push(i);
                    references[i].push((parent, dep.path.as_str()));
                }
                None => w.report(
                    dep.path.as_str(),
                    codes::UNKNOWN_DEPENDENCY,
                    format!(
                        "step `{own}` depends on `{}`, which is not a step of this template",
                        dep.name
                    ),
                ),
            }
        }
    }
    for list in &mut children {
        list.sort_unstable();
        list.dedup();
    }

    let (cycles, more) = elementary_cycles(&children, MAX_REPORTED_CYCLES);
    for cycle in &cycles {
        let (Some(&first), Some(&last)) = (cycle.first(), cycle.last()) else {
            continue;
        };
        let path = references[first]
            .iter()
            .find(|(parent, _)| *parent == last)
            .map_or(steps[first].path.as_str(), |(_, path)| path);
        let names: Vec<&str> = cycle
            .iter()
            .map(|&i| steps[i].name.as_deref().unwrap_or("(unnamed)"))
            .collect();
        w.report(
            path,
            codes::CYCLE,
            format!("dependency cycle: {}", format_cycle(&names)),
        );
    }
    if more {
        w.report(
            "",
            codes::CYCLE,
            format!(
                "more dependency cycles exist; only the first {MAX_REPORTED_CYCLES} are listed"
            ),
        );
    }
}

/// `a -> b -> c -> a`, with the middle of very long cycles elided.
fn format_cycle(names: &[&str]) -> String {
    let Some(first) = names.first() else {
        return String::new();
    };
    let mut parts: Vec<String> = Vec::with_capacity(names.len().min(MAX_CYCLE_NAMES_SHOWN) + 2);
    if names.len() <= MAX_CYCLE_NAMES_SHOWN {
        parts.extend(names.iter().map(|name| (*name).to_owned()));
    } else {
        let head = MAX_CYCLE_NAMES_SHOWN / 2;
        let tail = MAX_CYCLE_NAMES_SHOWN - head;
        parts.extend(names[..head].iter().map(|name| (*name).to_owned()));
        parts.push(format!(
            "... ({} more steps) ...",
            names.len() - head - tail
        ));
        parts.extend(
            names[names.len() - tail..]
                .iter()
                .map(|name| (*name).to_owned()),
        );
    }
    parts.push((*first).to_owned());
    parts.join(" -> ")
}

/// Strongly connected components of the subgraph induced by the nodes
/// `start..`, by an iterative Tarjan. Returns each node's component id
/// (`usize::MAX` below `start`) and the size of each component.
fn strongly_connected(adjacency: &[Vec<usize>], start: usize) -> (Vec<usize>, Vec<usize>) {
    const UNSET: usize = usize::MAX;
    let n = adjacency.len();
    let mut index = vec![UNSET; n];
    let mut low = vec![0; n];
    let mut on_stack = vec![false; n];
    let mut component = vec![UNSET; n];
    let mut sizes = Vec::new();
    let mut stack = Vec::new();
    let mut calls: Vec<(usize, usize)> = Vec::new();
    let mut counter = 0;
    for root in start..n {
        if index[root] != UNSET {
            continue;
        }
        index[root] = counter;
        low[root] = counter;
        counter += 1;
        stack.push(root);
        on_stack[root] = true;
        calls.push((root, 0));
        while let Some(frame) = calls.last_mut() {
            let v = frame.0;
            if let Some(&w) = adjacency[v].get(frame.1) {
                frame.1 += 1;
                if w < start {
                    continue;
                }
                if index[w] == UNSET {
                    index[w] = counter;
                    low[w] = counter;
                    counter += 1;
                    stack.push(w);
                    on_stack[w] = true;
                    calls.push((w, 0));
                } else if on_stack[w] {
                    low[v] = low[v].min(index[w]);
                }
            } else {
                calls.pop();
                if let Some(&(parent, _)) = calls.last() {
                    low[parent] = low[parent].min(low[v]);
                }
                if low[v] == index[v] {
                    let id = sizes.len();
                    let mut size = 0;
                    while let Some(x) = stack.pop() {
                        on_stack[x] = false;
                        component[x] = id;
                        size += 1;
                        if x == v {
                            break;
                        }
                    }
                    sizes.push(size);
                }
            }
        }
    }
    (component, sizes)
}

/// All elementary cycles (Johnson's algorithm, iterative), each starting at
/// its lowest node, up to `limit` of them; the flag says whether more exist.
/// Self-loops must not be present in `adjacency`.
fn elementary_cycles(adjacency: &[Vec<usize>], limit: usize) -> (Vec<Vec<usize>>, bool) {
    let n = adjacency.len();
    let mut cycles: Vec<Vec<usize>> = Vec::new();
    let mut blocked = vec![false; n];
    let mut blocked_by: Vec<HashSet<usize>> = vec![HashSet::new(); n];
    let mut start = 0;
    while start < n {
        let (component, sizes) = strongly_connected(adjacency, start);
        let Some(s) = (start..n).find(|&v| sizes[component[v]] > 1) else {
            break;
        };
        let id = component[s];
        let in_scope = |v: usize| v >= s && component[v] == id;
        for v in s..n {
            if in_scope(v) {
                blocked[v] = false;
                blocked_by[v].clear();
            }
        }
        let mut path = vec![s];
        blocked[s] = true;
        // (node, next edge position, found a cycle below)
        let mut frames: Vec<(usize, usize, bool)> = vec![(s, 0, false)];
        while let Some(frame) = frames.last_mut() {
            let v = frame.0;
            if let Some(&w) = adjacency[v].get(frame.1) {
                frame.1 += 1;
                if !in_scope(w) {
                    continue;
                }
                if w == s {
                    frame.2 = true;
                    cycles.push(path.clone());
                    if cycles.len() > limit {
                        cycles.truncate(limit);
                        return (cycles, true);
                    }
                } else if !blocked[w] {
                    blocked[w] = true;
                    path.push(w);
                    frames.push((w, 0, false));
                }
            } else {
                let found = frame.2;
                frames.pop();
                path.pop();
                if found {
                    unblock(v, &mut blocked, &mut blocked_by);
                } else {
                    for &w in &adjacency[v] {
                        if in_scope(w) {
                            blocked_by[w].insert(v);
                        }
                    }
                }
                if let Some(parent) = frames.last_mut() {
                    parent.2 |= found;
                }
            }
        }
        start = s + 1;
    }
    (cycles, false)
}

fn unblock(node: usize, blocked: &mut [bool], blocked_by: &mut [HashSet<usize>]) {
    blocked[node] = false;
    let mut work = vec![node];
    while let Some(x) = work.pop() {
        for w in std::mem::take(&mut blocked_by[x]) {
            if blocked[w] {
                blocked[w] = false;
                work.push(w);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn codes_of(error: &TemplateError) -> Vec<&str> {
        error
            .0
            .iter()
            .map(|problem| problem.code.as_str())
            .collect()
    }

    fn problems(text: &str) -> Vec<Problem> {
        match parse_template(text, "production") {
            Ok(definition) => panic!("expected problems, got {definition:?}"),
            Err(error) => error.0,
        }
    }

    const PROJECT_YAML: &str = r#"
namespace: ecommerce
name: order_fulfilment
version: 1.2.3
description: Fulfil a customer order
context_schema:
  type: object
  required: [order_id]
  properties:
    order_id: {type: integer}
defaults:
  retry_limit: 5
  timeout_ms: 60000
steps:
  - name: validate
    handler: Ecommerce::Validate
    description: Check the order
    config:
      strict: true
      limits: [1, 2]
  - name: charge
    handler: payments.charge
    depends_on: [validate]
    retryable: false
    retry_limit: 1
  - name: reserve
    handler: inventory.reserve
    depends_on: [validate]
    timeout_ms: 1000
    skippable: true
    dependent_system: warehouse
  - name: ship
    handler: shipping.ship
    depends_on: [charge, reserve, charge]
"#;

    fn expected_project() -> TemplateDefinition {
        let step = |name: &str, handler: &str, deps: &[&str]| StepDefinition {
            name: name.to_owned(),
            handler: handler.to_owned(),
            description: None,
            depends_on: deps.iter().map(|d| (*d).to_owned()).collect(),
            retryable: true,
            retry_limit: 5,
            timeout_ms: 60_000,
            config: json!({}),
            skippable: false,
            dependent_system: None,
        };
        let mut validate = step("validate", "Ecommerce::Validate", &[]);
        validate.description = Some("Check the order".to_owned());
        validate.config = json!({"strict": true, "limits": [1, 2]});
        let mut charge = step("charge", "payments.charge", &["validate"]);
        charge.retryable = false;
        charge.retry_limit = 1;
        let mut reserve = step("reserve", "inventory.reserve", &["validate"]);
        reserve.timeout_ms = 1000;
        reserve.skippable = true;
        reserve.dependent_system = Some("warehouse".to_owned());
        TemplateDefinition {
            namespace: "ecommerce".to_owned(),
            name: "order_fulfilment".to_owned(),
            version: "1.2.3".to_owned(),
            description: Some("Fulfil a customer order".to_owned()),
            context_schema: Some(json!({
                "type": "object",
                "required": ["order_id"],
                "properties": {"order_id": {"type": "integer"}}
            })),
            steps: vec![
                validate,
                charge,
                reserve,
                step("ship", "shipping.ship", &["charge", "reserve"]),
            ],
        }
    }

    #[test]
    fn project_yaml_parses_to_expected_definition() {
        let definition = parse_template(PROJECT_YAML, "development").unwrap();
        assert_eq!(definition, expected_project());
    }

    #[test]
    fn project_json_parses_to_same_definition() {
        let json_text = r#"{
	"namespace": "ecommerce",
	"name": "order_fulfilment",
	"version": "1.2.3",
	"description": "Fulfil a customer order",
	"context_schema": {"type": "object", "required": ["order_id"],
		"properties": {"order_id": {"type": "integer"}}},
	"defaults": {"retry_limit": 5, "timeout_ms": 60000},
	"steps": [
		{"name": "validate", "handler": "Ecommerce::Validate", "description": "Check the order",
		 "config": {"strict": true, "limits": [1, 2]}},
		{"name": "charge", "handler": "payments.charge", "depends_on": ["validate"],
		 "retryable": false, "retry_limit": 1},
		{"name": "reserve", "handler": "inventory.reserve", "depends_on": ["validate"],
		 "timeout_ms": 1000, "skippable": true, "dependent_system": "warehouse"},
		{"name": "ship", "handler": "shipping.ship", "depends_on": ["charge", "reserve", "charge"]}
	]
}"#;
        let definition = parse_template(json_text, "development").unwrap();
        assert_eq!(definition, expected_project());
    }

    #[test]
    fn minimal_template_gets_defaults() {
        let definition = parse_template(
            "namespace: ns\nname: t\nsteps:\n  - {name: a, handler: H}\n",
            "",
        )
        .unwrap();
        assert_eq!(definition.version, "0.1.0");
        assert_eq!(definition.description, None);
        assert_eq!(definition.context_schema, None);
        let step = &definition.steps[0];
        assert!(step.retryable);
        assert_eq!(step.retry_limit, 3);
        assert_eq!(step.timeout_ms, 300_000);
        assert_eq!(step.config, json!({}));
        assert!(!step.skippable);
        assert!(step.depends_on.is_empty());
    }

    #[test]
    fn definition_round_trips_through_serde_and_the_parser() {
        let definition = expected_project();
        let stored = serde_json::to_string(&definition).unwrap();
        let back: TemplateDefinition = serde_json::from_str(&stored).unwrap();
        assert_eq!(back, definition);
        // The stored JSON is itself a valid project-format template.
        assert_eq!(parse_template(&stored, "").unwrap(), definition);
    }

    const ENGINE_YAML: &str = r#"
---
name: process_order
namespace_name: order_processing
version: 1.0.0
module_namespace: OrderProcessing
task_handler_class: OrderProcessing::OrderHandler
concurrent: true
description: Process an order from validation to shipment
default_dependent_system: ecommerce_system
named_steps:
  - validate_order
  - reserve_inventory
  - process_payment
  - send_confirmation
  - ship_order
schema:
  type: object
  required: [order_id, customer]
  properties:
    order_id:
      type: integer
    customer:
      type: object
      required: [email]
      properties:
        email:
          type: string
step_templates:
  - name: validate_order
    description: Validate the order contents
    handler_class: OrderProcessing::StepHandler::ValidateOrder
    handler_config:
      strict: true
  - name: reserve_inventory
    description: Reserve stock
    depends_on_step: validate_order
    handler_class: OrderProcessing::StepHandler::ReserveInventory
    dependent_system: inventory_system
    default_retryable: true
    default_retry_limit: 5
    handler_config:
      type: api
      url: https://inventory.example.com/reserve
      params:
        warehouse: main
        hold_minutes: 30
  - name: process_payment
    description: Charge the customer
    depends_on_step: validate_order
    handler_class: OrderProcessing::StepHandler::ProcessPayment
    default_retryable: false
    default_retry_limit: 1
    custom_events:
      - name: payment.charged
        description: The card was charged
      - name: payment.declined
  - name: send_confirmation
    depends_on_steps: [reserve_inventory, process_payment]
    handler_class: OrderProcessing::StepHandler::SendConfirmation
    skippable: true
  - name: ship_order
    depends_on_step: process_payment
    depends_on_steps:
      - reserve_inventory
      - process_payment
    handler_class: OrderProcessing::StepHandler::ShipOrder
environments:
  development:
    step_templates:
      - name: reserve_inventory
        handler_config:
          url: http://localhost:3000/reserve
          params:
            hold_minutes: 1
            debug: true
  production:
    step_templates:
      - name: process_payment
        handler_config:
          gateway: live
"#;

    #[test]
    fn tasker_engine_template_maps_to_definition() {
        let definition = parse_template(ENGINE_YAML, "development").unwrap();
        let step = |name: &str, class: &str, deps: &[&str]| StepDefinition {
            name: name.to_owned(),
            handler: format!("OrderProcessing::StepHandler::{class}"),
            description: None,
            depends_on: deps.iter().map(|d| (*d).to_owned()).collect(),
            retryable: true,
            retry_limit: 3,
            timeout_ms: 300_000,
            config: json!({}),
            skippable: false,
            dependent_system: Some("ecommerce_system".to_owned()),
        };
        let mut validate = step("validate_order", "ValidateOrder", &[]);
        validate.description = Some("Validate the order contents".to_owned());
        validate.config = json!({"strict": true});
        let mut reserve = step("reserve_inventory", "ReserveInventory", &["validate_order"]);
        reserve.description = Some("Reserve stock".to_owned());
        reserve.dependent_system = Some("inventory_system".to_owned());
        reserve.retry_limit = 5;
        reserve.config = json!({
            "type": "api",
            "url": "http://localhost:3000/reserve",
            "params": {"warehouse": "main", "hold_minutes": 1, "debug": true}
        });
        let mut payment = step("process_payment", "ProcessPayment", &["validate_order"]);
        payment.description = Some("Charge the customer".to_owned());
        payment.retryable = false;
        payment.retry_limit = 1;
        let mut confirm = step(
            "send_confirmation",
            "SendConfirmation",
            &["reserve_inventory", "process_payment"],
        );
        confirm.skippable = true;
        let ship = step(
            "ship_order",
            "ShipOrder",
            &["process_payment", "reserve_inventory"],
        );
        let expected = TemplateDefinition {
            namespace: "order_processing".to_owned(),
            name: "process_order".to_owned(),
            version: "1.0.0".to_owned(),
            description: Some("Process an order from validation to shipment".to_owned()),
            context_schema: Some(json!({
                "type": "object",
                "required": ["order_id", "customer"],
                "properties": {
                    "order_id": {"type": "integer"},
                    "customer": {
                        "type": "object",
                        "required": ["email"],
                        "properties": {"email": {"type": "string"}}
                    }
                }
            })),
            steps: vec![validate, reserve, payment, confirm, ship],
        };
        assert_eq!(definition, expected);

        // Another environment only changes its own overrides.
        let production = parse_template(ENGINE_YAML, "production").unwrap();
        assert_eq!(
            production.steps[1].config["url"],
            json!("https://inventory.example.com/reserve")
        );
        assert_eq!(production.steps[2].config, json!({"gateway": "live"}));
        // An environment that is not listed means no overrides.
        let staging = parse_template(ENGINE_YAML, "staging").unwrap();
        assert_eq!(staging.steps[2].config, json!({}));
    }

    #[test]
    fn tasker_engine_minimal_defaults() {
        let text =
            "name: t\ntask_handler_class: T\nstep_templates:\n  - name: a\n    handler_class: A\n";
        let definition = parse_template(text, "").unwrap();
        assert_eq!(definition.namespace, "default");
        assert_eq!(definition.version, "0.1.0");
        assert_eq!(definition.steps[0].dependent_system, None);
        assert_eq!(definition.steps[0].config, json!({}));
    }

    #[test]
    fn environment_deep_merge() {
        let mut base = json!({
            "a": 1,
            "nested": {"keep": true, "replace": [1, 2], "deeper": {"x": 1, "y": 2}},
            "scalar_to_object": 5
        });
        deep_merge(
            &mut base,
            &json!({
                "b": 2,
                "nested": {"replace": [3], "deeper": {"y": 20, "z": 30}, "added": null},
                "scalar_to_object": {"now": "object"}
            }),
        );
        assert_eq!(
            base,
            json!({
                "a": 1,
                "b": 2,
                "nested": {
                    "keep": true,
                    "replace": [3],
                    "deeper": {"x": 1, "y": 20, "z": 30},
                    "added": null
                },
                "scalar_to_object": {"now": "object"}
            })
        );
        let mut replaced = json!({"a": 1});
        deep_merge(&mut replaced, &json!("text"));
        assert_eq!(replaced, json!("text"));
    }

    #[test]
    fn environment_naming_unknown_step_is_a_problem() {
        let text = "name: t\ntask_handler_class: T\nstep_templates:\n  - {name: a, handler_class: A}\nenvironments:\n  test:\n    step_templates:\n      - name: nope\n        handler_config: {x: 1}\n        handler_class: X\n";
        let found = problems(text);
        assert_eq!(found.len(), 2, "{found:#?}");
        assert_eq!(
            found[0].path,
            "environments.test.step_templates[0].handler_class"
        );
        assert_eq!(found[0].code, "unknown_key");
        assert_eq!(found[1].path, "environments.test.step_templates[0].name");
        assert_eq!(found[1].code, "invalid_value");
        assert!(found[1].message.contains("`nope`"));
    }

    #[test]
    fn all_five_problems_are_reported_together() {
        let text = r#"
namespace: shop
name: broken
context_schema:
  type: invalid_type
steps:
  - name: a
    handler: A
    depends_on: [c]
  - name: b
    handler: B
    depends_on: [a]
  - name: c
    handler: C
    depends_on: [b]
  - name: a
    handler: A2
  - name: d
    handler: D
    descripton: typo
    depends_on: [zzz]
"#;
        let error = parse_template(text, "").unwrap_err();
        let mut found = codes_of(&error);
        found.sort_unstable();
        assert_eq!(
            found,
            [
                "cycle",
                "duplicate_step",
                "invalid_schema",
                "unknown_dependency",
                "unknown_key"
            ],
            "{error:#?}"
        );
        let by_code = |code: &str| error.0.iter().find(|p| p.code == code).unwrap();
        assert_eq!(by_code("invalid_schema").path, "context_schema");
        assert!(by_code("invalid_schema").message.contains("/type"));
        assert_eq!(by_code("duplicate_step").path, "steps[3].name");
        assert!(by_code("duplicate_step").message.contains("`a`"));
        assert_eq!(by_code("unknown_key").path, "steps[4].descripton");
        assert_eq!(
            by_code("unknown_key").message,
            "unknown key `descripton`; did you mean `description`?"
        );
        assert_eq!(by_code("unknown_dependency").path, "steps[4].depends_on[0]");
        assert!(by_code("unknown_dependency").message.contains("`d`"));
        assert!(by_code("unknown_dependency").message.contains("`zzz`"));
        assert_eq!(
            by_code("cycle").message,
            "dependency cycle: a -> b -> c -> a"
        );
        assert_eq!(by_code("cycle").path, "steps[0].depends_on[0]");
        assert_eq!(error.to_string(), "invalid template: 5 problem(s)");
    }

    #[test]
    fn every_structural_problem_is_collected() {
        let text = r#"
name: "bad name"
version: "1.0"
extra: 1
defaults: [1]
steps:
  - name: a
    handlr: X
    retry_limit: 0
    timeout_ms: "fast"
    retryable: "yes"
    depends_on: a
  - 42
  - name: ""
    handler: "   "
    depends_on: [a, 7, ""]
    retry_limit: 2.5
"#;
        let found = problems(text);
        let pairs: Vec<(&str, &str)> = found
            .iter()
            .map(|p| (p.path.as_str(), p.code.as_str()))
            .collect();
        let expected = [
            ("extra", "unknown_key"),
            ("namespace", "missing_key"),
            ("name", "invalid_value"),
            ("version", "invalid_value"),
            ("defaults", "not_an_object"),
            ("steps[0].handlr", "unknown_key"),
            ("steps[0].handler", "missing_key"),
            ("steps[0].depends_on", "wrong_type"),
            ("steps[0].retryable", "wrong_type"),
            ("steps[0].retry_limit", "invalid_value"),
            ("steps[0].timeout_ms", "wrong_type"),
            ("steps[1]", "not_an_object"),
            ("steps[2].name", "invalid_value"),
            ("steps[2].handler", "invalid_value"),
            ("steps[2].depends_on[1]", "wrong_type"),
            ("steps[2].depends_on[2]", "invalid_value"),
            ("steps[2].retry_limit", "wrong_type"),
        ];
        assert_eq!(pairs, expected, "{found:#?}");
        assert_eq!(
            found[5].message,
            "unknown key `handlr`; did you mean `handler`?"
        );
    }

    #[test]
    fn legacy_paths_and_problems() {
        let text = r#"
name: api_task/integration
task_handler_class: ApiTask
namespace: wrong_key
schema: [not, an, object]
step_templates:
  - name: fetch
    handler: Fetch
    depends_on_steps: [fetch, ghost]
    custom_events:
      - name: ok
        payload: 1
      - just_a_string
  - name: store
    handler_class: ApiTask::Store
    depends_on_step: 12
    default_retry_limit: 101
"#;
        let found = problems(text);
        let pairs: Vec<(&str, &str)> = found
            .iter()
            .map(|p| (p.path.as_str(), p.code.as_str()))
            .collect();
        let expected = [
            ("namespace", "unknown_key"),
            ("name", "invalid_value"),
            ("schema", "not_an_object"),
            ("step_templates[0].handler", "unknown_key"),
            ("step_templates[0].handler_class", "missing_key"),
            ("step_templates[0].custom_events[0].payload", "unknown_key"),
            ("step_templates[0].custom_events[1]", "not_an_object"),
            ("step_templates[1].default_retry_limit", "invalid_value"),
            ("step_templates[1].depends_on_step", "wrong_type"),
            ("step_templates[0].depends_on_steps[0]", "self_dependency"),
            (
                "step_templates[0].depends_on_steps[1]",
                "unknown_dependency",
            ),
        ];
        assert_eq!(pairs, expected, "{found:#?}");
        assert_eq!(
            found[0].message,
            "unknown key `namespace`; did you mean `namespace_name`?"
        );
        assert!(found[1].message.contains("`/`"), "{}", found[1].message);
    }

    #[test]
    fn duplicate_names_reported_once_per_name() {
        let text = "namespace: n\nname: t\nsteps:\n  - {name: a, handler: H}\n  - {name: b, handler: H}\n  - {name: a, handler: H}\n  - {name: a, handler: H}\n  - {name: b, handler: H}\n";
        let found = problems(text);
        assert_eq!(found.len(), 2, "{found:#?}");
        assert_eq!(found[0].path, "steps[2].name");
        assert!(found[0].message.contains("3 times"));
        assert!(found[0].message.contains("steps[0], steps[2], steps[3]"));
        assert_eq!(found[1].path, "steps[4].name");
    }

    #[test]
    fn cycles_are_named_once_each() {
        let text = r#"
namespace: n
name: t
steps:
  - {name: a, handler: H, depends_on: [b, c]}
  - {name: b, handler: H, depends_on: [a]}
  - {name: c, handler: H, depends_on: [a]}
  - {name: d, handler: H, depends_on: [d]}
  - {name: e, handler: H, depends_on: [g]}
  - {name: f, handler: H, depends_on: [e]}
  - {name: g, handler: H, depends_on: [f]}
"#;
        let found = problems(text);
        let messages: Vec<(&str, &str)> = found
            .iter()
            .map(|p| (p.code.as_str(), p.message.as_str()))
            .collect();
        assert_eq!(
            messages,
            [
                ("self_dependency", "step `d` depends on itself"),
                ("cycle", "dependency cycle: a -> b -> a"),
                ("cycle", "dependency cycle: a -> c -> a"),
                ("cycle", "dependency cycle: e -> f -> g -> e"),
            ],
            "{found:#?}"
        );
    }

    #[test]
    fn johnson_finds_every_elementary_cycle() {
        // Complete digraph on 4 nodes has 20 elementary cycles.
        let adjacency: Vec<Vec<usize>> = (0..4)
            .map(|v| (0..4).filter(|&w| w != v).collect())
            .collect();
        let (cycles, more) = elementary_cycles(&adjacency, 100);
        assert!(!more);
        assert_eq!(cycles.len(), 20);
        let unique: HashSet<Vec<usize>> = cycles.iter().cloned().collect();
        assert_eq!(unique.len(), 20);
        let (limited, more) = elementary_cycles(&adjacency, 5);
        assert!(more);
        assert_eq!(limited.len(), 5);
    }

    #[test]
    fn too_many_cycles_are_summarised() {
        // 12 steps that all depend on each other: far more than 100 cycles.
        let names: Vec<String> = (0..12).map(|i| format!("s{i}")).collect();
        let steps: Vec<Value> = names
            .iter()
            .map(|name| {
                let deps: Vec<&String> = names.iter().filter(|other| *other != name).collect();
                json!({"name": name, "handler": "H", "depends_on": deps})
            })
            .collect();
        let value = json!({"namespace": "n", "name": "t", "steps": steps});
        let error = template_from_value(&value, "").unwrap_err();
        assert_eq!(error.0.len(), MAX_REPORTED_CYCLES + 1);
        assert!(error.0.iter().all(|p| p.code == "cycle"));
        assert!(
            error.0[MAX_REPORTED_CYCLES]
                .message
                .starts_with("more dependency cycles")
        );
    }

    fn chain(count: usize) -> Value {
        let steps: Vec<Value> = (0..count)
            .map(|i| {
                if i == 0 {
                    json!({"name": "step-0", "handler": "H"})
                } else {
                    json!({"name": format!("step-{i}"), "handler": "H",
                           "depends_on": [format!("step-{}", i - 1)]})
                }
            })
            .collect();
        json!({"namespace": "big", "name": "chain", "steps": steps})
    }

    #[test]
    fn ten_thousand_step_chain_validates() {
        let value = chain(MAX_STEPS);
        let definition = template_from_value(&value, "").unwrap();
        assert_eq!(definition.steps.len(), MAX_STEPS);
        let order = definition.topological_order();
        assert_eq!(order.len(), MAX_STEPS);
        assert_eq!(order[0].name, "step-0");
        assert_eq!(order[MAX_STEPS - 1].name, format!("step-{}", MAX_STEPS - 1));
        // Also through the text parser.
        let text = serde_json::to_string(&value).unwrap();
        assert_eq!(parse_template(&text, "").unwrap(), definition);
    }

    #[test]
    fn ten_thousand_step_cycle_is_found_without_recursion() {
        let mut value = chain(MAX_STEPS);
        value["steps"][0]["depends_on"] = json!([format!("step-{}", MAX_STEPS - 1)]);
        let error = template_from_value(&value, "").unwrap_err();
        assert_eq!(codes_of(&error), ["cycle"]);
        let message = &error.0[0].message;
        assert!(
            message.starts_with("dependency cycle: step-0 -> step-1 -> "),
            "{message}"
        );
        assert!(message.ends_with("step-9999 -> step-0"), "{message}");
        assert!(message.contains("(9960 more steps)"), "{message}");
    }

    #[test]
    fn more_than_ten_thousand_steps_is_rejected() {
        let value = chain(MAX_STEPS + 1);
        let error = template_from_value(&value, "").unwrap_err();
        assert_eq!(error.0.len(), 1, "{error:#?}");
        assert_eq!(error.0[0].path, "steps");
        assert_eq!(error.0[0].code, "invalid_value");
    }

    #[test]
    fn topological_order_breaks_ties_by_file_order() {
        let text = r#"
namespace: n
name: t
steps:
  - {name: d, handler: H, depends_on: [b]}
  - {name: a, handler: H}
  - {name: b, handler: H, depends_on: [a]}
  - {name: c, handler: H}
  - {name: e, handler: H, depends_on: [d, c]}
"#;
        let definition = parse_template(text, "").unwrap();
        let order: Vec<&str> = definition
            .topological_order()
            .iter()
            .map(|step| step.name.as_str())
            .collect();
        assert_eq!(order, ["a", "b", "d", "c", "e"]);
    }

    #[test]
    fn topological_order_of_unvalidated_cycle_keeps_every_step() {
        let mut definition = expected_project();
        definition.steps[0].depends_on = vec!["ship".to_owned(), "missing".to_owned()];
        let order: Vec<&str> = definition
            .topological_order()
            .iter()
            .map(|step| step.name.as_str())
            .collect();
        assert_eq!(order, ["validate", "charge", "reserve", "ship"]);
    }

    #[test]
    fn validate_context_lists_every_violation() {
        let definition = parse_template(ENGINE_YAML, "").unwrap();
        assert_eq!(
            definition.validate_context(&json!({"order_id": 1, "customer": {"email": "a@b.c"}})),
            Ok(())
        );
        let mut found = definition
            .validate_context(&json!({"customer": {"email": 42}}))
            .unwrap_err();
        found.sort_by(|a, b| a.path.cmp(&b.path));
        assert_eq!(found.len(), 2, "{found:#?}");
        assert_eq!(found[0].path, "");
        assert_eq!(found[0].code, "schema");
        assert!(
            found[0].message.contains("order_id"),
            "{}",
            found[0].message
        );
        assert_eq!(found[1].path, "/customer/email");
        assert_eq!(found[1].code, "schema");
        assert!(found[1].message.contains("string"), "{}", found[1].message);

        let mut no_schema = definition;
        no_schema.context_schema = None;
        assert_eq!(no_schema.validate_context(&json!("anything")), Ok(()));
    }

    #[test]
    fn formats_are_enforced() {
        let schema = json!({"properties": {"email": {"type": "string", "format": "email"}}});
        let found = validate_against_schema(&schema, &json!({"email": "nope"})).unwrap_err();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].path, "/email");

        // Local references, date-time and ipv4 formats, an older dialect.
        let schema = json!({
            "$schema": "http://json-schema.org/draft-07/schema#",
            "definitions": {"when": {"type": "string", "format": "date-time"}},
            "properties": {
                "at": {"$ref": "#/definitions/when"},
                "ip": {"type": "string", "format": "ipv4"}
            }
        });
        assert!(schema_problems(&schema).is_empty());
        let good = json!({"at": "2024-05-01T10:00:00Z", "ip": "10.0.0.1"});
        assert_eq!(validate_against_schema(&schema, &good), Ok(()));
        let mut found =
            validate_against_schema(&schema, &json!({"at": "yesterday", "ip": "x"})).unwrap_err();
        found.sort_by(|a, b| a.path.cmp(&b.path));
        let paths: Vec<&str> = found.iter().map(|p| p.path.as_str()).collect();
        assert_eq!(paths, ["/at", "/ip"]);
    }

    #[test]
    fn schema_compile_errors_are_invalid_schema() {
        for schema in [
            json!({"pattern": "("}),
            json!({"$ref": "#/definitions/missing"}),
            json!({"$ref": "https://example.com/schema.json"}),
            json!({"$schema": "https://example.com/custom-meta"}),
            json!({"properties": {"a": {"type": 5}, "b": {"minimum": "x"}}}),
        ] {
            let value = json!({"namespace": "n", "name": "t", "context_schema": schema,
                               "steps": [{"name": "a", "handler": "H"}]});
            let error = template_from_value(&value, "").unwrap_err();
            assert!(!error.0.is_empty());
            assert!(
                error
                    .0
                    .iter()
                    .all(|p| p.code == "invalid_schema" && p.path == "context_schema"),
                "{error:#?}"
            );
        }
    }

    #[test]
    fn syntax_errors_carry_line_and_column() {
        let found = problems(
            "namespace: n\nname: t\nsteps:\n  - name: a\n    handler: b\n   retry_limit: 3\n",
        );
        assert_eq!(found.len(), 1, "{found:#?}");
        assert_eq!(found[0].code, "syntax");
        assert!(
            found[0].message.contains("line 6 column 4"),
            "{}",
            found[0].message
        );

        let found = problems("{\"namespace\": \"n\",\n \"name\": [}");
        assert_eq!(found.len(), 1, "{found:#?}");
        assert_eq!(found[0].code, "syntax");
        assert!(
            found[0].message.starts_with("JSON syntax error"),
            "{}",
            found[0].message
        );
        assert!(
            found[0].message.contains("line 2 column 11"),
            "{}",
            found[0].message
        );

        // JSON that is only valid as YAML (flow style) is still accepted.
        let flow = parse_template(
            "{namespace: n, name: t, steps: [{name: a, handler: H}]}",
            "",
        );
        assert_eq!(flow.unwrap().steps[0].name, "a");
    }

    #[test]
    fn duplicate_keys_are_syntax_errors() {
        let found = problems("namespace: n\nname: t\nname: u\nsteps: []\n");
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].code, "syntax");
        assert_eq!(
            found[0].message,
            "YAML syntax error: duplicate key `name` in the mapping that starts at line 1 column 1"
        );
        let found = problems(
            "namespace: n\nname: t\nsteps:\n  - name: a\n    handler: H\n    handler: J\n",
        );
        assert!(
            found[0].message.contains("`handler`"),
            "{}",
            found[0].message
        );
        assert!(
            found[0].message.contains("line 4 column 5"),
            "{}",
            found[0].message
        );

        let found = problems("{\"namespace\": \"n\", \"namespace\": \"m\"}");
        assert_eq!(found[0].code, "syntax");
        assert!(
            found[0].message.contains("duplicate key"),
            "{}",
            found[0].message
        );
    }

    #[test]
    fn yaml_merge_keys_are_applied() {
        let text = r#"
namespace: n
name: t
steps:
  - &base
    name: a
    handler: Shared
    retry_limit: 7
  - <<: *base
    name: b
    depends_on: [a]
"#;
        let definition = parse_template(text, "").unwrap();
        assert_eq!(definition.steps[1].handler, "Shared");
        assert_eq!(definition.steps[1].retry_limit, 7);
        assert_eq!(definition.steps[1].name, "b");
    }

    #[test]
    fn top_level_shapes() {
        for (text, code) in [
            ("", "not_an_object"),
            ("- a\n- b\n", "not_an_object"),
            ("just text", "not_an_object"),
            ("a: 1\n---\nb: 2\n", "syntax"),
            ("a: !tag x\n", "syntax"),
            ("a: .nan\n", "syntax"),
        ] {
            let found = problems(text);
            assert_eq!(found.len(), 1, "{text:?}: {found:#?}");
            assert_eq!(found[0].code, code, "{text:?}: {found:#?}");
            assert_eq!(found[0].path, "");
        }
    }

    #[test]
    fn empty_steps_and_ranges() {
        let found = problems("namespace: n\nname: t\nsteps: []\n");
        assert_eq!(found.len(), 1);
        assert_eq!(
            (found[0].path.as_str(), found[0].code.as_str()),
            ("steps", "no_steps")
        );

        let found = problems(
            "namespace: a-very-long-namespace-that-goes-on-and-on-and-on-beyond-sixty-four-chars\nname: t\nversion: 1.0\nsteps:\n  - {name: a, handler: H, timeout_ms: 86400001, retry_limit: 10000000000000000000}\n",
        );
        let pairs: Vec<(&str, &str)> = found
            .iter()
            .map(|p| (p.path.as_str(), p.code.as_str()))
            .collect();
        assert_eq!(
            pairs,
            [
                ("namespace", "invalid_value"),
                ("version", "wrong_type"),
                ("steps[0].retry_limit", "invalid_value"),
                ("steps[0].timeout_ms", "invalid_value"),
            ],
            "{found:#?}"
        );
    }

    #[test]
    fn identifiers_and_handlers() {
        assert_eq!(identifier_error("order.v2_final-1", 128), None);
        assert!(identifier_error("_x", 128).is_some());
        assert!(identifier_error("a b", 128).is_some());
        assert!(identifier_error("ä", 128).is_some());
        assert!(identifier_error(&"a".repeat(129), 128).is_some());
        assert_eq!(identifier_error(&"a".repeat(128), 128), None);

        let mut walker = Walker::default();
        walker.check_label(
            "OrderProcessing::StepHandler::ValidateOrder",
            "h",
            "handler",
        );
        walker.check_label("módulo.función", "h", "handler");
        assert!(walker.problems.is_empty());
        walker.check_label(&"H".repeat(257), "h", "handler");
        walker.check_label("a\tb", "h", "handler");
        assert_eq!(walker.problems.len(), 2);
    }

    #[test]
    fn unknown_keys_without_close_match_list_allowed_keys() {
        let found =
            problems("namespace: n\nname: t\nsteps:\n  - {name: a, handler: H, zzzzzz: 1}\n");
        assert_eq!(found.len(), 1);
        assert!(
            found[0]
                .message
                .starts_with("unknown key `zzzzzz`; allowed keys here: name, handler")
        );
        let found = problems("namespace: n\nname: t\nsteps:\n  - {name: a, handler_class: H}\n");
        let messages: Vec<&str> = found.iter().map(|p| p.message.as_str()).collect();
        assert_eq!(
            messages,
            [
                "unknown key `handler_class`; did you mean `handler`?",
                "missing required key `handler`"
            ]
        );
    }

    #[test]
    fn odd_keys_are_quoted_in_paths() {
        assert_eq!(join("", "steps"), "steps");
        assert_eq!(join("environments", "dev.eu"), "environments[\"dev.eu\"]");
        assert_eq!(item("steps", 3), "steps[3]");
    }
}
