//! Operator controls: cancel, retry, resolve (a step, or a failed task); and the views that explain a task:
//! readiness and transition history.

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use serde::Serialize;
use serde_json::{Map, Value};
use utoipa::ToSchema;
use uuid::Uuid;

use super::AppState;
use super::body::{
    Fields, JSON_TYPES, StorableJson, body_rejection, content_type, json_object, nul_pointers,
    path_rejection, query_rejection, storable_value, too_deep,
};
use super::error::{ApiError, ApiResult, ErrorBody};
use super::tasks::{TaskView, parse_task_id, task_view};
use crate::operations;
use tasker_shared::store::inspect::{self, StepReadiness, Transition};
use tasker_shared::store::tasks::{self, StepRecord};
use tasker_shared::store::transitions::OperatorError;

impl From<OperatorError> for ApiError {
    fn from(error: OperatorError) -> Self {
        match error {
            OperatorError::TaskNotFound(_) => {
                ApiError::not_found("task_not_found", error.to_string())
            }
            OperatorError::StepNotFound { .. } => {
                ApiError::not_found("step_not_found", error.to_string())
            }
            OperatorError::SignalNotFound { .. } => {
                ApiError::not_found("signal_not_found", error.to_string())
            }
            OperatorError::Conflict(message) => {
                ApiError::new(StatusCode::CONFLICT, "invalid_state", message)
            }
            OperatorError::Database(error) => error.into(),
        }
    }
}

/// The optional body of cancel and retry (documentation only: read by hand; the fields
/// are [`REASON_FIELDS`]). An empty body is `{}`.
#[derive(ToSchema)]
#[expect(dead_code, reason = "documentation only")]
// Unknown fields are refused (422): `additionalProperties: false` in the description.
#[serde(deny_unknown_fields)]
pub(crate) struct ReasonRequest {
    /// Why, for the transition history.
    #[schema(max_length = 1024, pattern = "^[^\\x00]*$")]
    reason: Option<String>,
}

/// The fields of a cancel or retry body.
pub(crate) const REASON_FIELDS: &[&str] = &["reason"];

/// The optional body of resolve (documentation only: read by hand; the fields are
/// [`RESOLVE_FIELDS`]). An empty body is `{}`.
#[derive(ToSchema)]
#[expect(dead_code, reason = "documentation only")]
// Unknown fields are refused (422): `additionalProperties: false` in the description.
#[serde(deny_unknown_fields)]
pub(crate) struct ResolveRequest {
    /// The step's results, as its handler would have returned them (any JSON); its
    /// dependents see them.
    #[schema(schema_with = storable_value)]
    results: Option<Value>,
    /// Why, for the transition history.
    #[schema(max_length = 1024, pattern = "^[^\\x00]*$")]
    reason: Option<String>,
}

/// The fields of a resolve body.
pub(crate) const RESOLVE_FIELDS: &[&str] = &["results", "reason"];

/// The body of `GET /v1/tasks/{task_id}/readiness`.
#[derive(Serialize, ToSchema)]
pub(crate) struct ReadinessView {
    /// The task.
    task_id: Uuid,
    /// Per step, whether it is ready and why (not).
    steps: Vec<StepReadiness>,
}

/// The body of `GET /v1/tasks/{task_id}/transitions`.
#[derive(Serialize, ToSchema)]
pub(crate) struct TransitionHistory {
    /// The task.
    task_id: Uuid,
    /// The task's own transitions, in order.
    task: Vec<Transition>,
    /// Its steps' transitions, in order, each naming its step.
    steps: Vec<Transition>,
}

/// An optional JSON object body (empty is `{}`, whatever its `Content-Type`).
fn optional_object(
    state: &AppState,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Map<String, Value>> {
    let body = body.map_err(|rejection| body_rejection(rejection, &state.limits))?;
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Map::new());
    }
    content_type(headers, JSON_TYPES)?;
    json_object(&body)
}

