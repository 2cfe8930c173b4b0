//! The HTTP API (`../shared/API.md` fixes its names).

mod body;
mod error;
mod health;
mod operate;
mod tasks;
mod templates;

use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use sqlx::PgPool;
use tokio::sync::Notify;

use crate::control::Control;
use crate::metrics::CoordinatorMetrics;
use crate::publisher::StepPublisher;

pub(crate) use templates::register_template;

/// What every handler can reach.
#[derive(Clone)]
pub(crate) struct AppState {
    pub(crate) pool: PgPool,
    pub(crate) publisher: Arc<StepPublisher>,
    pub(crate) metrics: Arc<CoordinatorMetrics>,
    pub(crate) control: Control,
    /// Wakes the dispatcher when a task is created.
    pub(crate) wake_dispatcher: Arc<Notify>,
    /// Selects tasker-engine `environments` overrides.
    pub(crate) environment: String,
    pub(crate) broker: Arc<lapin::Connection>,
}

pub(crate) fn router(state: AppState, max_body_bytes: usize) -> Router {
    Router::new()
        .route(
            "/v1/templates",
            post(templates::create).get(templates::list),
        )
        .route("/v1/templates/{namespace}/{name}", get(templates::get))
        .route("/v1/tasks", post(tasks::create).get(tasks::list))
        .route("/v1/tasks/{task_id}", get(tasks::get))
        .route("/v1/tasks/{task_id}/cancel", post(operate::cancel))
        .route("/v1/tasks/{task_id}/retry", post(operate::retry))
        .route(
            "/v1/tasks/{task_id}/steps/{step_name}/resolve",
            post(operate::resolve),
        )
        .route("/v1/tasks/{task_id}/readiness", get(operate::readiness))
        .route("/v1/tasks/{task_id}/transitions", get(operate::history))
        .route("/health/live", get(health::live))
        .route("/health/ready", get(health::ready))
        .route("/health/status", get(health::status))
        .route("/metrics", get(health::metrics))
        .fallback(health::not_found)
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(state)
}
