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
//!
//! ## Layout
//!
//! * this module: the public types, constants and entry points;
//! * `document`: YAML/JSON text to a [`serde_json::Value`], strictly
//!   (duplicate keys, tags and non-finite numbers are errors; merge keys are
//!   applied);
//! * `schema`: compiling and checking JSON Schemas;
//! * `walker`: the [`Problem`]-collecting `Walker`, its typed field readers
//!   and the path, suggestion and identifier helpers;
//! * `draft`: the template as read from either format, before the graph checks;
//! * `project`: walking a project-format document;
//! * `legacy`: walking a tasker-engine 1.x document, including its
//!   `environments` overrides;
//! * `graph`: duplicate names, unknown and self dependencies, and cycles.

mod backoff;
mod child_tasks;
mod conditions;
mod cost;
mod document;
mod draft;
mod graph;
mod legacy;
mod limits;
mod project;
mod schema;
#[cfg(test)]
mod tests;
mod waits;
mod walker;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::fmt;

pub use child_tasks::{ChildTemplate, TASK_HANDLER};
pub use conditions::{
    condition_task, evaluate_condition, evaluate_list, evaluate_map, task_variable,
};
pub use cost::MAX_EXPRESSION_COST;
use document::parse_document;
pub use document::{MAX_DOCUMENT_TEXT_BYTES, MAX_DOCUMENT_VALUES};
use draft::Draft;
use graph::check_graph;
use legacy::walk_legacy;
pub use limits::{
    KeyInputs, LimitKeys, Limits, MAX_CONCURRENCY, MAX_EXPRESSION_CHARS, MAX_EXPRESSION_DEPTH,
    MAX_KEY_BYTES, MAX_RATE, MAX_TASK_LIMITS, TaskKey, window_ms,
};
use project::walk_project;
use schema::{compile_schema, guarded};
pub use waits::{WAIT_HANDLER, wait_timeout_ms};
use walker::{Walker, join, kind};

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
    /// A CEL expression (a limit's `key`) does not compile, or cannot be evaluated.
    pub const INVALID_EXPRESSION: &str = "invalid_expression";
    /// A task context violates the template's context schema.
    pub const SCHEMA: &str = "schema";
    /// The template has more steps than [`TemplateLimits::max_steps`] allows.
    pub const TOO_MANY_STEPS: &str = "too_many_steps";
    /// The steps' configs together, as stored, are larger than
    /// [`TemplateLimits::max_config_bytes`] allows.
    pub const CONFIG_TOO_LARGE: &str = "config_too_large";
    /// More problems were found than are listed (see [`MAX_PROBLEMS`](super::MAX_PROBLEMS)).
    pub const MORE_PROBLEMS: &str = "more_problems";
    /// A warning, not a problem: a tasker-engine key or value that is accepted and not
    /// used (`concurrent: false`, `custom_events`, a task handler's `handler_config`, an
    /// override of a step that does not exist).
    pub const IGNORED: &str = "ignored";
}

/// Template version used when a template does not declare one.
pub const DEFAULT_VERSION: &str = "0.1.0";
/// Default for [`TemplateDefinition::priority`].
pub const DEFAULT_PRIORITY: i16 = 5;
/// Highest [`TemplateDefinition::priority`] (the lowest is 0).
pub const MAX_PRIORITY: i16 = 9;
/// Default for [`StepDefinition::retry_limit`] (maximum number of attempts).
pub const DEFAULT_RETRY_LIMIT: i32 = 3;
/// Default for [`StepDefinition::timeout_ms`] (five minutes).
pub const DEFAULT_TIMEOUT_MS: i64 = 300_000;
/// Largest accepted [`StepDefinition::retry_limit`].
pub const MAX_RETRY_LIMIT: i32 = 100;
/// Largest accepted [`StepDefinition::timeout_ms`] (24 hours).
pub const MAX_TIMEOUT_MS: i64 = 86_400_000;
/// Default for [`StepDefinition::max_deferrals`].
pub const DEFAULT_MAX_DEFERRALS: i32 = 20;
/// Largest accepted [`StepDefinition::max_deferrals`].
pub const MAX_DEFERRALS: i32 = 10_000;
/// Largest number of steps a template may have.
pub const MAX_STEPS: usize = 10_000;
/// At most this many problems are listed for one template; the rest are counted in a
/// last `more_problems` problem, so a hostile document cannot make a huge answer.
pub const MAX_PROBLEMS: usize = 200;

