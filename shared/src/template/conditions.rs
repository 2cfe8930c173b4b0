//! A step's `when`: a CEL condition, evaluated once its parents are done.
//!
//! ```yaml
//! steps:
//!   - name: kyc
//!     handler: kyc.check
//!     depends_on: [lookup]
//!     when: "!parents.lookup.existing_customer"   # false: the step is `skipped`
//! ```
//!
//! The expression sees `context` (the task's context), `parents` (each direct parent's
//! results by name; a skipped parent is absent) and `task` (`namespace`, `name`,
//! `version`, `priority`, `tags`). It is compiled when the template is registered (one
//! that does not compile, or names another variable, is a problem there) and evaluated by
//! the coordinator: for a step without parents when its task is created, for the others
//! in the transaction that makes the step ready. True, the step runs; false, it is
//! `skipped`, which its dependents take as done; anything else fails the step
//! permanently (`expression_error`).
//!
//! A step's `for_each` is a CEL list over the same variables, evaluated at the same
//! moment (after `when`, if both): the step runs once per element.
//!
//! ```yaml
//!   - name: load
//!     handler: etl.load_file
//!     depends_on: [list_files]
//!     for_each: "parents.list_files.files"   # one instance per file
//!     max_parallel: 10                        # at most ten at once
//! ```

use serde_json::{Map, Value};

use super::cost;
use super::limits::{about, compile_with};
use super::walker::{Walker, field, join};
use super::{TemplateDefinition, codes};

/// The variables a condition may use.
const VARIABLES: &[&str] = &["context", "parents", "task"];
const VARIABLES_TEXT: &str = "a condition may use `context` (the task's context), `parents` \
     (its parents' results by name) and `task` (its namespace, name, version, priority and tags)";

/// A step's `when`, compiled; `None` (with the problem reported) when it does not compile.
pub(super) fn walk_when(
    w: &mut Walker,
    object: &Map<String, Value>,
    path: &str,
    step: Option<&str>,
) -> Option<String> {
    let value = field(object, "when")?;
    let when_path = join(path, "when");
    let source = w.string(value, &when_path)?;
    match compile_with(source, VARIABLES, VARIABLES_TEXT) {
        Ok(_) => Some(source.to_owned()),
        Err(error) => {
            w.report(
                when_path,
                codes::INVALID_EXPRESSION,
                format!("{}: the condition {error}", about(step)),
            );
            None
        }
    }
}

/// A step's `for_each` (compiled) and `max_parallel`; `None` for what is absent or
/// reported as a problem. `limited`: the step has a `concurrency` of its own, which
/// `max_parallel` cannot be combined with.
pub(super) fn walk_for_each(
    w: &mut Walker,
    object: &Map<String, Value>,
    path: &str,
    step: Option<&str>,
    limited: bool,
) -> (Option<String>, Option<i32>) {
    let for_each = field(object, "for_each").and_then(|value| {
        let list_path = join(path, "for_each");
        let source = w.string(value, &list_path)?;
        match compile_with(source, VARIABLES, VARIABLES_TEXT) {
            Ok(_) => Some(source.to_owned()),
            Err(error) => {
                w.report(
                    list_path,
                    codes::INVALID_EXPRESSION,
                    format!("{}: the list {error}", about(step)),
                );
                None
            }
        }
    });
    let max_parallel = w
        .optional_int(object, path, "max_parallel", 1, MAX_PARALLEL)
        .map(|n| n as i32);
    if max_parallel.is_some() {
        if field(object, "for_each").is_none() {
            w.report(
                join(path, "max_parallel"),
                codes::INVALID_VALUE,
                format!("{}: `max_parallel` bounds the instances of a `for_each`, and the step has none", about(step)),
            );
        } else if limited {
            w.report(
                join(path, "max_parallel"),
                codes::INVALID_VALUE,
                format!("{}: `max_parallel` cannot be combined with the step's own `concurrency`; use one of them", about(step)),
            );
        }
    }
    (for_each, max_parallel)
}

/// The largest `max_parallel`.
const MAX_PARALLEL: i64 = 100_000;

/// What an expression (a limit key, a condition) sees of its task: the variable `task`.
pub fn task_variable(
    namespace: &str,
    name: &str,
    version: &str,
    priority: i16,
    tags: &Value,
) -> Value {
    serde_json::json!({
        "namespace": namespace,
        "name": name,
        "version": version,
        "priority": priority,
        "tags": tags,
    })
}

/// [`task_variable`] for a task of `definition`.
pub fn condition_task(definition: &TemplateDefinition, priority: i16, tags: &Value) -> Value {
    task_variable(
        &definition.namespace,
        &definition.name,
        &definition.version,
        priority,
        tags,
    )
}

/// Evaluate the condition `source` with the task's `context`, the step's `parents`
/// (results by name) and its `task` ([`condition_task`]).
///
/// # Errors
///
/// Why it gave no boolean: it does not compile (a template stored before it was
/// checked), a variable cannot be given, it failed (a missing field, say), or it gave
/// another type.
pub fn evaluate_condition(
    source: &str,
    context: &Value,
    parents: &Value,
    task: &Value,
) -> Result<bool, String> {
    match execute(source, context, parents, task)? {
        cel::Value::Bool(value) => Ok(value),
        other => Err(format!(
            "`{source}` gave a {}, not a boolean",
            other.type_of()
        )),
    }
}

/// Evaluate the `for_each` list `source` with the variables of [`evaluate_condition`].
///
/// # Errors
///
/// Why it gave no list: as [`evaluate_condition`], or an element that is not JSON.
pub fn evaluate_list(
    source: &str,
    context: &Value,
    parents: &Value,
    task: &Value,
) -> Result<Vec<Value>, String> {
    match execute(source, context, parents, task)? {
        cel::Value::List(items) => items
            .iter()
            .map(|item| {
                item.json().map_err(|error| {
                    format!("`{source}` gave an element that is not JSON: {error}")
                })
            })
            .collect(),
        other => Err(format!("`{source}` gave a {}, not a list", other.type_of())),
    }
}

/// Evaluate a `tasker.task` step's child context `source` with the variables of
/// [`evaluate_condition`].
///
/// # Errors
///
/// Why it gave no JSON object: as [`evaluate_condition`], or a value that is not JSON.
pub fn evaluate_map(
    source: &str,
    context: &Value,
    parents: &Value,
    task: &Value,
) -> Result<Value, String> {
    match execute(source, context, parents, task)? {
        map @ cel::Value::Map(_) => map
            .json()
            .map_err(|error| format!("`{source}` gave a value that is not JSON: {error}")),
        other => Err(format!("`{source}` gave a {}, not a map", other.type_of())),
    }
}

/// Compile an expression over the variables of a condition.
///
/// # Errors
///
/// Why it does not compile, or the variable it names that a condition cannot use.
pub(super) fn compile_expression(source: &str) -> Result<(), String> {
    compile_with(source, VARIABLES, VARIABLES_TEXT).map(|_| ())
}

/// Run `source` with the variables `context`, `parents` and `task`.
fn execute(
    source: &str,
    context: &Value,
    parents: &Value,
    task: &Value,
) -> Result<cel::Value, String> {
    let program = compile_with(source, VARIABLES, VARIABLES_TEXT)?;
    let mut variables = cost::context();
    for (name, value) in [("context", context), ("parents", parents), ("task", task)] {
        variables
            .add_variable(name, value)
            .map_err(|error| format!("the {name} cannot be given to `{source}`: {error}"))?;
    }
    program
        .run(&variables)
        .map_err(|error| format!("`{source}` failed: {error}"))
}
