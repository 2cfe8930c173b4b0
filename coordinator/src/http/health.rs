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

/// 200 when PostgreSQL and RabbitMQ answer; 503 naming the one that does not.
pub(crate) async fn ready(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let database = tokio::time::timeout(
        Duration::from_secs(2),
        sqlx::query("SELECT 1").execute(&state.pool),
    )
    .await;
    let database_ok = matches!(database, Ok(Ok(_)));
    let broker_ok = state.broker.status().connected();
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
