//! Reading request bodies and parameters so that every problem is named at once.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::http::StatusCode;
use serde_json::{Map, Value, json};

use super::error::ApiError;

/// Turn axum's body rejection (too large, unreadable) into our error body.
pub(crate) fn body_rejection(rejection: BytesRejection) -> ApiError {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            rejection.body_text(),
        )
    } else {
        ApiError::malformed(rejection.body_text())
    }
}

/// Parse a JSON object body: 400 for bytes that are not JSON, 422 for JSON that is not
/// an object.
pub(crate) fn json_object(body: &Bytes) -> Result<Map<String, Value>, ApiError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|error| ApiError::malformed(format!("the body is not valid JSON: {error}")))?;
    match value {
        Value::Object(map) => Ok(map),
        other => Err(ApiError::invalid(
            "invalid_request",
            "the body must be a JSON object",
            vec![
                json!({"path": "", "message": format!("expected an object, found {}", kind(&other))}),
            ],
        )),
    }
}

/// Collects field problems while reading a JSON object.
pub(crate) struct Fields {
    object: Map<String, Value>,
    problems: Vec<Value>,
}

impl Fields {
    /// Read `object`, reporting any key not in `known`.
    pub(crate) fn new(object: Map<String, Value>, known: &[&str]) -> Self {
        let problems = object
            .keys()
            .filter(|key| !known.contains(&key.as_str()))
            .map(|key| json!({"path": key, "message": format!("unknown field `{key}`; expected one of: {}", known.join(", "))}))
            .collect();
        Fields { object, problems }
    }

    pub(crate) fn problem(&mut self, path: &str, message: impl Into<String>) {
        self.problems
            .push(json!({"path": path, "message": message.into()}));
    }

    /// A string field, at most `max` characters; `None` when absent or null.
    pub(crate) fn string(&mut self, key: &str, required: bool, max: usize) -> Option<String> {
        match self.object.remove(key) {
            None | Some(Value::Null) => {
                if required {
                    self.problem(key, format!("`{key}` is required"));
                }
                None
            }
            Some(Value::String(text)) if text.chars().count() > max => {
                self.problem(key, format!("`{key}` is longer than {max} characters"));
                None
            }
            Some(Value::String(text)) if required && text.is_empty() => {
                self.problem(key, format!("`{key}` must not be empty"));
                None
            }
            Some(Value::String(text)) => Some(text),
            Some(other) => {
                self.problem(
                    key,
                    format!("`{key}` must be a string, found {}", kind(&other)),
                );
                None
            }
        }
    }

    /// Any JSON value; `None` when absent.
    pub(crate) fn value(&mut self, key: &str) -> Option<Value> {
        self.object.remove(key)
    }

    /// Fail with 422 listing every problem, if there is any.
    pub(crate) fn finish(self, code: &'static str) -> Result<(), ApiError> {
        if self.problems.is_empty() {
            Ok(())
        } else {
            let count = self.problems.len();
            Err(ApiError::invalid(
                code,
                format!("{count} problem(s) in the request"),
                self.problems,
            ))
        }
    }
}

/// The JSON type of a value, for messages.
pub(crate) fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}