/// Just `{"reason"?}`.
fn reason_only(
    state: &AppState,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Option<String>> {
    let mut fields = Fields::new(optional_object(state, headers, body)?, REASON_FIELDS);
    let reason = fields.string("reason", false, 1024);
    fields.finish("invalid_request")?;
    Ok(reason)
}

/// `POST /v1/tasks/{task_id}/cancel`: nothing more is dispatched, results in flight are
/// dropped, and workers are told to abort what they run for the task.
#[utoipa::path(
    post,
    path = "/v1/tasks/{task_id}/cancel",
    tag = "operate",
    operation_id = "cancel_task",
    params(("task_id" = Uuid, Path, description = "The task's id.")),
    request_body(content = Option<ReasonRequest>, content_type = "application/json"),
    responses(
        (status = 200, description = "The cancelled task.", body = TaskView),
        (status = 400, description = "`malformed_request`: `task_id` is not a UUID, or the body is not JSON.", body = ErrorBody),
        (status = 404, description = "`task_not_found`.", body = ErrorBody),
        (status = 409, description = "`invalid_state`: only a pending or in-progress task can be cancelled.", body = ErrorBody),
        (status = 413, description = "`payload_too_large`: the body is larger than the limit.", body = ErrorBody),
        (status = 415, description = "`unsupported_media_type`: a body sent as something other than JSON.", body = ErrorBody),
        (status = 422, description = "`invalid_request`: every field problem.", body = ErrorBody),
        (status = 500, description = "`internal`: see the coordinator's log.", body = ErrorBody),
        (status = 503, description = "`database_unavailable`.", body = ErrorBody),
    ),
)]
pub(crate) async fn cancel(
    State(state): State<AppState>,
    task_id: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<TaskView>> {
    let Path(task_id) = task_id.map_err(path_rejection)?;
    let task_id = parse_task_id(&task_id)?;
    let reason = reason_only(&state, &headers, body)?;
    let (_, effects) = state
        .db
        .bounded(|pool| {
            operations::cancel_task(pool, task_id, reason.as_deref(), state.publisher.lease_ms())
        })
        .await?;
    effects.apply(&state).await;
    Ok(Json(task_view(&state, task_id).await?))
}

/// `POST /v1/tasks/{task_id}/retry`: failed steps get a fresh attempt budget.
#[utoipa::path(
    post,
    path = "/v1/tasks/{task_id}/retry",
    tag = "operate",
    operation_id = "retry_task",
    params(("task_id" = Uuid, Path, description = "The task's id.")),
    request_body(content = Option<ReasonRequest>, content_type = "application/json"),
    responses(
        (status = 200, description = "The retried task.", body = TaskView),
        (status = 400, description = "`malformed_request`: `task_id` is not a UUID, or the body is not JSON.", body = ErrorBody),
        (status = 404, description = "`task_not_found`.", body = ErrorBody),
        (status = 409, description = "`invalid_state`: the task is not in `error`.", body = ErrorBody),
        (status = 413, description = "`payload_too_large`: the body is larger than the limit.", body = ErrorBody),
        (status = 415, description = "`unsupported_media_type`: a body sent as something other than JSON.", body = ErrorBody),
        (status = 422, description = "`invalid_request`: every field problem.", body = ErrorBody),
        (status = 500, description = "`internal`: see the coordinator's log.", body = ErrorBody),
        (status = 503, description = "`database_unavailable`.", body = ErrorBody),
    ),
)]
pub(crate) async fn retry(
    State(state): State<AppState>,
    task_id: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<TaskView>> {
    let Path(task_id) = task_id.map_err(path_rejection)?;
    let task_id = parse_task_id(&task_id)?;
    let reason = reason_only(&state, &headers, body)?;
    let (_, effects) = state
        .db
        .bounded(|pool| operations::retry_task(pool, task_id, reason.as_deref()))
        .await?;
    effects.apply(&state).await;
    Ok(Json(task_view(&state, task_id).await?))
}

/// `POST /v1/tasks/{task_id}/resolve`: an operator closes a failed task by hand.
#[utoipa::path(
    post,
    path = "/v1/tasks/{task_id}/resolve",
    tag = "operate",
    operation_id = "resolve_task",
    params(("task_id" = Uuid, Path, description = "The task's id.")),
    request_body(content = Option<ReasonRequest>, content_type = "application/json"),
    responses(
        (status = 200, description = "The task, now `resolved_manually`.", body = TaskView),
        (status = 400, description = "`malformed_request`: `task_id` is not a UUID, or the body is not JSON.", body = ErrorBody),
        (status = 404, description = "`task_not_found`.", body = ErrorBody),
        (status = 409, description = "`invalid_state`: the task is not in `error`.", body = ErrorBody),
        (status = 413, description = "`payload_too_large`: the body is larger than the limit.", body = ErrorBody),
        (status = 415, description = "`unsupported_media_type`: a body sent as something other than JSON.", body = ErrorBody),
        (status = 422, description = "`invalid_request`: every field problem.", body = ErrorBody),
        (status = 500, description = "`internal`: see the coordinator's log.", body = ErrorBody),
        (status = 503, description = "`database_unavailable`.", body = ErrorBody),
    ),
)]
pub(crate) async fn resolve_task(
    State(state): State<AppState>,
    task_id: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<TaskView>> {
    let Path(task_id) = task_id.map_err(path_rejection)?;
    let task_id = parse_task_id(&task_id)?;
    let reason = reason_only(&state, &headers, body)?;
    state
        .db
        .bounded(|pool| operations::resolve_task(pool, task_id, reason.as_deref()))
        .await?
        .apply(&state)
        .await;
    Ok(Json(task_view(&state, task_id).await?))
}

/// `POST /v1/tasks/{task_id}/steps/{step_name}/resolve` `{"results"?, "reason"?}`.
#[utoipa::path(
    post,
    path = "/v1/tasks/{task_id}/steps/{step_name}/resolve",
    tag = "operate",
    operation_id = "resolve_step",
    params(
        ("task_id" = Uuid, Path, description = "The task's id."),
        ("step_name" = String, Path, description = "The step's name in the template."),
    ),
    request_body(content = Option<ResolveRequest>, content_type = "application/json"),
    responses(
        (status = 200, description = "The resolved step.", body = StepRecord),
        (status = 400, description = "`malformed_request`: `task_id` is not a UUID, or the body is not JSON.", body = ErrorBody),
        (status = 404, description = "`task_not_found` or `step_not_found`.", body = ErrorBody),
        (status = 409, description = "`invalid_state`: the task can no longer change, or the step is not pending, waiting_for_retry or error.", body = ErrorBody),
        (status = 413, description = "`payload_too_large`: the body is larger than the limit.", body = ErrorBody),
        (status = 415, description = "`unsupported_media_type`: a body sent as something other than JSON.", body = ErrorBody),
        (status = 422, description = "`invalid_request`: every field problem.", body = ErrorBody),
        (status = 500, description = "`internal`: see the coordinator's log.", body = ErrorBody),
        (status = 503, description = "`database_unavailable`.", body = ErrorBody),
    ),
)]
pub(crate) async fn resolve(
    State(state): State<AppState>,
    path: Result<Path<(String, String)>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<StepRecord>> {
    let Path((task_id, step)) = path.map_err(path_rejection)?;
    let task_id = parse_task_id(&task_id)?;
    if step.contains('\0') {
        // No step name holds U+0000 (nor can PostgreSQL compare with one).
        return Err(OperatorError::StepNotFound {
            task_id,
            step: step.escape_debug().to_string(),
        }
        .into());
    }
    let mut fields = Fields::new(optional_object(&state, &headers, body)?, RESOLVE_FIELDS);
    let results = fields.value("results");
    if let Some(problem) = results
        .as_ref()
        .and_then(|results| too_deep("results", results))
    {
        fields.problem("results", problem);
    }
    let reason = fields.string("reason", false, 1024);
    fields.finish("invalid_request")?;

    state
        .db
        .bounded(|pool| {
            operations::resolve_step(
                pool,
                task_id,
                &step,
                results.as_ref(),
                reason.as_deref(),
                state.publisher.lease_ms(),
            )
        })
        .await?
        .apply(&state)
        .await;
    let resolved = state
        .db
        .bounded(|pool| tasks::step(pool, task_id, &step))
        .await?
        .ok_or(OperatorError::StepNotFound { task_id, step })?;
    Ok(Json(resolved))
}

/// What a signal reached.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct SignalView {
    /// The task.
    task_id: Uuid,
    /// The signal.
    signal: String,
    /// The `tasker.wait` steps that received it.
    steps: Vec<String>,
    /// Whether one of them was waiting and so completed with the payload; false when
    /// they wait later (their parents are not done), and will complete then.
    completed: bool,
}

