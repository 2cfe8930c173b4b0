//! Liveness and readiness.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::json;
use utoipa::ToSchema;

use super::AppState;
use super::error::{ApiError, ErrorBody};
use crate::control::WorkerSeen;
use crate::metrics::QueueDepth;

/// The body of `GET /health/live`.
#[derive(Serialize, ToSchema)]
pub(crate) struct Live {
    /// Always `live`.
    #[schema(example = "live")]
    status: &'static str,
}

/// Whether a dependency answers.
#[derive(Clone, Copy, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Check {
    /// It answered.
    Ok,
    /// It did not.
    Unreachable,
}

impl Check {
    fn of(ok: bool) -> Self {
        if ok { Check::Ok } else { Check::Unreachable }
    }
}

/// The dependencies' reachability.
#[derive(Serialize, ToSchema)]
pub(crate) struct Checks {
    /// PostgreSQL.
    database: Check,
    /// RabbitMQ.
    broker: Check,
}

/// The body of `GET /health/ready` when ready.
#[derive(Serialize, ToSchema)]
pub(crate) struct Ready {
    /// Always `ready`.
    #[schema(example = "ready")]
    status: &'static str,
    /// Every dependency, `ok`.
    checks: Checks,
}

/// Tasks and steps by status.
#[derive(Clone, Serialize, ToSchema)]
pub(crate) struct Counts {
    /// Tasks by status (finished ones included).
    tasks: BTreeMap<String, i64>,
    /// Steps by status (finished ones included).
    steps: BTreeMap<String, i64>,
}

/// A worker heard from recently (documentation of `WorkerSeen`, which the status
/// serialises).
#[derive(ToSchema)]
#[expect(dead_code, reason = "documentation only")]
pub(crate) struct WorkerStatus {
    /// The worker's id.
    worker_id: String,
    /// The namespaces it serves.
    namespaces: Vec<String>,
    /// Whether it serves every namespace.
    all_namespaces: bool,
    /// How many steps it runs at once.
    concurrency: u16,
    /// How many it runs now.
    in_flight: usize,
    /// When it was last heard from.
    last_seen: DateTime<Utc>,
}

/// The body of `GET /health/status`.
#[derive(Serialize, ToSchema)]
pub(crate) struct Status {
    /// `ok` when PostgreSQL and RabbitMQ answer, else `degraded`.
    #[schema(example = "ok")]
    status: &'static str,
    /// The dependencies' reachability.
    checks: Checks,
    /// Tasks and steps by status; `null` when the database is unreachable.
    counts: Option<Counts>,
    /// The workers heard from recently, with their namespaces and load.
    #[schema(value_type = Vec<WorkerStatus>)]
    workers: Vec<WorkerSeen>,
    /// Tasker's queues (steps per namespace, results, dead letters) as the gauges loop
    /// last read them (every `TASKER_GAUGE_INTERVAL_MS`); empty until its first pass.
    queues: Vec<QueueDepth>,
}

/// 200 while the process runs.
#[utoipa::path(
    get,
    path = "/health/live",
    tag = "health",
    operation_id = "live",
    responses((status = 200, description = "The process runs.", body = Live)),
)]
pub(crate) async fn live() -> Json<Live> {
    Json(Live { status: "live" })
}

async fn reachability(state: &AppState) -> (bool, bool) {
    let database = tokio::time::timeout(
        Duration::from_secs(2),
        sqlx::query("SELECT 1").execute(state.db.pool()),
    )
    .await;
    (matches!(database, Ok(Ok(_))), state.broker.connected())
}

/// What an operator looks at first: reachability, tasks and steps by status, and the
/// workers heard from recently with their namespaces and load.
#[utoipa::path(
    get,
    path = "/health/status",
    tag = "health",
    operation_id = "status",
    responses(
        (status = 200, description = "The coordinator's view of the system, also when degraded.", body = Status),
        (status = 500, description = "`internal`: see the coordinator's log.", body = ErrorBody),
        (status = 503, description = "`database_unavailable`: the database stopped answering while counting.", body = ErrorBody),
    ),
)]
pub(crate) async fn status(State(state): State<AppState>) -> Result<Json<Status>, ApiError> {
    let (database_ok, broker_ok) = reachability(&state).await;
    let counts = if database_ok {
        Some(
            state
                .db
                .bounded(|pool| state.status_counts.get(pool))
                .await?,
        )
    } else {
        None
    };
    Ok(Json(Status {
        status: if database_ok && broker_ok {
            "ok"
        } else {
            "degraded"
        },
        checks: Checks {
            database: Check::of(database_ok),
            broker: Check::of(broker_ok),
        },
        counts,
        workers: state.control.recent_workers(),
        queues: state
            .metrics
            .queue_depths
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone(),
    }))
}

/// 200 when PostgreSQL and RabbitMQ answer; 503 naming the one that does not.
#[utoipa::path(
    get,
    path = "/health/ready",
    tag = "health",
    operation_id = "ready",
    responses(
        (status = 200, description = "PostgreSQL and RabbitMQ answer.", body = Ready),
        (status = 503, description = "`not_ready`: the message names what does not answer; `details` holds the checks.", body = ErrorBody),
    ),
)]
pub(crate) async fn ready(State(state): State<AppState>) -> Result<Json<Ready>, ApiError> {
    let (database_ok, broker_ok) = reachability(&state).await;
    let checks = Checks {
        database: Check::of(database_ok),
        broker: Check::of(broker_ok),
    };
    if database_ok && broker_ok {
        return Ok(Json(Ready {
            status: "ready",
            checks,
        }));
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
    .with_details(vec![json!(checks)]))
}

/// Unknown routes answer in the API's error shape too.
pub(crate) async fn not_found() -> ApiError {
    ApiError::not_found("route_not_found", "no such route")
}

/// Prometheus metrics in the OpenMetrics text format.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "health",
    operation_id = "metrics",
    responses(
        (status = 200, description = "Prometheus metrics in the OpenMetrics text format.", body = String,
            content_type = "application/openmetrics-text; version=1.0.0; charset=utf-8"),
    ),
)]
pub(crate) async fn metrics(State(state): State<AppState>) -> impl axum::response::IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            tasker_shared::metrics::CONTENT_TYPE,
        )],
        state.metrics.render(),
    )
}

/// How long `/health/status` reuses its counts: they read the whole history, and every open
/// workers page of the console asks for them every few seconds.
const COUNTS_FRESH: std::time::Duration = std::time::Duration::from_secs(10);

/// The counts of `/health/status`, read at most once per [`COUNTS_FRESH`] whoever asks.
#[derive(Default)]
pub(crate) struct CountsCache {
    last: tokio::sync::Mutex<Option<(std::time::Instant, Counts)>>,
}

impl CountsCache {
    async fn get(&self, pool: &sqlx::PgPool) -> sqlx::Result<Counts> {
        // Held across the read: callers arriving meanwhile wait for it instead of reading too.
        let mut last = self.last.lock().await;
        if let Some((at, counts)) = last.as_ref()
            && at.elapsed() < COUNTS_FRESH
        {
            return Ok(counts.clone());
        }
        let (tasks, steps) = tasker_shared::store::inspect::totals(pool).await?;
        let counts = Counts {
            tasks: tasks.into_iter().collect(),
            steps: steps.into_iter().collect(),
        };
        *last = Some((std::time::Instant::now(), counts.clone()));
        Ok(counts)
    }
}
