//! Walking a tasker-engine 1.x document (`step_templates`,
//! `task_handler_class`, ...), including its per environment overrides.

use std::collections::{HashMap, HashSet};

use serde_json::{Map, Value};

use super::child_tasks::{TASK_HANDLER, walk_child_task};
use super::draft::{Dep, Draft, StepDraft, dedup_deps};
use super::waits::{WAIT_HANDLER, walk_wait};
use super::walker::{Walker, field, item, join, retry_limit};
use super::{
    Backoff, DEFAULT_MAX_DEFERRALS, DEFAULT_PRIORITY, DEFAULT_RETRY_LIMIT, DEFAULT_TIMEOUT_MS,
    MAX_NAMESPACE_LEN, Trigger, codes,
};

pub(super) const LEGACY_TOP_KEYS: &[&str] = &[
    "name",
    "task_handler_class",
    "class_name",
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
    "handler_config",
    "custom_events",
];
pub(super) const LEGACY_TOP_HINTS: &[(&str, &str)] = &[
    ("namespace", "namespace_name"),
    ("context_schema", "schema"),
    ("steps", "step_templates"),
];
pub(super) const LEGACY_STEP_KEYS: &[&str] = &[
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
pub(super) const LEGACY_STEP_HINTS: &[(&str, &str)] = &[
    ("handler", "handler_class"),
    ("config", "handler_config"),
    ("depends_on", "depends_on_steps"),
    ("retryable", "default_retryable"),
    ("retry_limit", "default_retry_limit"),
];
pub(super) const LEGACY_EVENT_KEYS: &[&str] = &["name", "description"];
pub(super) const LEGACY_ENVIRONMENT_KEYS: &[&str] = &["step_templates"];
pub(super) const LEGACY_OVERRIDE_KEYS: &[&str] = &["name", "handler_config"];

/// Why a tasker-engine key that Tasker does not act on is accepted: said in the warning.
const NOT_PUBLISHED: &str = "Tasker does not publish custom events: handlers cannot fire them";

pub(super) fn walk_legacy(w: &mut Walker, root: &Map<String, Value>, environment: &str) -> Draft {
    // tasker-engine merged the selected environment into the whole document before it
    // read it (`TaskBuilder#deep_merge_configs`): any key may be overridden, and step
    // templates are merged by name.
    let merged;
    let root = match field(root, "environments") {
        Some(value) => {
            merged = apply_environment(w, root, value, environment);
            &merged
        }
        None => root,
    };
    // tasker-engine checked its files with a JSON Schema that allowed other keys and
    // ignored them; they are warnings here, so such files register unchanged.
    w.ignored_keys(root, "", LEGACY_TOP_KEYS, LEGACY_TOP_HINTS);
    let name = w.required_template_name(root, "");
    // `class_name` is the name older tasker-engine files gave the task handler class.
    if field(root, "class_name").is_some() && field(root, "task_handler_class").is_none() {
        w.required_label(root, "", "class_name", "task handler class");
    } else {
        w.required_label(root, "", "task_handler_class", "task handler class");
        w.optional_label(root, "", "class_name", "task handler class");
    }
    let namespace = match field(root, "namespace_name") {
        Some(value) => w.string(value, "namespace_name").map(|text| {
            w.check_identifier(text, "namespace_name", "namespace", MAX_NAMESPACE_LEN);
            text.to_owned()
        }),
        None => Some("default".to_owned()),
    };
    let version = w.version(root, "");
    w.optional_string(root, "", "module_namespace");
    if legacy_bool(w, root, "", "concurrent") == Some(false) {
        w.warn(
            "concurrent",
            codes::IGNORED,
            "`concurrent: false` is ignored: Tasker runs every step whose parents are done \
             at once; to run steps one after another, make each depend on the previous one",
        );
    }
    let default_system = w.optional_label(
        root,
        "",
        "default_dependent_system",
        "default dependent system",
    );
    let named_steps =
        field(root, "named_steps").map(|value| w.name_list(value, "named_steps", "step names"));
    let description = w
        .optional_string(root, "", "description")
        .map(str::to_owned);
    let context_schema = w.context_schema(root, "schema");
    if let Some(value) = field(root, "handler_config") {
        if !value.is_object() {
            w.wrong_type("handler_config", "an object (mapping)", value);
        } else {
            w.warn(
                "handler_config",
                codes::IGNORED,
                "the task handler's `handler_config` is accepted and not used: no task \
                 handler runs in Tasker, and tasker-engine did not give it to step handlers \
                 either; put what a step's handler needs in that step's `handler_config`",
            );
        }
    }
    if let Some(value) = field(root, "custom_events") {
        walk_custom_events(w, value, "custom_events");
    }

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
    if let Some(named) = named_steps {
        check_named_steps(w, &named, &steps);
    }

    Draft {
        namespace,
        name,
        version,
        description,
        context_schema,
        priority: DEFAULT_PRIORITY,
        concurrency: Vec::new(),
        timeout: None,
        steps,
        schedules: Vec::new(),
    }
}

/// `named_steps`: tasker-engine refused a file whose step templates, or their
/// dependencies, used a name the list does not hold (`TaskBuilder#validate_step_names`).
fn check_named_steps(w: &mut Walker, named: &[Dep], steps: &[StepDraft]) {
    let listed: HashSet<&str> = named.iter().map(|dep| dep.name.as_str()).collect();
    for step in steps {
        if let Some(name) = step.name.as_deref()
            && !listed.contains(name)
        {
            w.report(
                step.name_path.as_str(),
                codes::INVALID_VALUE,
                format!("step `{name}` is not in `named_steps`"),
            );
        }
        for dep in &step.deps {
            if !listed.contains(dep.name.as_str()) {
                w.report(
                    dep.path.as_str(),
                    codes::INVALID_VALUE,
                    format!("dependency `{}` is not in `named_steps`", dep.name),
                );
            }
        }
    }
}

fn walk_legacy_step(
    w: &mut Walker,
    object: &Map<String, Value>,
    path: String,
    default_system: Option<&str>,
) -> StepDraft {
    w.ignored_keys(object, &path, LEGACY_STEP_KEYS, LEGACY_STEP_HINTS);
    let name = w.step_name(object, &path);
    let handler = w.required_label(object, &path, "handler_class", "handler class");
    let description = w
        .optional_string(object, &path, "description")
        .map(str::to_owned);
    let dependent_system = w
        .optional_label(object, &path, "dependent_system", "dependent system")
        .or_else(|| default_system.map(str::to_owned));
    let retryable = legacy_bool(w, object, &path, "default_retryable").unwrap_or(true);
    let retry_limit =
        retry_limit(w, object, &path, "default_retry_limit").unwrap_or(DEFAULT_RETRY_LIMIT);
    let skippable = legacy_bool(w, object, &path, "skippable").unwrap_or(false);

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
    // The handlers the coordinator runs take their config as in the project format.
    match handler.as_deref() {
        Some(WAIT_HANDLER) => walk_wait(w, object, &path, "handler_config", name.as_deref()),
        Some(TASK_HANDLER) => {
            walk_child_task(w, object, &path, "handler_config", name.as_deref());
        }
        _ => {}
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
        backoff: Backoff::default(),
        max_deferrals: DEFAULT_MAX_DEFERRALS,
        concurrency: None,
        rate_limit: None,
        when: None,
        for_each: None,
        max_parallel: None,
        trigger: Trigger::AllSuccess,
    }
}

/// A boolean of a tasker-engine file. tasker-engine read its files as YAML 1.1 (Ruby's
/// Psych), where `yes`, `no`, `on` and `off` (in any case) are booleans too; here, as YAML
/// 1.2, they arrive as strings, and are taken as the booleans they were written as.
fn legacy_bool(
    w: &mut Walker,
    object: &Map<String, Value>,
    parent: &str,
    key: &str,
) -> Option<bool> {
    if let Some(Value::String(text)) = field(object, key) {
        match text.to_ascii_lowercase().as_str() {
            "yes" | "on" | "true" => return Some(true),
            "no" | "off" | "false" => return Some(false),
            _ => {}
        }
    }
    w.optional_bool(object, parent, key)
}

/// `custom_events` (of the template or of a step): a list of `{name, description}`;
/// checked, then accepted with a warning.
fn walk_custom_events(w: &mut Walker, value: &Value, path: &str) {
    let Some(list) = value.as_array() else {
        w.wrong_type(path, "a list of events", value);
        return;
    };
    let mut names = Vec::new();
    for (index, event) in list.iter().enumerate() {
        let event_path = item(path, index);
        let Some(object) = event.as_object() else {
            w.not_an_object(&event_path, event, "a custom event");
            continue;
        };
        w.ignored_keys(object, &event_path, LEGACY_EVENT_KEYS, &[]);
        if let Some(name) = w.required_label(object, &event_path, "name", "event name") {
            names.push(name);
        }
        w.optional_string(object, &event_path, "description");
    }
    if !names.is_empty() {
        w.warn(
            path,
            codes::IGNORED,
            format!(
                "custom events {} are accepted and not registered: {NOT_PUBLISHED}; \
                 Tasker's own lifecycle events are on the `tasker.events` exchange",
                names
                    .iter()
                    .map(|name| format!("`{name}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        );
    }
}

/// `environments`: checks every environment and returns the document with the selected
/// one merged in, as tasker-engine's `TaskBuilder` did: mappings merge key by key, each
/// entry of its `step_templates` merges into the step of the same name, anything else
/// replaces. A `null` override changes nothing (null means absent in Tasker's files).
/// An override of a step that `step_templates` does not define was skipped by
/// tasker-engine: it is a warning.
fn apply_environment(
    w: &mut Walker,
    root: &Map<String, Value>,
    value: &Value,
    environment: &str,
) -> Map<String, Value> {
    let mut merged = root.clone();
    merged.remove("environments");
    let Some(environments) = value.as_object() else {
        w.not_an_object("environments", value, "`environments`");
        return merged;
    };
    let names: HashSet<&str> = field(root, "step_templates")
        .and_then(Value::as_array)
        .map(|list| {
            list.iter()
                .filter_map(|step| step.get("name").and_then(Value::as_str))
                .collect()
        })
        .unwrap_or_default();
    let mut selected: Option<&Map<String, Value>> = None;
    let mut step_overrides: Vec<(String, &Map<String, Value>)> = Vec::new();
    for (env_name, env_value) in environments {
        let env_path = join("environments", env_name);
        if env_value.is_null() {
            continue;
        }
        let Some(env_object) = env_value.as_object() else {
            w.not_an_object(&env_path, env_value, "an environment");
            continue;
        };
        let chosen = env_name == environment;
        if chosen {
            selected = Some(env_object);
        } else {
            // The selected environment's keys are checked where they land, once merged.
            let top: Vec<&str> = LEGACY_TOP_KEYS
                .iter()
                .copied()
                .filter(|key| *key != "environments")
                .collect();
            w.ignored_keys(env_object, &env_path, &top, LEGACY_TOP_HINTS);
        }
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
            if !chosen {
                w.ignored_keys(
                    entry_object,
                    &entry_path,
                    LEGACY_STEP_KEYS,
                    LEGACY_STEP_HINTS,
                );
            }
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
                w.warn(
                    name_path,
                    codes::IGNORED,
                    format!(
                        "environment `{env_name}` overrides step `{step_name}`, which is not \
                         defined in `step_templates`; the override is ignored"
                    ),
                );
                continue;
            }
            if chosen {
                step_overrides.push((step_name.to_owned(), entry_object));
            }
        }
    }
    let Some(selected) = selected else {
        return merged;
    };
    for (key, overlay) in selected {
        if key == "step_templates" || key == "environments" || overlay.is_null() {
            continue;
        }
        match merged.get_mut(key) {
            Some(base) => deep_merge(base, overlay),
            None => {
                merged.insert(key.clone(), overlay.clone());
            }
        }
    }
    if let Some(Value::Array(steps)) = merged.get_mut("step_templates") {
        // Each override finds its step by name once: a name given to several steps is
        // refused anyway (`duplicate_step`), so the first is enough.
        let mut by_name: HashMap<String, usize> = HashMap::new();
        for (index, step) in steps.iter().enumerate() {
            if let Some(name) = step.get("name").and_then(Value::as_str) {
                by_name.entry(name.to_owned()).or_insert(index);
            }
        }
        for (step_name, overlay) in step_overrides {
            let Some(Value::Object(step)) = by_name.get(&step_name).map(|&i| &mut steps[i]) else {
                continue;
            };
            for (key, value) in overlay {
                if key == "name" || value.is_null() {
                    continue;
                }
                match step.get_mut(key) {
                    Some(base) if !base.is_null() => deep_merge(base, value),
                    _ => {
                        step.insert(key.clone(), value.clone());
                    }
                }
            }
        }
    }
    merged
}

/// Merges `overlay` into `base`: objects merge key by key, recursively; any
/// other overlay value replaces the base value.
pub(super) fn deep_merge(base: &mut Value, overlay: &Value) {
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