/// `POST /v1/tasks/{task_id}/signals/{signal}`: the body (any JSON; empty is `{}`) is
/// the payload the `tasker.wait` steps waiting for `signal` complete with.
#[utoipa::path(
    post,
    path = "/v1/tasks/{task_id}/signals/{signal}",
    tag = "operate",
    operation_id = "signal_task",
    params(
        ("task_id" = Uuid, Path, description = "The task's id."),
        ("signal" = String, Path, description = "The signal, as a `tasker.wait` step's `config.signal` names it."),
    ),
    request_body(content = Option<StorableJson>, content_type = "application/json",
        description = "The payload: the waiting step's results, which its dependents see."),
    responses(
        (status = 200, description = "The signal was delivered.", body = SignalView),
        (status = 400, description = "`malformed_request`: `task_id` is not a UUID, or the body is not JSON.", body = ErrorBody),
        (status = 404, description = "`task_not_found`, or `signal_not_found`: no step of the task waits for this signal.", body = ErrorBody),
        (status = 409, description = "`invalid_state`: the task is finished, the signal was already received, or its step no longer waits (timed out, skipped, cancelled).", body = ErrorBody),
        (status = 413, description = "`payload_too_large`: the body is larger than the limit.", body = ErrorBody),
        (status = 415, description = "`unsupported_media_type`: a body sent as something other than JSON.", body = ErrorBody),
        (status = 422, description = "`invalid_request`: the payload holds a NUL character.", body = ErrorBody),
        (status = 500, description = "`internal`: see the coordinator's log.", body = ErrorBody),
        (status = 503, description = "`database_unavailable`.", body = ErrorBody),
    ),
)]
pub(crate) async fn signal(
    State(state): State<AppState>,
    path: Result<Path<(String, String)>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<SignalView>> {
    let Path((task_id, signal)) = path.map_err(path_rejection)?;
    let task_id = parse_task_id(&task_id)?;
    let body = body.map_err(|rejection| body_rejection(rejection, &state.limits))?;
    let payload: Value = if body.iter().all(u8::is_ascii_whitespace) {
        Value::Object(Map::new())
    } else {
        content_type(&headers, JSON_TYPES)?;
        serde_json::from_slice(&body)
            .map_err(|error| ApiError::malformed(format!("the body is not valid JSON: {error}")))?
    };
    let nul: Vec<Value> = nul_pointers(&payload, "")
        .into_iter()
        .map(|pointer| {
            serde_json::json!({"path": pointer, "message": "holds a NUL character (U+0000), which cannot be stored"})
        })
        .collect();
    if !nul.is_empty() {
        return Err(ApiError::invalid(
            "invalid_request",
            "the payload holds a NUL character (U+0000)",
            nul,
        ));
    }
    // The payload becomes the step's results, carried to its children.
    if let Some(problem) = too_deep("payload", &payload) {
        return Err(ApiError::invalid(
            "invalid_request",
            "the payload nests too deep",
            vec![serde_json::json!({"path": "", "message": problem})],
        ));
    }
    if signal.contains('\0') {
        // No signal name holds U+0000 (nor can PostgreSQL compare with one).
        return Err(OperatorError::SignalNotFound {
            task_id,
            signal: signal.escape_debug().to_string(),
        }
        .into());
    }
    let lease_ms = state.publisher.lease_ms();
    let (signalled, effects) = state
        .db
        .bounded(|pool| operations::signal(pool, task_id, &signal, &payload, lease_ms))
        .await?;
    effects.apply(&state).await;
    let names: Vec<String> = state
        .db
        .bounded(|pool| tasks::steps(pool, task_id))
        .await?
        .into_iter()
        .filter(|step| signalled.steps.contains(&step.step_id))
        .map(|step| step.name)
        .collect();
    Ok(Json(SignalView {
        task_id,
        signal,
        steps: names,
        completed: signalled.completed,
    }))
}

/// `GET /v1/tasks/{task_id}/readiness`: per step, why it is or is not running.
#[utoipa::path(
    get,
    path = "/v1/tasks/{task_id}/readiness",
    tag = "operate",
    operation_id = "task_readiness",
    params(("task_id" = Uuid, Path, description = "The task's id.")),
    responses(
        (status = 200, description = "Per step, whether it is ready and why (not).", body = ReadinessView),
        (status = 400, description = "`malformed_request`: `task_id` is not a UUID.", body = ErrorBody),
        (status = 404, description = "`task_not_found`.", body = ErrorBody),
        (status = 500, description = "`internal`: see the coordinator's log.", body = ErrorBody),
        (status = 503, description = "`database_unavailable`.", body = ErrorBody),
    ),
)]
pub(crate) async fn readiness(
    State(state): State<AppState>,
    task_id: Result<Path<String>, PathRejection>,
) -> ApiResult<Json<ReadinessView>> {
    let Path(task_id) = task_id.map_err(path_rejection)?;
    let task_id = existing_task(&state, &task_id).await?;
    let steps = state
        .db
        .bounded(|pool| inspect::readiness(pool, task_id))
        .await?;
    Ok(Json(ReadinessView { task_id, steps }))
}

