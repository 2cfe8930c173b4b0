//! Walking a project-format document (`namespace`, `name`, `steps`, ...).

use serde_json::{Map, Value};

use super::TemplateSchedule;
use super::backoff::walk_backoff;
use super::child_tasks::{TASK_HANDLER, walk_child_task};
use super::conditions::{walk_for_each, walk_when};
use super::draft::{Draft, StepDraft, dedup_deps};
use super::limits::about;
use super::limits::{walk_concurrency, walk_rate_limit, walk_task_concurrency};
use super::waits::{WAIT_HANDLER, walk_wait};
use super::walker::{Walker, field, item, join, retry_limit};
use super::{
    Backoff, DEFAULT_MAX_DEFERRALS, DEFAULT_PRIORITY, DEFAULT_RETRY_LIMIT, DEFAULT_TIMEOUT_MS,
    MAX_DEFERRALS, MAX_NAMESPACE_LEN, MAX_PRIORITY, MAX_TIMEOUT_MS, Trigger, codes,
};

pub(super) const PROJECT_TOP_KEYS: &[&str] = &[
    "namespace",
    "name",
    "version",
    "description",
    "context_schema",
    "priority",
    "concurrency",
    "timeout",
    "defaults",
    "steps",
    "schedules",
];
pub(super) const PROJECT_TOP_HINTS: &[(&str, &str)] = &[
    ("namespace_name", "namespace"),
    ("schema", "context_schema"),
];
pub(super) const PROJECT_DEFAULT_KEYS: &[&str] = &[
    "retryable",
    "retry_limit",
    "timeout_ms",
    "backoff",
    "max_deferrals",
];
pub(super) const PROJECT_DEFAULT_HINTS: &[(&str, &str)] = &[
    ("default_retryable", "retryable"),
    ("default_retry_limit", "retry_limit"),
    ("timeout_seconds", "timeout_ms"),
];
pub(super) const PROJECT_STEP_KEYS: &[&str] = &[
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
    "backoff",
    "max_deferrals",
    "concurrency",
    "rate_limit",
    "when",
    "for_each",
    "max_parallel",
    "trigger",
];
pub(super) const PROJECT_STEP_HINTS: &[(&str, &str)] = &[
    ("handler_class", "handler"),
    ("handler_config", "config"),
    ("depends_on_step", "depends_on"),
    ("depends_on_steps", "depends_on"),
    ("default_retryable", "retryable"),
    ("default_retry_limit", "retry_limit"),
    ("timeout_seconds", "timeout_ms"),
    ("ratelimit", "rate_limit"),
    ("rate", "rate_limit"),
    ("foreach", "for_each"),
    ("parallelism", "max_parallel"),
];

/// Step settings that `defaults` (project format) can change.
#[derive(Clone)]
struct StepDefaults {
    retryable: bool,
    retry_limit: i32,
    timeout_ms: i64,
    backoff: Backoff,
    max_deferrals: i32,
}

impl Default for StepDefaults {
    fn default() -> Self {
        Self {
            retryable: true,
            retry_limit: DEFAULT_RETRY_LIMIT,
            timeout_ms: DEFAULT_TIMEOUT_MS,
            backoff: Backoff::default(),
            max_deferrals: DEFAULT_MAX_DEFERRALS,
        }
    }
}

pub(super) fn walk_project(w: &mut Walker, root: &Map<String, Value>) -> Draft {
    w.unknown_keys(root, "", PROJECT_TOP_KEYS, PROJECT_TOP_HINTS);
    let namespace = w.required_identifier(root, "", "namespace", "namespace", MAX_NAMESPACE_LEN);
    let name = w.required_template_name(root, "");
    let version = w.version(root, "");
    let description = w
        .optional_string(root, "", "description")
        .map(str::to_owned);
    let context_schema = w.context_schema(root, "context_schema");
    let priority = w
        .optional_int(root, "", "priority", 0, MAX_PRIORITY.into())
        .map_or(DEFAULT_PRIORITY, |priority| priority as i16);
    let concurrency = walk_task_concurrency(w, root);
    let timeout = task_timeout(w, root);

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
                defaults.backoff = walk_backoff(w, object, "defaults", &defaults.backoff);
                if let Some(max) =
                    w.optional_int(object, "defaults", "max_deferrals", 0, MAX_DEFERRALS.into())
                {
                    defaults.max_deferrals = max as i32;
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
                Some(object) => steps.push(walk_project_step(w, object, path, &defaults)),
                None => w.not_an_object(&path, value, "a step"),
            }
        }
    }

    let schedules = walk_schedules(w, root);
    Draft {
        namespace,
        name,
        version,
        description,
        context_schema,
        priority,
        concurrency,
        timeout,
        steps,
        schedules,
    }
}