/// The keys the template parsers read, in both formats, and those they answer with a
/// hint (the other format's name, a common slip), for tools that generate templates, such
/// as the fuzz properties: they follow the parsers when a key is added.
#[derive(Debug, Clone)]
pub struct TemplateKeys {
    /// Keys of a template's top level, its `defaults`, and tasker-engine's environments,
    /// overrides and custom events.
    pub top: Vec<&'static str>,
    /// Keys of a step, in both formats, and of its `backoff`, `concurrency` and
    /// `rate_limit`.
    pub step: Vec<&'static str>,
}

/// See [`TemplateKeys`].
pub fn template_keys() -> TemplateKeys {
    fn collect(
        keys: &[&[&'static str]],
        hints: &[&[(&'static str, &'static str)]],
    ) -> Vec<&'static str> {
        let mut all: Vec<&'static str> = keys
            .iter()
            .flat_map(|k| k.iter().copied())
            .chain(hints.iter().flat_map(|h| h.iter().map(|(key, _)| *key)))
            .collect();
        all.sort_unstable();
        all.dedup();
        all
    }
    TemplateKeys {
        top: collect(
            &[
                project::PROJECT_TOP_KEYS,
                limits::TASK_CONCURRENCY_KEYS,
                project::PROJECT_DEFAULT_KEYS,
                legacy::LEGACY_TOP_KEYS,
                legacy::LEGACY_EVENT_KEYS,
                legacy::LEGACY_ENVIRONMENT_KEYS,
                legacy::LEGACY_OVERRIDE_KEYS,
            ],
            &[
                project::PROJECT_TOP_HINTS,
                project::PROJECT_DEFAULT_HINTS,
                legacy::LEGACY_TOP_HINTS,
            ],
        ),
        step: collect(
            &[
                project::PROJECT_STEP_KEYS,
                legacy::LEGACY_STEP_KEYS,
                backoff::KEYS,
                limits::RATE_LIMIT_KEYS,
            ],
            &[
                project::PROJECT_STEP_HINTS,
                legacy::LEGACY_STEP_HINTS,
                backoff::HINTS,
                limits::HINTS,
            ],
        ),
    }
}

/// Limits a caller (the coordinator's API) applies on top of the format's own rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TemplateLimits {
    /// Most steps, at most [`MAX_STEPS`]. A longer step list is one `too_many_steps`
    /// problem, and its steps are not read (so the work stays bounded).
    pub max_steps: usize,
    /// Most bytes the steps' configs may take together, as stored (compact JSON). Each
    /// config is copied into its step's row and every message of it, and a YAML alias
    /// can make a short document expand to megabytes of config.
    pub max_config_bytes: usize,
}

/// Default for [`TemplateLimits::max_config_bytes`].
pub const MAX_CONFIG_BYTES: usize = 1024 * 1024;

impl Default for TemplateLimits {
    fn default() -> Self {
        TemplateLimits {
            max_steps: MAX_STEPS,
            max_config_bytes: MAX_CONFIG_BYTES,
        }
    }
}

/// Longest template or step name.
const MAX_NAME_LEN: usize = 128;
/// Longest namespace.
const MAX_NAMESPACE_LEN: usize = 64;
/// Longest version.
const MAX_VERSION_LEN: usize = 64;
/// Longest handler class name or dependent system name.
const MAX_LABEL_LEN: usize = 256;
/// At most this many cycles are listed individually.
const MAX_REPORTED_CYCLES: usize = 50;
/// Cycles longer than this many steps are shown with the middle elided, so a cycle
/// message stays a few kilobytes whatever the template's size.
const MAX_CYCLE_NAMES_SHOWN: usize = 20;
/// A step name used more often than this lists only the first places it is used at.
const MAX_DUPLICATE_PLACES_SHOWN: usize = 10;

