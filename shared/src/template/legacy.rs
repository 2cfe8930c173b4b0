//! Walking a tasker-engine 1.x document (`step_templates`,
//! `task_handler_class`, ...), including its per environment overrides.

use std::collections::HashSet;

use serde_json::{Map, Value};

use super::draft::{Dep, Draft, StepDraft, dedup_deps};
use super::walker::{Walker, field, item, join, retry_limit};
use super::{
    Backoff, DEFAULT_MAX_DEFERRALS, DEFAULT_RETRY_LIMIT, DEFAULT_TIMEOUT_MS, MAX_NAME_LEN,
    MAX_NAMESPACE_LEN, codes,
};

pub(super) const LEGACY_TOP_KEYS: &[&str] = &[
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

pub(super) fn walk_legacy(w: &mut Walker, root: &Map<String, Value>, environment: &str) -> Draft {
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
        backoff: Backoff::default(),
        max_deferrals: DEFAULT_MAX_DEFERRALS,
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