/// The template's `schedules`: each `{name, cron, timezone?, context?}`, its cron and
/// time zone checked, names unique.
fn walk_schedules(w: &mut Walker, root: &Map<String, Value>) -> Vec<TemplateSchedule> {
    let Some(value) = field(root, "schedules") else {
        return Vec::new();
    };
    let Some(list) = value.as_array() else {
        w.wrong_type("schedules", "a list of schedules", value);
        return Vec::new();
    };
    let mut schedules: Vec<TemplateSchedule> = Vec::with_capacity(list.len());
    for (index, value) in list.iter().enumerate() {
        let path = item("schedules", index);
        let Some(object) = value.as_object() else {
            w.not_an_object(&path, value, "a schedule");
            continue;
        };
        w.unknown_keys(object, &path, &["name", "cron", "timezone", "context"], &[]);
        let name = w
            .required(object, &path, "name", "schedule name")
            .and_then(|value| w.string(value, &join(&path, "name")))
            .map(str::to_owned);
        if let Some(name) = &name {
            let valid = !name.is_empty()
                && name.len() <= 128
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
            if !valid {
                w.report(
                    join(&path, "name"),
                    codes::INVALID_VALUE,
                    format!("schedule name `{name}`: 1 to 128 letters, digits, `_`, `-` and `.`"),
                );
            } else if schedules.iter().any(|s| &s.name == name) {
                w.report(
                    join(&path, "name"),
                    codes::INVALID_VALUE,
                    format!("schedule name `{name}` is used twice"),
                );
            }
        }
        let cron = w
            .required(object, &path, "cron", "cron")
            .and_then(|value| w.string(value, &join(&path, "cron")))
            .map(str::to_owned);
        let timezone = w
            .optional_string(object, &path, "timezone")
            .map(str::to_owned);
        let context = field(object, "context").cloned();
        if let Some(context) = &context
            && !context.is_object()
        {
            w.wrong_type(&join(&path, "context"), "an object", context);
        }
        if let Some(cron) = &cron
            && let Err(problems) =
                crate::schedule::Schedule::parse(cron, timezone.as_deref().unwrap_or("UTC"))
        {
            for (key, message) in problems {
                w.report(join(&path, key), codes::INVALID_VALUE, message);
            }
        }
        if let (Some(name), Some(cron)) = (name, cron) {
            schedules.push(TemplateSchedule {
                name,
                cron,
                timezone,
                context,
            });
        }
    }
    schedules
}

/// The template's `timeout`: how long a task may take, from when it may start.
fn task_timeout(w: &mut Walker, root: &Map<String, Value>) -> Option<String> {
    let text = w.optional_string(root, "", "timeout")?;
    if super::timeout_ms(text).is_none() {
        w.report(
            "timeout",
            "invalid_value",
            format!(
                "`timeout` is `{text}`: expected a whole number of seconds, minutes, hours or days (`90s`, `30m`, `12h`, `7d`), from 1s to 366d"
            ),
        );
        return None;
    }
    Some(text.to_owned())
}

fn walk_project_step(
    w: &mut Walker,
    object: &Map<String, Value>,
    path: String,
    defaults: &StepDefaults,
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
    let backoff = walk_backoff(w, object, &path, &defaults.backoff);
    let max_deferrals = w
        .optional_int(object, &path, "max_deferrals", 0, MAX_DEFERRALS.into())
        .map_or(defaults.max_deferrals, |max| max as i32);
    let dependent_system = w.optional_label(object, &path, "dependent_system", "dependent system");
    let concurrency = walk_concurrency(w, object, &path, name.as_deref());
    let rate_limit = walk_rate_limit(w, object, &path, name.as_deref());
    let when = walk_when(w, object, &path, name.as_deref());
    match handler.as_deref() {
        Some(WAIT_HANDLER) => walk_wait(w, object, &path, "config", name.as_deref()),
        Some(TASK_HANDLER) => walk_child_task(w, object, &path, "config", name.as_deref()),
        _ => {}
    }
    let (for_each, max_parallel) =
        walk_for_each(w, object, &path, name.as_deref(), concurrency.is_some());
    let trigger = walk_trigger(w, object, &path, name.as_deref(), deps.is_empty());
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
        backoff,
        max_deferrals,
        concurrency,
        rate_limit,
        when,
        for_each,
        max_parallel,
        trigger,
    }
}

/// A step's `trigger`; the default when absent or reported as a problem. `first`: the
/// step has no parents, so only the default means anything.
fn walk_trigger(
    w: &mut Walker,
    object: &Map<String, Value>,
    path: &str,
    step: Option<&str>,
    first: bool,
) -> Trigger {
    let Some(text) = w.optional_string(object, path, "trigger") else {
        return Trigger::AllSuccess;
    };
    let trigger = match text {
        "all_success" => Trigger::AllSuccess,
        "all_done" => Trigger::AllDone,
        "one_failed" => Trigger::OneFailed,
        other => {
            w.report(
                join(path, "trigger"),
                codes::INVALID_VALUE,
                format!(
                    "{}: `trigger` is `{other}`: expected `all_success`, `all_done` or `one_failed`",
                    about(step)
                ),
            );
            return Trigger::AllSuccess;
        }
    };
    if first && trigger != Trigger::AllSuccess {
        w.report(
            join(path, "trigger"),
            codes::INVALID_VALUE,
            format!(
                "{}: `trigger: {}` decides on the step's parents, and it has none",
                about(step),
                trigger.as_str()
            ),
        );
        return Trigger::AllSuccess;
    }
    trigger
}
