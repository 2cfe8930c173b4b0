//! Liveness and readiness.

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde_json::{Value, json};

use super::AppState;
use super::error::ApiError;

/// 200 while the process runs.
pub(crate) async fn live() -> Json<Value> {
    Json(json!({"status": "live"}))
}

async fn reachability(state: &AppState) -> (bool, bool) {
    let database = tokio::time::timeout(
        Duration::from_secs(2),
        sqlx::query("SELECT 1").execute(&state.pool),
    )
    .await;
    (
        matches!(database, Ok(Ok(_))),
        state.broker.status().connected(),
    )
}

/// What an operator looks at first: reachability, tasks and steps by status, and the
/// workers heard from recently with their namespaces and load.
pub(crate) async fn status(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let (database_ok, broker_ok) = reachability(&state).await;
    let check = |ok: bool| if ok { "ok" } else { "unreachable" };
    let counts = if database_ok {
        let (tasks, steps) = tasker_shared::store::inspect::totals(&state.pool).await?;
        let to_map = |rows: Vec<(String, i64)>| -> serde_json::Map<String, Value> {
            rows.into_iter()
                .map(|(status, n)| (status, json!(n)))
                .collect()
        };
        json!({"tasks": to_map(tasks), "steps": to_map(steps)})
    } else {
        Value::Null
    };
    let workers = state.control.recent_workers();
    Ok(Json(json!({
        "status": if database_ok && broker_ok { "ok" } else { "degraded" },
        "checks": {"database": check(database_ok), "broker": check(broker_ok)},
        "counts": counts,
        "workers": workers,
    })))
}

/// 200 when PostgreSQL and RabbitMQ answer; 503 naming the one that does not.
pub(crate) async fn ready(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let (database_ok, broker_ok) = reachability(&state).await;
    let check = |ok: bool| if ok { "ok" } else { "unreachable" };
    let checks = json!({"database": check(database_ok), "broker": check(broker_ok)});
    if database_ok && broker_ok {
        return Ok(Json(json!({"status": "ready", "checks": checks})));
    }
    let failing: Vec<&str> = [("PostgreSQL", database_ok), ("RabbitMQ", broker_ok)]
        .into_iter()
        .filter(|(_, ok)| !ok)
        .map(|(name, _)| name)
        .collect();
    Err(ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "not_ready",
        format!("not reachable: {}", failing.join(", ")),
    )
    .with_details(vec![checks]))
}

/// Unknown routes answer in the API's error shape too.
pub(crate) async fn not_found() -> ApiError {
    ApiError::not_found("route_not_found", "no such route")
}

/// Prometheus metrics in the OpenMetrics text format.
pub(crate) async fn metrics(State(state): State<AppState>) -> impl axum::response::IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            tasker_shared::metrics::CONTENT_TYPE,
        )],
        state.metrics.render(),
    )
}
