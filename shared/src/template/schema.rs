//! JSON Schema helpers: compiling schemas and checking that a schema is usable.

use std::panic::{self, AssertUnwindSafe};

use serde_json::Value;

/// Compile a context schema. `pattern` and `patternProperties` use the `regex` engine,
/// whose matching time is linear in the input: a pattern that needs backtracking
/// (backreferences, look-around) is refused when the template is registered, so no
/// context can make validation take exponential time (docs/security.md).
pub(super) fn compile_schema(
    schema: &Value,
) -> Result<jsonschema::Validator, jsonschema::ValidationError<'static>> {
    jsonschema::options()
        .should_validate_formats(true)
        .with_pattern_options(jsonschema::PatternOptions::regex())
        .build(schema)
}

/// Run `f`, turning a panic inside the JSON Schema library into `None`.
pub(super) fn guarded<T>(f: impl FnOnce() -> T) -> Option<T> {
    panic::catch_unwind(AssertUnwindSafe(f)).ok()
}

/// Every reason why `schema` is not a usable JSON Schema (empty when it is).
pub(super) fn schema_problems(schema: &Value) -> Vec<String> {
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