/// A validated, normalised template (the project's own format, as stored in the DB as JSON).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct TemplateDefinition {
    /// Namespace the template belongs to (1–64 characters, identifier rules).
    pub namespace: String,
    /// Template name, unique within the namespace and version (1–128 characters):
    /// identifiers joined by `/`, such as tasker-engine's `api_task/integration_yaml_example`.
    pub name: String,
    /// Semantic version of the template; `"0.1.0"` when the source does not say.
    pub version: String,
    /// Free-text description.
    pub description: Option<String>,
    /// JSON Schema that task contexts must satisfy; see [`TemplateDefinition::validate_context`].
    pub context_schema: Option<serde_json::Value>,
    /// Priority of its tasks, 0 to 9 (default 5); a creation may ask for another. Among
    /// ready steps, the higher priority is claimed first.
    #[serde(default = "default_priority")]
    pub priority: i16,
    /// At most so many unfinished tasks of this template at once per key value, each
    /// entry with what a task past the limit does.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub concurrency: Vec<TaskConcurrency>,
    /// How long a task may take, from when it may start (its `run_at`, or its
    /// creation): past it, it ends in `error` with the reason `deadline_exceeded`. A
    /// whole number of seconds, minutes, hours or days (`30m`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    /// The steps, in the order of the source file.
    pub steps: Vec<StepDefinition>,
    /// Schedules that create tasks of this template, written when the file is loaded
    /// from `TASKER_TEMPLATES_DIR` (or registered).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub schedules: Vec<TemplateSchedule>,
}

/// A schedule a template file carries: `schedules: [{name, cron, timezone?, context?}]`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct TemplateSchedule {
    /// Its name (unique among every schedule).
    pub name: String,
    /// Five or six cron fields.
    pub cron: String,
    /// An IANA time zone; `UTC` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
    /// The context of each task; `{}` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<serde_json::Value>,
}

fn default_priority() -> i16 {
    DEFAULT_PRIORITY
}

/// Longest template `timeout`: a year.
const MAX_TASK_TIMEOUT_MS: i64 = 366 * 86_400_000;

/// A template `timeout` in milliseconds, when valid: a whole number of seconds, minutes,
/// hours or days, from one second to a year.
pub fn timeout_ms(text: &str) -> Option<i64> {
    let ms = crate::span::parse_span(text, &["s", "m", "h", "d"])
        .ok()?
        .num_milliseconds();
    (1_000..=MAX_TASK_TIMEOUT_MS).contains(&ms).then_some(ms)
}

impl TemplateDefinition {
    /// Its `timeout` in milliseconds.
    pub fn timeout_ms(&self) -> Option<i64> {
        self.timeout.as_deref().and_then(timeout_ms)
    }

    /// Whether a new task's creation may leave steps ready for the dispatcher beyond the
    /// ones it claims: a first step fans out (its instances past the first batch), or
    /// starts a child task (whose own first steps past the bound of children one
    /// transaction starts).
    pub fn first_steps_leave_work(&self) -> bool {
        self.steps.iter().any(|step| {
            step.depends_on.is_empty() && (step.for_each.is_some() || step.handler == TASK_HANDLER)
        })
    }
}

/// How long a failed step waits before its next attempt. A handler's `retry_after` wins,
/// capped by `max_ms`.
///
/// Stored and shown in the form it is written in templates (seconds), so a stored
/// definition reads back through the parser unchanged.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(into = "BackoffRepr", from = "BackoffRepr")]
pub struct Backoff {
    /// Exponential policy: the first retry waits this long, each next one twice as long.
    pub base_ms: i64,
    /// No wait is longer (also caps a handler's `retry_after`).
    pub max_ms: i64,
    /// Randomise each exponential wait to 50–100% of its value, so failures that
    /// happened together do not retry together.
    pub jitter: bool,
    /// Explicit schedule instead: retry n waits `schedule_ms[n-1]`; the last entry repeats.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule_ms: Option<Vec<i64>>,
}

