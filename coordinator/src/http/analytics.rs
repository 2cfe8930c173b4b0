//! `/v1/analytics/*`: figures from the stored tasks and steps over a window of creation
//! times (default the last 24 hours, at most 31 days).

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use chrono::{DateTime, TimeDelta, Utc};
use serde::Serialize;
use serde_json::{Value, json};
use utoipa::ToSchema;

use super::AppState;
use super::body::query_rejection;
use super::error::{ApiError, ApiResult, ErrorBody};
use super::tasks::name_parameter_problem;
use tasker_shared::store::analytics::{self, PathStep, StepStats, TemplateStats};

/// The longest window.
const MAX_WINDOW: TimeDelta = TimeDelta::days(31);
/// The window when none is given.
const DEFAULT_WINDOW: TimeDelta = TimeDelta::hours(24);

/// Per template, over the window.
#[derive(Serialize, ToSchema)]
pub(crate) struct TemplateAnalytics {
    since: DateTime<Utc>,
    until: DateTime<Utc>,
    /// By namespace and name; templates without a task in the window are left out.
    templates: Vec<TemplateStats>,
}

/// Per step of one template, over the window.
#[derive(Serialize, ToSchema)]
pub(crate) struct StepAnalytics {
    namespace: String,
    name: String,
    since: DateTime<Utc>,
    until: DateTime<Utc>,
    /// In template order.
    steps: Vec<StepStats>,
}

/// A template's critical path over the window.
#[derive(Serialize, ToSchema)]
pub(crate) struct Bottlenecks {
    namespace: String,
    name: String,
    since: DateTime<Utc>,
    until: DateTime<Utc>,
    /// The sum of the path's mean ready-to-done times, in milliseconds.
    total_ms: f64,
    /// From a first step to a last: the chain with the largest sum.
    path: Vec<PathStep>,
}

/// The parameters an analytics call reads.
struct Window {
    namespace: Option<String>,
    name: Option<String>,
    since: DateTime<Utc>,
    until: DateTime<Utc>,
}

/// Read `namespace`, `name` (when `allowed`), `since` and `until`, naming every problem.
fn window(
    query: Vec<(String, String)>,
    allowed: &[&str],
    template_required: bool,
) -> ApiResult<Window> {
    let mut problems: Vec<Value> = Vec::new();
    let mut problem = |path: &str, message: String| {
        problems.push(json!({"path": path, "message": message}));
    };
    let (mut namespace, mut name, mut since, mut until) = (None, None, None, None);
    // A time that could not be read is named once: no default stands in for it in the
    // window's checks.
    let mut unreadable_time = false;
    for (key, value) in query {
        if !allowed.contains(&key.as_str()) {
            problem(
                &key,
                format!(
                    "unknown query parameter `{key}`; expected {}",
                    allowed.join(", ")
                ),
            );
            continue;
        }
        match key.as_str() {
            "namespace" | "name" if let Some(message) = name_parameter_problem(&key, &value) => {
                problem(&key, message)
            }
            "namespace" => namespace = Some(value),
            "name" => name = Some(value),
            _ => match DateTime::parse_from_rfc3339(&value) {
                Ok(at) if key == "since" => since = Some(at.to_utc()),
                Ok(at) => until = Some(at.to_utc()),
                Err(error) => {
                    unreadable_time = true;
                    problem(
                        &key,
                        format!(
                            "`{key}` must be an RFC 3339 time such as 2026-12-01T00:00:00Z (encode `+` as %2B): {error}"
                        ),
                    )
                }
            },
        }
    }
    if template_required {
        if namespace.is_none() {
            problem("namespace", "`namespace` is required".to_owned());
        }
        if name.is_none() {
            problem("name", "`name` (the template) is required".to_owned());
        }
    }
    let until = until.unwrap_or_else(Utc::now);
    let since = since.unwrap_or(until - DEFAULT_WINDOW);
    let span = if since >= until {
        Some("`since` must be before `until`")
    } else if until - since > MAX_WINDOW {
        Some("the window is longer than 31 days; ask for a shorter one")
    } else {
        None
    };
    if let Some(message) = span.filter(|_| !unreadable_time) {
        problem("since", message.to_owned());
    }
    if !problems.is_empty() {
        return Err(ApiError::malformed("invalid query parameters").with_details(problems));
    }
    Ok(Window {
        namespace,
        name,
        since,
        until,
    })
}

/// The window and the template (namespace and name, both required) of a call about one
/// template.
/// Per step, the analytics of a template's tasks created in `window`.
async fn steps_in(
    state: &AppState,
    namespace: &str,
    name: &str,
    window: &Window,
) -> sqlx::Result<Vec<analytics::StepStats>> {
    state
        .db
        .bounded(|pool| analytics::steps(pool, namespace, name, window.since, window.until))
        .await
}

