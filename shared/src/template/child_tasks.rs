//! `tasker.task`: a step the coordinator runs, holding no worker slot, that starts a task
//! of another template (its child) and completes with the child's leaf results.
//!
//! ```yaml
//!   - name: import_region
//!     handler: tasker.task
//!     depends_on: [plan]
//!     retry_limit: 2          # a child that fails is retried once more, then fails the step
//!     config:
//!       namespace: data
//!       name: region_import
//!       version: "1.0.0"      # optional: the newest version when absent
//!       context: '{"region": parents.plan.region, "day": context.day}'
//! ```
//!
//! Its config is checked when the template is registered: `namespace` and `name` (as a
//! template's), an optional `version` (semantic), and an optional `context`, a CEL map over
//! the variables of a condition (`context`, `parents`, `task`) that gives the child's
//! context (`{}` when absent). The child template is looked up when the step starts: a
//! missing one fails the step (`template_not_found`).

use serde_json::{Map, Value};

use super::conditions::compile_expression;
use super::limits::about;
use super::waits::coordinator_config;
use super::walker::{Walker, join, template_name_error};
use super::{MAX_NAMESPACE_LEN, codes};

/// The handler the coordinator runs as a child task.
pub const TASK_HANDLER: &str = "tasker.task";

/// What a `tasker.task` step starts, read from its (checked) config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChildTemplate<'a> {
    /// The child template's namespace.
    pub namespace: &'a str,
    /// Its name.
    pub name: &'a str,
    /// Its version; the newest when absent.
    pub version: Option<&'a str>,
    /// The CEL map that gives the child's context; `{}` when absent.
    pub context: Option<&'a str>,
}

impl<'a> ChildTemplate<'a> {
    /// The child of a `tasker.task` step's config; `None` for a config the template check
    /// would have refused.
    pub fn of(config: &'a Value) -> Option<Self> {
        Some(ChildTemplate {
            namespace: config.get("namespace")?.as_str()?,
            name: config.get("name")?.as_str()?,
            version: config.get("version").and_then(Value::as_str),
            context: config.get("context").and_then(Value::as_str),
        })
    }
}

/// Check a `tasker.task` step's config (its key `config_key`, at `path`) and that it
/// does not fan out.
pub(super) fn walk_child_task(
    w: &mut Walker,
    object: &Map<String, Value>,
    path: &str,
    config_key: &str,
    step: Option<&str>,
) {
    let config_path = join(path, config_key);
    let Some(config) = coordinator_config(
        w,
        object,
        path,
        config_key,
        step,
        TASK_HANDLER,
        "{namespace: <namespace>, name: <template>, version?: <version>, context?: <CEL map>}",
    ) else {
        return;
    };
    w.unknown_keys(
        config,
        &config_path,
        &["namespace", "name", "version", "context"],
        &[],
    );
    w.required_identifier(
        config,
        &config_path,
        "namespace",
        "child namespace",
        MAX_NAMESPACE_LEN,
    );
    if let Some(name) = w.required(config, &config_path, "name", "child template name") {
        let name_path = join(&config_path, "name");
        if let Some(text) = w.string(name, &name_path)
            && let Some(reason) = template_name_error(text)
        {
            w.report(
                name_path,
                codes::INVALID_VALUE,
                format!("{}: the child template name `{text}` {reason}", about(step)),
            );
        }
    }
    if let Some(version) = w.optional_string(config, &config_path, "version")
        && let Err(error) = semver::Version::parse(version)
    {
        w.report(
            join(&config_path, "version"),
            codes::INVALID_VALUE,
            format!(
                "{}: the child version `{version}` is not a semantic version: {error}",
                about(step)
            ),
        );
    }
    let context_path = join(&config_path, "context");
    if let Some(source) = w.optional_string(config, &config_path, "context")
        && let Err(error) = compile_expression(source)
    {
        w.report(
            context_path,
            codes::INVALID_EXPRESSION,
            format!("{}: the child's context {error}", about(step)),
        );
    }
}