impl Default for Backoff {
    /// Base 1 s, cap 30 s, with jitter (tasker-engine's formula).
    fn default() -> Self {
        Backoff {
            base_ms: 1_000,
            max_ms: 30_000,
            jitter: true,
            schedule_ms: None,
        }
    }
}

/// [`Backoff`] as written in templates.
#[derive(serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
#[schema(as = Backoff, description = "Wait between attempts, in seconds as written in templates: `base_seconds`, `max_seconds` and `jitter` for the exponential policy, or `schedule` (with `max_seconds`) for an explicit list of waits.")]
struct BackoffRepr {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    base_seconds: Option<f64>,
    max_seconds: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    jitter: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    schedule: Option<Vec<f64>>,
}

impl From<Backoff> for BackoffRepr {
    fn from(backoff: Backoff) -> Self {
        let seconds = |ms: i64| ms as f64 / 1000.0;
        match backoff.schedule_ms {
            Some(schedule) => BackoffRepr {
                base_seconds: None,
                max_seconds: seconds(backoff.max_ms),
                jitter: None,
                schedule: Some(schedule.into_iter().map(seconds).collect()),
            },
            None => BackoffRepr {
                base_seconds: Some(seconds(backoff.base_ms)),
                max_seconds: seconds(backoff.max_ms),
                jitter: Some(backoff.jitter),
                schedule: None,
            },
        }
    }
}

impl From<BackoffRepr> for Backoff {
    fn from(repr: BackoffRepr) -> Self {
        let ms = |seconds: f64| (seconds * 1000.0).round() as i64;
        let default = Backoff::default();
        Backoff {
            base_ms: repr.base_seconds.map_or(default.base_ms, ms),
            max_ms: ms(repr.max_seconds),
            jitter: repr.jitter.unwrap_or(repr.schedule.is_none()),
            schedule_ms: repr.schedule.map(|s| s.into_iter().map(ms).collect()),
        }
    }
}

/// A step's concurrency limit: at most `limit` steps of this name (in this template's
/// tasks) enqueued or running at once per value of `key`, across the whole fleet.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct ConcurrencyLimit {
    /// A CEL expression over `context` and `task`, evaluated when a task is created, such
    /// as `context.customer_id`.
    pub key: String,
    /// At most this many at once, 1 to 10,000.
    pub limit: i32,
}

/// A template's concurrency limit: at most `limit` of its tasks started and unfinished at
/// once per value of `key`, across the whole fleet.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct TaskConcurrency {
    /// A CEL expression over `context` and `task`, evaluated when a task is created.
    pub key: String,
    /// At most this many at once, 1 to 10,000.
    pub limit: i32,
    /// What a task past the limit does (default `queue`).
    #[serde(default)]
    pub on_limit: OnLimit,
}

/// What a task past its template's concurrency limit does.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    serde::Serialize,
    serde::Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum OnLimit {
    /// It waits, `pending`, until a task of its key finishes.
    #[default]
    Queue,
    /// It is cancelled.
    CancelNewest,
    /// The oldest running task of its key is cancelled, and it starts.
    CancelOldest,
}

impl OnLimit {
    /// As written in templates and stored.
    pub fn as_str(self) -> &'static str {
        match self {
            OnLimit::Queue => "queue",
            OnLimit::CancelNewest => "cancel_newest",
            OnLimit::CancelOldest => "cancel_oldest",
        }
    }
}

