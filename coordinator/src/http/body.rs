//! Reading request bodies and parameters so that every problem is named at once, and
//! the limits on what a request may hold.
//!
//! Hostile input is refused here, before it reaches the database: PostgreSQL's `text`
//! and `jsonb` cannot hold U+0000 (a NUL would be a 500 from the insert), and sizes are
//! checked against [`Limits`] with the setting's name in the answer.

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::http::{HeaderMap, StatusCode, header};
use serde_json::{Map, Value, json};
use utoipa::openapi::schema::{AnyOfBuilder, ArrayBuilder, ObjectBuilder, SchemaType, Type};
use utoipa::openapi::{Ref, RefOr, Schema};

use super::error::ApiError;
use crate::settings::CoordinatorSettings;
use tasker_shared::messages::{MAX_JSON_DEPTH, nests_deeper_than, too_deep_problem};

/// At most this many problems of one kind (unknown fields, NUL characters) are listed.
const MAX_LISTED: usize = 50;

/// What one request may hold, beyond the body limit (`TASKER_MAX_BODY_BYTES`, applied by
/// the router before any handler runs).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// `TASKER_MAX_BODY_BYTES`, for the message (the router enforces it).
    pub(crate) max_body_bytes: usize,
    /// `TASKER_MAX_CONTEXT_BYTES`: a task context, as compact JSON.
    pub(crate) max_context_bytes: usize,
    /// `TASKER_MAX_TEMPLATE_BYTES`: a template document as sent.
    pub(crate) max_template_bytes: usize,
    /// `TASKER_MAX_TEMPLATE_STEPS`.
    pub(crate) max_template_steps: usize,
}

impl From<&CoordinatorSettings> for Limits {
    fn from(settings: &CoordinatorSettings) -> Self {
        Limits {
            max_body_bytes: settings.max_body_bytes,
            max_context_bytes: settings.max_context_bytes,
            max_template_bytes: settings.max_template_bytes,
            max_template_steps: settings.max_template_steps as usize,
        }
    }
}

/// 413 naming the limit (`setting`), its value and the size found.
pub(crate) fn too_large(
    code: &'static str,
    path: &str,
    what: &str,
    setting: &str,
    max: usize,
    actual: usize,
) -> ApiError {
    let message = format!("{what} is {actual} bytes; the limit is {max} bytes ({setting})");
    ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, code, message.clone()).with_details(vec![json!({
        "path": path, "message": message, "limit": setting, "max": max, "actual": actual
    })])
}

/// Why `value`, the request's `field`, cannot be carried: it nests deeper than
/// [`MAX_JSON_DEPTH`] levels.
pub(crate) fn too_deep(field: &str, value: &Value) -> Option<String> {
    nests_deeper_than(value, MAX_JSON_DEPTH).then(|| format!("`{field}` {}", too_deep_problem()))
}

/// The length of `value` as compact JSON, without writing it out.
pub(crate) fn json_len(value: &Value) -> usize {
    struct Counter(usize);
    impl std::io::Write for Counter {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0 += bytes.len();
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut counter = Counter(0);
    // Writing a `Value` to a writer that never fails cannot fail.
    let _ = serde_json::to_writer(&mut counter, value);
    counter.0
}

/// Media types of the JSON bodies. Besides JSON itself: no `Content-Type` at all, and
/// `application/x-www-form-urlencoded`, which is what `curl -d` sends (the README's
/// examples use it); the body is read as JSON whatever it claims.
pub(crate) const JSON_TYPES: &[&str] = &["application/json", "application/x-www-form-urlencoded"];

/// Media types of template documents (YAML or JSON).
pub(crate) const TEMPLATE_TYPES: &[&str] = &[
    "application/yaml",
    "application/x-yaml",
    "text/yaml",
    "text/x-yaml",
    "application/json",
    "text/plain",
    "application/x-www-form-urlencoded",
];

/// 415 unless the body's `Content-Type` is absent, one of `accepted`, or a `+json` type.
pub(crate) fn content_type(headers: &HeaderMap, accepted: &[&str]) -> Result<(), ApiError> {
    let Some(value) = headers.get(header::CONTENT_TYPE) else {
        return Ok(());
    };
    let essence = value
        .to_str()
        .ok()
        .and_then(|text| text.split(';').next())
        .map(|text| text.trim().to_ascii_lowercase());
    if let Some(essence) = &essence
        && (accepted.contains(&essence.as_str())
            || (essence.ends_with("+json") && accepted.contains(&"application/json")))
    {
        return Ok(());
    }
    let shown = essence.unwrap_or_else(|| "(not readable)".to_owned());
    Err(ApiError::new(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
        format!(
            "Content-Type `{shown}` is not accepted here; send one of: {}",
            accepted.join(", ")
        ),
    ))
}

/// A path parameter axum could not read (not UTF-8 once percent-decoded), as our error.
pub(crate) fn path_rejection(rejection: PathRejection) -> ApiError {
    ApiError::malformed(format!("bad path: {}", rejection.body_text()))
}

/// A query string axum could not read, as our error.
pub(crate) fn query_rejection(rejection: QueryRejection) -> ApiError {
    ApiError::malformed(format!("bad query string: {}", rejection.body_text()))
}

/// The JSON pointers of the first strings and keys in `value` that hold U+0000, which
/// PostgreSQL's `jsonb` cannot store; `prefix` is put in front of each pointer.
pub(crate) fn nul_pointers(value: &Value, prefix: &str) -> Vec<String> {
    tasker_shared::messages::nul_pointers(value, prefix, MAX_LISTED)
}

/// Turn axum's body rejection (too large, unreadable) into our error body.
pub(crate) fn body_rejection(rejection: BytesRejection, limits: &Limits) -> ApiError {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        payload_too_large(limits.max_body_bytes)
    } else {
        ApiError::malformed(rejection.body_text())
    }
}

