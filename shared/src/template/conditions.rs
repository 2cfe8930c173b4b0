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

use serde_json::{Map, Value};

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
    let program = compile_with(source, VARIABLES, VARIABLES_TEXT)?;
    let mut variables = cel::Context::default();
    for (name, value) in [("context", context), ("parents", parents), ("task", task)] {
        variables
            .add_variable(name, value)
            .map_err(|error| format!("the {name} cannot be given to `{source}`: {error}"))?;
    }
    match program.execute(&variables) {
        Ok(cel::Value::Bool(value)) => Ok(value),
        Ok(other) => Err(format!(
            "`{source}` gave a {}, not a boolean",
            other.type_of()
        )),
        Err(error) => Err(format!("`{source}` failed: {error}")),
    }
}