/// A step's rate limit: at most `limit` starts per window `per` per value of `key`. The
/// budget is the key value's, shared by every step (of any template) whose key gives the
/// same value: one partner API for the whole fleet.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct RateLimit {
    /// A CEL expression over `context` and `task`, evaluated when a task is created, such
    /// as `'partner-api'`.
    pub key: String,
    /// At most this many starts per window, 1 to 10,000.
    pub limit: i32,
    /// The window, as written: `1s`, `1m`, `1h`, or a number of them (`10s`), at most a day.
    pub per: String,
}

impl RateLimit {
    /// The window in milliseconds.
    pub fn per_ms(&self) -> i64 {
        window_ms(&self.per).unwrap_or(1_000)
    }
}

fn default_max_deferrals() -> i32 {
    DEFAULT_MAX_DEFERRALS
}

/// One step of a [`TemplateDefinition`].
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
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
    /// Wait between attempts.
    #[schema(value_type = BackoffRepr)]
    #[serde(default)]
    pub backoff: Backoff,
    /// How many times a handler may answer "not now" (a deferral, which spends no
    /// attempt) before the step fails.
    #[serde(default = "default_max_deferrals")]
    pub max_deferrals: i32,
    /// At most so many of this step at once per key value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<ConcurrencyLimit>,
    /// At most so many starts of this step per window per key value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
    /// A CEL condition, evaluated once its parents are done: false skips the step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub when: Option<String>,
    /// A CEL list, evaluated once its parents are done: the step runs once per element
    /// (an instance, with `item` and `index`), and its dependents see the list of the
    /// instances' results in element order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub for_each: Option<String>,
    /// At most so many instances of a `for_each` step run at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_parallel: Option<i32>,
    /// When it runs after its parents: all succeeded (the default), all finished
    /// whatever the outcome, or one failed.
    #[serde(default, skip_serializing_if = "Trigger::is_all_success")]
    pub trigger: Trigger,
}

/// A step's `trigger`: which outcomes of its parents let it run.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    serde::Serialize,
    serde::Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Trigger {
    /// Every parent completed (or was skipped or resolved).
    #[default]
    AllSuccess,
    /// Every parent finished, whatever the outcome: a clean-up step.
    AllDone,
    /// Only if a parent ended in `error`: a compensation step. Skipped otherwise.
    OneFailed,
}

impl Trigger {
    /// The default, left out of a stored definition.
    pub fn is_all_success(&self) -> bool {
        *self == Trigger::AllSuccess
    }

    /// The name in a template.
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::AllSuccess => "all_success",
            Trigger::AllDone => "all_done",
            Trigger::OneFailed => "one_failed",
        }
    }
}

impl StepDefinition {
    /// Whether the coordinator decides about the step once its parents are done, before
    /// any worker sees it: it fans out (`for_each`), waits for a signal (`tasker.wait`),
    /// starts a child task (`tasker.task`),
    /// or runs only if a parent failed (`trigger: one_failed`).
    pub fn run_by_coordinator(&self) -> bool {
        self.for_each.is_some()
            || self.handler == WAIT_HANDLER
            || self.handler == TASK_HANDLER
            || self.trigger == Trigger::OneFailed
    }
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
    /// Problems as one line: `path: message; path: message`.
    pub fn listed(problems: &[Problem]) -> String {
        problems
            .iter()
            .map(|problem| format!("{}: {}", problem.path, problem.message))
            .collect::<Vec<_>>()
            .join("; ")
    }