/// 413 `payload_too_large`: the body is larger than `max` (`TASKER_MAX_BODY_BYTES`).
pub(crate) fn payload_too_large(max: usize) -> ApiError {
    let message =
        format!("the body is larger than the limit of {max} bytes (TASKER_MAX_BODY_BYTES)");
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        message.clone(),
    )
    .with_details(vec![json!({
        "path": "", "message": message, "limit": "TASKER_MAX_BODY_BYTES", "max": max
    })])
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

/// The JSON Schema pattern of a string that holds no U+0000 (which PostgreSQL cannot
/// store), for the OpenAPI description of request fields.
pub(crate) const NO_NUL: &str = "^[^\\x00]*$";

/// Any JSON value PostgreSQL's `jsonb` can store: no U+0000 in any string or key
/// (documentation only: the OpenAPI component `StorableJson`).
pub(crate) struct StorableJson;

impl utoipa::PartialSchema for StorableJson {
    fn schema() -> RefOr<Schema> {
        let scalar = ObjectBuilder::new().schema_type(
            [Type::Null, Type::Boolean, Type::Number]
                .into_iter()
                .collect::<SchemaType>(),
        );
        let string = ObjectBuilder::new()
            .schema_type(Type::String)
            .pattern(Some(NO_NUL));
        let array = ArrayBuilder::new().items(Ref::from_schema_name("StorableJson"));
        AnyOfBuilder::new()
            .description(Some(
                "Any JSON value whose strings and keys hold no U+0000 (PostgreSQL cannot store it).",
            ))
            .item(scalar)
            .item(string)
            .item(array)
            .item(storable_object())
            .into()
    }
}

impl utoipa::ToSchema for StorableJson {
    fn name() -> std::borrow::Cow<'static, str> {
        "StorableJson".into()
    }
}

/// `schema_with` for a field that is a JSON object of [`StorableJson`] values.
pub(crate) fn storable_object() -> RefOr<Schema> {
    ObjectBuilder::new()
        .schema_type(Type::Object)
        .property_names(Some(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .pattern(Some(NO_NUL)),
        ))
        .additional_properties(Some(RefOr::<Schema>::Ref(Ref::from_schema_name(
            "StorableJson",
        ))))
        .into()
}

/// `schema_with` for a field that is any [`StorableJson`].
pub(crate) fn storable_value() -> RefOr<Schema> {
    RefOr::Ref(Ref::from_schema_name("StorableJson"))
}

/// Collects field problems while reading a JSON object.
pub(crate) struct Fields {
    object: Map<String, Value>,
    problems: Vec<Value>,
}

