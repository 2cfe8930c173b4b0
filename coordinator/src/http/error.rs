//! The API's error type: every failure answers
//! `{"error": {"code", "message", "details": [...]}}` with a fitting status.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;

/// An error answer.
#[derive(Debug)]
pub(crate) struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    details: Vec<Value>,
    /// Seconds for a `Retry-After` header (503 when overloaded).
    retry_after: Option<u32>,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            details: Vec::new(),
            retry_after: None,
        }
    }

    /// The answer's status.
    pub(crate) fn status(&self) -> StatusCode {
        self.status
    }

    /// The fields its problems name (`details[].path`).
    pub(crate) fn problem_paths(&self) -> impl Iterator<Item = &str> {
        self.details
            .iter()
            .filter_map(|detail| detail.get("path").and_then(Value::as_str))
    }

    pub(crate) fn with_details(mut self, details: Vec<Value>) -> Self {
        self.details = details;
        self
    }

    /// 400: the request could not be read.
    pub(crate) fn malformed(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "malformed_request", message)
    }

    /// 404.
    pub(crate) fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, code, message)
    }

    /// 422 with every problem listed.
    pub(crate) fn invalid(
        code: &'static str,
        message: impl Into<String>,
        details: Vec<Value>,
    ) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, code, message).with_details(details)
    }

    /// 503 `overloaded` with `Retry-After: 1`.
    pub(crate) fn overloaded(message: impl Into<String>) -> Self {
        let mut answer = Self::new(StatusCode::SERVICE_UNAVAILABLE, "overloaded", message);
        answer.retry_after = Some(1);
        answer
    }

    /// 500: logged with its cause chain; the caller sees no internals.
    pub(crate) fn internal(error: impl Into<anyhow::Error>) -> Self {
        let error = error.into();
        tracing::error!(error = format!("{error:#}"), "request failed");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error; see the coordinator's log",
        )
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(error: sqlx::Error) -> Self {
        match &error {
            error if tasker_shared::db::unreachable(error) => {
                tracing::error!(%error, "database unavailable");
                Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "database_unavailable",
                    "the database is not reachable; try again",
                )
            }
            // The request's checks should keep these from the database; this is the net
            // for a value they missed, so hostile input never becomes a 500.
            sqlx::Error::Database(database) => match database.code().as_deref() {
                // character_not_in_repertoire, untranslatable_character: U+0000 in text
                // or jsonb.
                Some("22021" | "22P05") => {
                    tracing::warn!(%error, "request refused by the database");
                    Self::invalid(
                        "invalid_request",
                        "a value holds a character the database cannot store (U+0000)",
                        Vec::new(),
                    )
                }
                // program_limit_exceeded, statement_too_complex: a value too large or too
                // deeply nested for PostgreSQL.
                Some("54000" | "54001") => {
                    tracing::warn!(%error, "request refused by the database");
                    Self::invalid(
                        "invalid_request",
                        "a value is too large or too deeply nested for the database",
                        Vec::new(),
                    )
                }
                _ => Self::internal(error),
            },
            _ => Self::internal(error),
        }
    }
}

/// The body of every error answer (and of unknown routes).
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({"error": {"code": "invalid_request", "message": "1 problem(s) in the request",
    "details": [{"path": "namespace", "message": "`namespace` is required"}]}}))]
pub(crate) struct ErrorBody {
    /// What went wrong.
    pub(crate) error: ErrorDetail,
}

/// The `error` of an [`ErrorBody`].
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct ErrorDetail {
    /// A stable code to match on, such as `malformed_request`, `invalid_request`,
    /// `invalid_template`, `invalid_context`, `template_not_found`, `task_not_found`,
    /// `step_not_found`, `route_not_found`, `template_conflict`, `queue_conflict`, `idempotency_conflict`,
    /// `invalid_state`, `payload_too_large`, `context_too_large`, `template_too_large`,
    /// `unsupported_media_type`, `method_not_allowed`, `database_unavailable`,
    /// `not_ready`, `unauthenticated` (401), `insufficient_scope` (403) or `internal`.
    pub(crate) code: &'static str,
    /// What went wrong, for people.
    pub(crate) message: String,
    /// Every problem found, when the request had several: for request and template
    /// problems, objects with `path` and `message` (templates and contexts add `code`);
    /// for `not_ready`, the checks. Often empty.
    pub(crate) details: Vec<Value>,
}

impl From<crate::creator::CreateError> for ApiError {
    fn from(error: crate::creator::CreateError) -> Self {
        match error {
            crate::creator::CreateError::Overloaded { limit } => Self::overloaded(format!(
                "{limit} task creations are already waiting to be written \
                 (TASKER_MAX_PENDING_CREATES); retry after the Retry-After delay"
            )),
            crate::creator::CreateError::Database(error) => error.into(),
        }
    }
}

/// Longest string an error answer carries (message, or any string in a detail): a
/// problem may quote the request, and the request can be long.
const MAX_ERROR_TEXT: usize = 1_000;
/// Most details an error answer lists (the template parser's cap, plus its count).
const MAX_ERROR_DETAILS: usize = 201;

/// `text` cut to [`MAX_ERROR_TEXT`] bytes (on a character boundary), saying how much was cut.
fn bounded_text(text: String) -> String {
    if text.len() <= MAX_ERROR_TEXT {
        return text;
    }
    let mut end = MAX_ERROR_TEXT;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} more bytes)", &text[..end], text.len() - end)
}

/// Every string in `value` bounded by [`bounded_text`].
fn bounded_value(value: Value) -> Value {
    match value {
        Value::String(text) => Value::String(bounded_text(text)),
        Value::Array(items) => Value::Array(items.into_iter().map(bounded_value).collect()),
        Value::Object(map) => Value::Object(
            map.into_iter()
                .map(|(key, item)| (bounded_text(key), bounded_value(item)))
                .collect(),
        ),
        other => other,
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut details = self.details;
        if details.len() > MAX_ERROR_DETAILS {
            let more = details.len() - (MAX_ERROR_DETAILS - 1);
            details.truncate(MAX_ERROR_DETAILS - 1);
            details.push(serde_json::json!({"path": "", "code": "more_problems",
                "message": format!("{more} more problem(s) were found and are not listed")}));
        }
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code,
                message: bounded_text(self.message),
                details: details.into_iter().map(bounded_value).collect(),
            },
        };
        let mut response = (self.status, Json(body)).into_response();
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(axum::http::header::RETRY_AFTER, seconds.into());
        }
        response
    }
}

/// Handlers' result type.
pub(crate) type ApiResult<T> = Result<T, ApiError>;

/// A known path asked with a method it does not serve: 405 in the error body (axum adds
/// the `Allow` header naming the methods it does serve).
pub(crate) async fn method_not_allowed(method: axum::http::Method) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{method} is not served at this path; see the Allow header"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_overloaded_creation_answers_503_with_retry_after() {
        let error = crate::creator::CreateError::Overloaded { limit: 7 };
        let response = ApiError::from(error).into_response();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()["retry-after"], "1");
    }
}