    pub(crate) fn new(path: impl Into<String>, code: &str, message: impl Into<String>) -> Self {
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

/// A valid template, and what was accepted in it without being used.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedTemplate {
    /// The normalised template.
    pub definition: TemplateDefinition,
    /// Keys and values of a tasker-engine file that Tasker accepts and does not act on,
    /// each with its path and a message saying why (codes `unknown_key` and
    /// [`codes::IGNORED`]); at most [`MAX_PROBLEMS`]. Empty for project-format files,
    /// whose unknown keys are problems.
    pub warnings: Vec<Problem>,
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
    parse_template_with_limits(text, environment, TemplateLimits::default())
}

/// [`parse_template`] with `limits` (such as fewer steps than [`MAX_STEPS`]).
///
/// # Errors
///
/// Returns every problem found; see [`codes`] for the possible codes.
pub fn parse_template_with_limits(
    text: &str,
    environment: &str,
    limits: TemplateLimits,
) -> Result<TemplateDefinition, TemplateError> {
    parse_template_with_warnings(text, environment, limits).map(|parsed| parsed.definition)
}

/// [`parse_template_with_limits`], with the warnings: what a tasker-engine file holds
/// that Tasker accepts and does not use.
///
/// # Errors
///
/// Returns every problem found; see [`codes`] for the possible codes.
pub fn parse_template_with_warnings(
    text: &str,
    environment: &str,
    limits: TemplateLimits,
) -> Result<ParsedTemplate, TemplateError> {
    let value = parse_document(text).map_err(|problem| TemplateError(vec![problem]))?;
    template_from_value_with_warnings(&value, environment, limits)
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
    template_from_value_with_limits(value, environment, TemplateLimits::default())
}

/// [`template_from_value`] with `limits`.
///
/// # Errors
///
/// Returns every problem found; see [`codes`] for the possible codes.
pub fn template_from_value_with_limits(
    value: &serde_json::Value,
    environment: &str,
    limits: TemplateLimits,
) -> Result<TemplateDefinition, TemplateError> {
    template_from_value_with_warnings(value, environment, limits).map(|parsed| parsed.definition)
}

/// [`template_from_value_with_limits`], with the warnings (see [`ParsedTemplate`]).
///
/// # Errors
///
/// Returns every problem found; see [`codes`] for the possible codes.
pub fn template_from_value_with_warnings(
    value: &serde_json::Value,
    environment: &str,
    limits: TemplateLimits,
) -> Result<ParsedTemplate, TemplateError> {
    let mut walker = Walker::new(limits.max_steps.min(MAX_STEPS));
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
    check_depth(&mut walker, &draft);
    check_config_size(&mut walker, &draft, limits.max_config_bytes);
    if walker.problems.is_empty() {
        check_schedule_contexts(&mut walker, &draft);
    }
    if legacy && walker.problems.is_empty() {
        check_other_environments(&mut walker, root, environment, limits);
    }
    if walker.problems.is_empty() {
        Ok(ParsedTemplate {
            warnings: std::mem::take(&mut walker.warnings),
            definition: draft.into_definition(),
        })
    } else {
        Err(TemplateError(walker.into_problems()))
    }
}

/// The most environments of a tasker-engine file checked besides the selected one.
const MAX_OTHER_ENVIRONMENTS: usize = 16;

/// A tasker-engine file's other environments, each merged and checked as the selected
/// one was: a file valid here may not be where another coordinator loads it
/// (`TASKER_ENV`). One problem per environment that fails, at `environments.<name>`,
/// naming its first problems. Called once the selected environment passed, so what
/// each reports is its own.
fn check_other_environments(
    w: &mut Walker,
    root: &serde_json::Map<String, serde_json::Value>,
    environment: &str,
    limits: TemplateLimits,
) {
    let Some(environments) = root.get("environments").and_then(|e| e.as_object()) else {
        return;
    };
    for (name, _) in environments
        .iter()
        .filter(|(name, value)| name.as_str() != environment && value.is_object())
        .take(MAX_OTHER_ENVIRONMENTS)
    {
        let mut other = Walker::new(limits.max_steps.min(MAX_STEPS));
        let draft = walk_legacy(&mut other, root, name);
        check_graph(&mut other, &draft);
        check_depth(&mut other, &draft);
        check_config_size(&mut other, &draft, limits.max_config_bytes);
        let problems = other.into_problems();
        if problems.is_empty() {
            continue;
        }
        let shown: Vec<String> = problems
            .iter()
            .take(5)
            .map(|p| format!("{}: {}", p.path, p.message))
            .collect();
        let more = problems.len().saturating_sub(shown.len());
        w.report(
            join("environments", name),
            codes::INVALID_VALUE,
            format!(
                "merged for environment `{name}`, the template is invalid: {}{}",
                shown.join("; "),
                if more > 0 {
                    format!(" (and {more} more)")
                } else {
                    String::new()
                }
            ),
        );
    }
}

/// Each schedule's context, against the template's `context_schema`: a context it
/// refuses would make every fire fail.
fn check_schedule_contexts(w: &mut Walker, draft: &Draft) {
    let Some(schema) = &draft.context_schema else {
        return;
    };
    for (index, schedule) in draft.schedules.iter().enumerate() {
        let context = schedule
            .context
            .clone()
            .unwrap_or_else(|| serde_json::json!({}));
        if let Err(problems) = validate_against_schema(schema, &context) {
            for problem in problems {
                w.report(
                    format!("schedules[{index}].context{}", problem.path),
                    codes::SCHEMA,
                    problem.message,
                );
            }
        }
    }
}

/// Each step's config, and each schedule's context, no deeper than the messages that
/// carry them allow.
fn check_depth(w: &mut Walker, draft: &Draft) {
    use crate::messages::{MAX_JSON_DEPTH, nests_deeper_than, too_deep_problem};
    for step in &draft.steps {
        if nests_deeper_than(&step.config, MAX_JSON_DEPTH) {
            // A tasker-engine step's `handler_config` is its config.
            w.report(
                format!("{}.config", step.path),
                codes::INVALID_VALUE,
                too_deep_problem(),
            );
        }
    }
    for (index, schedule) in draft.schedules.iter().enumerate() {
        if schedule
            .context
            .as_ref()
            .is_some_and(|context| nests_deeper_than(context, MAX_JSON_DEPTH))
        {
            w.report(
                format!("schedules[{index}].context"),
                codes::INVALID_VALUE,
                too_deep_problem(),
            );
        }
    }
}

/// The steps' configs together, as they will be stored, within `max_bytes`.
fn check_config_size(w: &mut Walker, draft: &Draft, max_bytes: usize) {
    let total: usize = draft
        .steps
        .iter()
        .map(|step| serde_json::to_vec(&step.config).map_or(0, |bytes| bytes.len()))
        .sum();
    if total > max_bytes {
        w.report(
            "steps",
            codes::CONFIG_TOO_LARGE,
            format!(
                "the steps' configs take {total} bytes together as stored, more than the \
                 {max_bytes} allowed (a YAML alias counts at every use)"
            ),
        );
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
        let mut problems: Vec<Problem> = validator
            .iter_errors(instance)
            .take(MAX_PROBLEMS + 1)
            .map(|error| {
                Problem::new(
                    error.instance_path().as_str(),
                    codes::SCHEMA,
                    error.to_string(),
                )
            })
            .collect();
        if problems.len() > MAX_PROBLEMS {
            problems.truncate(MAX_PROBLEMS);
            problems.push(Problem::new(
                "",
                codes::MORE_PROBLEMS,
                format!("more violations were found; only the first {MAX_PROBLEMS} are listed"),
            ));
        }
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
    /// The position of the step called `name`, in template order (a linear search: for
    /// many names, use [`TemplateDefinition::parent_indices`]).
    pub fn step_index(&self, name: &str) -> Option<usize> {
        self.steps.iter().position(|step| step.name == name)
    }

    /// For each step, the positions of its parents, in template order; dependencies
    /// naming no step are left out. Linear in steps and edges.
    pub fn parent_indices(&self) -> Vec<Vec<usize>> {
        let index: HashMap<&str, usize> = self
            .steps
            .iter()
            .enumerate()
            .map(|(n, step)| (step.name.as_str(), n))
            .collect();
        self.steps
            .iter()
            .map(|step| {
                let mut parents: Vec<usize> = step
                    .depends_on
                    .iter()
                    .filter_map(|parent| index.get(parent.as_str()).copied())
                    .collect();
                parents.sort_unstable();
                parents
            })
            .collect()
    }

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