impl Fields {
    /// Read `object`, reporting any key not in `known`.
    pub(crate) fn new(object: Map<String, Value>, known: &[&str]) -> Self {
        let unknown: Vec<&String> = object
            .keys()
            .filter(|key| !known.contains(&key.as_str()))
            .collect();
        let mut problems: Vec<Value> = unknown
            .iter()
            .take(MAX_LISTED)
            .map(|key| json!({"path": key, "message": format!("unknown field `{key}`; expected one of: {}", known.join(", "))}))
            .collect();
        if unknown.len() > MAX_LISTED {
            problems.push(json!({"path": "", "message": format!(
                "{} more unknown fields are not listed", unknown.len() - MAX_LISTED)}));
        }
        Fields { object, problems }
    }

    pub(crate) fn problem(&mut self, path: &str, message: impl Into<String>) {
        self.problems
            .push(json!({"path": path, "message": message.into()}));
    }

    /// [`Fields::string`], where an empty string is a problem even when the field may be
    /// left out.
    pub(crate) fn non_empty_string(
        &mut self,
        key: &str,
        required: bool,
        max: usize,
    ) -> Option<String> {
        let text = self.string(key, required, max)?;
        if text.is_empty() {
            self.problem(key, format!("`{key}` must not be empty"));
            return None;
        }
        Some(text)
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
            Some(Value::String(text)) if text.contains('\0') => {
                self.problem(
                    key,
                    format!("`{key}` holds a NUL character (U+0000), which cannot be stored"),
                );
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

    /// An integer field from `min` to `max`; `None` when absent or null.
    pub(crate) fn integer(&mut self, key: &str, min: i64, max: i64) -> Option<i64> {
        match self.object.remove(key) {
            None | Some(Value::Null) => None,
            // JSON Schema counts `3.0` as an integer, so it is one here too.
            Some(Value::Number(number)) => match number.as_i64().or_else(|| {
                number
                    .as_f64()
                    .filter(|value| value.fract() == 0.0 && value.abs() < 1e15)
                    .map(|value| value as i64)
            }) {
                Some(value) if (min..=max).contains(&value) => Some(value),
                _ => {
                    self.problem(
                        key,
                        format!("`{key}` must be an integer from {min} to {max}, found {number}"),
                    );
                    None
                }
            },
            Some(other) => {
                self.problem(
                    key,
                    format!("`{key}` must be an integer, found {}", kind(&other)),
                );
                None
            }
        }
    }

    /// A list of strings (each at most `max_len` characters, at most `max` of them);
    /// empty when absent or null.
    pub(crate) fn string_list(&mut self, key: &str, max_len: usize, max: usize) -> Vec<String> {
        let items = match self.object.remove(key) {
            None | Some(Value::Null) => return Vec::new(),
            Some(Value::Array(items)) if items.len() <= max => items,
            Some(Value::Array(items)) => {
                self.problem(
                    key,
                    format!("`{key}` has {} entries; at most {max}", items.len()),
                );
                return Vec::new();
            }
            Some(other) => {
                self.problem(
                    key,
                    format!("`{key}` must be a list of strings, found {}", kind(&other)),
                );
                return Vec::new();
            }
        };
        let mut list = Vec::with_capacity(items.len());
        for (n, item) in items.into_iter().enumerate() {
            match item {
                Value::String(text) if text.chars().count() <= max_len && !text.contains('\0') => {
                    list.push(text)
                }
                Value::String(_) => self.problem(
                    &format!("{key}[{n}]"),
                    format!("longer than {max_len} characters, or holds U+0000"),
                ),
                other => self.problem(
                    &format!("{key}[{n}]"),
                    format!("must be a string, found {}", kind(&other)),
                ),
            }
        }
        list
    }

    /// A point in time written as RFC 3339 (`2026-12-05T07:00:00Z`); `None` when absent
    /// or null.
    pub(crate) fn timestamp(&mut self, key: &str) -> Option<chrono::DateTime<chrono::Utc>> {
        let text = self.string(key, false, 64)?;
        match chrono::DateTime::parse_from_rfc3339(&text) {
            Ok(at) => Some(at.to_utc()),
            Err(error) => {
                self.problem(
                    key,
                    format!("`{key}` must be an RFC 3339 time such as 2026-12-05T07:00:00Z, found `{text}` ({error})"),
                );
                None
            }
        }
    }

    /// Any JSON value; `None` when absent. Strings and keys holding U+0000 are problems.
    pub(crate) fn value(&mut self, key: &str) -> Option<Value> {
        let value = self.object.remove(key)?;
        let pointers = nul_pointers(&value, "");
        for pointer in pointers {
            self.problem(
                &format!("{key}{pointer}"),
                "holds a NUL character (U+0000), which cannot be stored",
            );
        }
        Some(value)
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