fn template_window(
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> ApiResult<(Window, String, String)> {
    let Query(query) = query.map_err(query_rejection)?;
    let mut window = window(query, &["namespace", "name", "since", "until"], true)?;
    let namespace = window.namespace.take().unwrap_or_default();
    let name = window.name.take().unwrap_or_default();
    Ok((window, namespace, name))
}

/// Per template: tasks, outcomes, duration percentiles and throughput.
#[utoipa::path(
    get,
    path = "/v1/analytics/templates",
    tag = "analytics",
    operation_id = "analytics_templates",
    params(
        ("namespace" = Option<String>, Query, min_length = 1, max_length = 128, pattern = "^[^\\x00]*$", description = "Only this namespace's templates."),
        ("since" = Option<DateTime<Utc>>, Query, description = "Tasks created from this instant (RFC 3339; default 24 hours before `until`)."),
        ("until" = Option<DateTime<Utc>>, Query, description = "Tasks created before this instant (default now). The window is at most 31 days."),
    ),
    responses(
        (status = 200, description = "Per template.", body = TemplateAnalytics),
        (status = 400, description = "`malformed_request`: every bad or unknown parameter.", body = ErrorBody),
        (status = 500, description = "`internal`: see the coordinator's log.", body = ErrorBody),
        (status = 503, description = "`database_unavailable`.", body = ErrorBody),
    ),
)]
pub(crate) async fn templates(
    State(state): State<AppState>,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> ApiResult<Json<TemplateAnalytics>> {
    let Query(query) = query.map_err(query_rejection)?;
    let window = window(query, &["namespace", "since", "until"], false)?;
    let templates = state
        .db
        .bounded(|pool| {
            analytics::templates(
                pool,
                window.namespace.as_deref(),
                window.since,
                window.until,
            )
        })
        .await?;
    Ok(Json(TemplateAnalytics {
        since: window.since,
        until: window.until,
        templates,
    }))
}

/// Per step of a template: runs, attempts, error and retry rates, run and wait
/// percentiles.
#[utoipa::path(
    get,
    path = "/v1/analytics/steps",
    tag = "analytics",
    operation_id = "analytics_steps",
    params(
        ("namespace" = String, Query, min_length = 1, max_length = 128, pattern = "^[^\\x00]*$", description = "The template's namespace."),
        ("name" = String, Query, min_length = 1, max_length = 128, pattern = "^[^\\x00]*$", description = "The template's name (every version)."),
        ("since" = Option<DateTime<Utc>>, Query, description = "Tasks created from this instant (default 24 hours before `until`)."),
        ("until" = Option<DateTime<Utc>>, Query, description = "Tasks created before this instant (default now); at most 31 days after `since`."),
    ),
    responses(
        (status = 200, description = "Per step, in template order.", body = StepAnalytics),
        (status = 400, description = "`malformed_request`: every bad, missing or unknown parameter.", body = ErrorBody),
        (status = 500, description = "`internal`: see the coordinator's log.", body = ErrorBody),
        (status = 503, description = "`database_unavailable`.", body = ErrorBody),
    ),
)]
pub(crate) async fn steps(
    State(state): State<AppState>,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> ApiResult<Json<StepAnalytics>> {
    let (window, namespace, name) = template_window(query)?;
    let steps = steps_in(&state, &namespace, &name, &window).await?;
    Ok(Json(StepAnalytics {
        namespace,
        name,
        since: window.since,
        until: window.until,
        steps,
    }))
}

/// A template's critical path: the chain of steps with the largest mean ready-to-done
/// time, each with its share.
#[utoipa::path(
    get,
    path = "/v1/analytics/bottlenecks",
    tag = "analytics",
    operation_id = "analytics_bottlenecks",
    params(
        ("namespace" = String, Query, min_length = 1, max_length = 128, pattern = "^[^\\x00]*$", description = "The template's namespace."),
        ("name" = String, Query, min_length = 1, max_length = 128, pattern = "^[^\\x00]*$", description = "The template's name; its newest version's graph is used."),
        ("since" = Option<DateTime<Utc>>, Query, description = "Tasks created from this instant (default 24 hours before `until`)."),
        ("until" = Option<DateTime<Utc>>, Query, description = "Tasks created before this instant (default now); at most 31 days after `since`."),
    ),
    responses(
        (status = 200, description = "The critical path.", body = Bottlenecks),
        (status = 400, description = "`malformed_request`: every bad, missing or unknown parameter.", body = ErrorBody),
        (status = 404, description = "`template_not_found`.", body = ErrorBody),
        (status = 500, description = "`internal`: see the coordinator's log.", body = ErrorBody),
        (status = 503, description = "`database_unavailable`.", body = ErrorBody),
    ),
)]
pub(crate) async fn bottlenecks(
    State(state): State<AppState>,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> ApiResult<Json<Bottlenecks>> {
    let (window, namespace, name) = template_window(query)?;
    let template = state
        .db
        .bounded(|pool| state.templates.resolve(pool, &namespace, &name, None))
        .await?
        .ok_or_else(|| {
            ApiError::not_found(
                "template_not_found",
                format!("no template {namespace}/{name}"),
            )
        })?
        .template;
    let steps = steps_in(&state, &namespace, &name, &window).await?;
    let (path, total_ms) = analytics::critical_path(&template.definition, &steps);
    Ok(Json(Bottlenecks {
        namespace,
        name,
        since: window.since,
        until: window.until,
        total_ms,
        path,
    }))
}