/// `GET /v1/tasks/{task_id}/transitions`: the audit history of the task and its steps.
#[utoipa::path(
    get,
    path = "/v1/tasks/{task_id}/transitions",
    tag = "operate",
    operation_id = "task_transitions",
    params(
        ("task_id" = Uuid, Path, description = "The task's id."),
        ("limit" = Option<i64>, Query, minimum = 1, maximum = 10000, description = "Only the newest this many step transitions (still oldest first); default all. The task's own are always all."),
    ),
    responses(
        (status = 200, description = "The task's and its steps' transitions.", body = TransitionHistory),
        (status = 400, description = "`malformed_request`: `task_id` is not a UUID, or a bad or unknown query parameter.", body = ErrorBody),
        (status = 404, description = "`task_not_found`.", body = ErrorBody),
        (status = 500, description = "`internal`: see the coordinator's log.", body = ErrorBody),
        (status = 503, description = "`database_unavailable`.", body = ErrorBody),
    ),
)]
pub(crate) async fn history(
    State(state): State<AppState>,
    task_id: Result<Path<String>, PathRejection>,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> ApiResult<Json<TransitionHistory>> {
    let Path(task_id) = task_id.map_err(path_rejection)?;
    let Query(query) = query.map_err(query_rejection)?;
    let mut limit = None;
    let mut problems = Vec::new();
    for (key, value) in query {
        match key.as_str() {
            "limit" => match value.parse::<i64>() {
                Ok(n) if (1..=MAX_TRANSITIONS).contains(&n) => limit = Some(n),
                _ => problems.push(serde_json::json!({"path": "limit",
                    "message": format!("`limit` must be a whole number from 1 to {MAX_TRANSITIONS}")})),
            },
            _ => problems.push(serde_json::json!({"path": key,
                "message": format!("unknown query parameter `{key}`; expected limit")})),
        }
    }
    if !problems.is_empty() {
        return Err(ApiError::malformed("invalid query parameters").with_details(problems));
    }
    let task_id = existing_task(&state, &task_id).await?;
    let (task, steps) = state
        .db
        .bounded(|pool| inspect::history(pool, task_id, limit))
        .await?;
    Ok(Json(TransitionHistory {
        task_id,
        task,
        steps,
    }))
}

/// The most step transitions `limit` may ask for.
const MAX_TRANSITIONS: i64 = 10_000;

async fn existing_task(state: &AppState, text: &str) -> ApiResult<Uuid> {
    let task_id = parse_task_id(text)?;
    state
        .db
        .bounded(|pool| tasks::get(pool, task_id))
        .await?
        .ok_or_else(|| ApiError::not_found("task_not_found", format!("no task {task_id}")))?;
    Ok(task_id)
}
