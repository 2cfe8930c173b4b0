//! Operator controls: cancel, retry, resolve; and the views that explain a task:
//! readiness and transition history.

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde_json::{Map, Value, json};
use uuid::Uuid;

use super::AppState;
use super::body::{Fields, body_rejection, json_object};
use super::error::{ApiError, ApiResult};
use super::tasks::{TaskView, parse_task_id, task_view};
use tasker_shared::store::inspect;
use tasker_shared::store::tasks;
use tasker_shared::store::transitions::{self, OperatorError};

impl From<OperatorError> for ApiError {
    fn from(error: OperatorError) -> Self {
        match error {
            OperatorError::TaskNotFound(_) => {
                ApiError::not_found("task_not_found", error.to_string())
            }
            OperatorError::StepNotFound { .. } => {
                ApiError::not_found("step_not_found", error.to_string())
            }
            OperatorError::Conflict(message) => {
                ApiError::new(StatusCode::CONFLICT, "invalid_state", message)
            }
            OperatorError::Database(error) => error.into(),
        }
    }
}

/// An optional JSON object body (empty is `{}`).
fn optional_object(body: Result<Bytes, BytesRejection>) -> ApiResult<Map<String, Value>> {
    let body = body.map_err(body_rejection)?;
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Map::new());
    }
    json_object(&body)
}

/// Just `{"reason"?}`.
fn reason_only(body: Result<Bytes, BytesRejection>) -> ApiResult<Option<String>> {
    let mut fields = Fields::new(optional_object(body)?, &["reason"]);
    let reason = fields.string("reason", false, 1024);
    fields.finish("invalid_request")?;
    Ok(reason)
}

/// `POST /v1/tasks/{task_id}/cancel`: nothing more is dispatched, results in flight are
/// dropped, and workers are told to abort what they run for the task.
pub(crate) async fn cancel(
    State(state): State<AppState>,
    Path(task_id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<TaskView>> {
    let task_id = parse_task_id(&task_id)?;
    let reason = reason_only(body)?;
    let mut tx = state.pool.begin().await?;
    let cancelled = transitions::cancel_task(&mut tx, task_id, reason.as_deref()).await?;
    tx.commit().await?;
    tracing::info!(%task_id, steps_cancelled = cancelled, reason = ?reason, "task cancelled");
    if let Err(error) = state.control.cancel_task(task_id).await {
        // The fence drops their results anyway; telling workers only saves their time.
        tracing::warn!(error = format!("{error:#}"), %task_id, "cannot tell workers about the cancel");
    }
    Ok(Json(task_view(&state, task_id).await?))
}

/// `POST /v1/tasks/{task_id}/retry`: failed steps get a fresh attempt budget.
pub(crate) async fn retry(
    State(state): State<AppState>,
    Path(task_id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<TaskView>> {
    let task_id = parse_task_id(&task_id)?;
    let reason = reason_only(body)?;
    let mut tx = state.pool.begin().await?;
    let reset = transitions::retry_task(&mut tx, task_id, reason.as_deref()).await?;
    tx.commit().await?;
    tracing::info!(%task_id, steps_reset = reset, reason = ?reason, "task retried");
    state.wake_dispatcher.notify_one();
    Ok(Json(task_view(&state, task_id).await?))
}

/// `POST /v1/tasks/{task_id}/steps/{step_name}/resolve` `{"results"?, "reason"?}`.
pub(crate) async fn resolve(
    State(state): State<AppState>,
    Path((task_id, step)): Path<(String, String)>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<Value>> {
    let task_id = parse_task_id(&task_id)?;
    let mut fields = Fields::new(optional_object(body)?, &["results", "reason"]);
    let results = fields.value("results");
    let reason = fields.string("reason", false, 1024);
    fields.finish("invalid_request")?;

    let mut tx = state.pool.begin().await?;
    transitions::resolve_step(&mut tx, task_id, &step, results.as_ref(), reason.as_deref()).await?;
    transitions::finish_tasks(&mut tx, &[task_id]).await?;
    tx.commit().await?;
    tracing::info!(%task_id, %step, reason = ?reason, "step resolved manually");
    state.wake_dispatcher.notify_one();
    let steps = tasks::steps(&state.pool, task_id).await?;
    let resolved = steps.into_iter().find(|s| s.name == step).ok_or_else(|| {
        ApiError::not_found(
            "step_not_found",
            format!("task {task_id} has no step `{step}`"),
        )
    })?;
    Ok(Json(json!(resolved)))
}

/// `GET /v1/tasks/{task_id}/readiness`: per step, why it is or is not running.
pub(crate) async fn readiness(
    State(state): State<AppState>,
    Path(task_id): Path<String>,
) -> ApiResult<Json<Value>> {
    let task_id = existing_task(&state, &task_id).await?;
    let steps = inspect::readiness(&state.pool, task_id).await?;
    Ok(Json(json!({"task_id": task_id, "steps": steps})))
}

/// `GET /v1/tasks/{task_id}/transitions`: the audit history of the task and its steps.
pub(crate) async fn history(
    State(state): State<AppState>,
    Path(task_id): Path<String>,
) -> ApiResult<Json<Value>> {
    let task_id = existing_task(&state, &task_id).await?;
    let (task, steps) = inspect::history(&state.pool, task_id).await?;
    Ok(Json(
        json!({"task_id": task_id, "task": task, "steps": steps}),
    ))
}

async fn existing_task(state: &AppState, text: &str) -> ApiResult<Uuid> {
    let task_id = parse_task_id(text)?;
    tasks::get(&state.pool, task_id)
        .await?
        .ok_or_else(|| ApiError::not_found("task_not_found", format!("no task {task_id}")))?;
    Ok(task_id)
}
