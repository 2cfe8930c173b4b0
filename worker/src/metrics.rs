//! The worker's metrics, served on `TASKER_METRICS_ADDR` at `/metrics` (see
//! `docs/observability.md`).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use tokio::sync::watch;

/// `handler`, `outcome`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct HandlerOutcome {
    pub(crate) handler: String,
    pub(crate) outcome: String,
}

/// `reason`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct Reason {
    pub(crate) reason: String,
}

pub(crate) struct WorkerMetrics {
    registry: Registry,
    pub(crate) step_duration: Family<HandlerOutcome, Histogram>,
    pub(crate) in_flight: Gauge,
    pub(crate) result_batch_size: Histogram,
    pub(crate) dead_lettered: Family<Reason, Counter>,
    pub(crate) skipped_cancelled: Counter,
    pub(crate) skipped_superseded: Counter,
    pub(crate) skipped_duplicate: Counter,
    pub(crate) aborted_cancelled: Counter,
    pub(crate) aborted_superseded: Counter,
    pub(crate) broker_errors: Counter,
    pub(crate) broker_reconnects: Counter,
    pub(crate) control_dropped: Counter,
}

impl WorkerMetrics {
    pub(crate) fn new(concurrency: u16) -> Self {
        let mut registry = Registry::default();
        let step_duration = Family::<HandlerOutcome, Histogram>::new_with_constructor(
            tasker_protocol::metrics::duration_histogram as fn() -> Histogram,
        );
        registry.register_with_unit(
            "tasker_worker_step_duration",
            "Handler run time, by handler and outcome (success, retryable_error, permanent_error, deferred)",
            Unit::Seconds,
            step_duration.clone(),
        );
        let in_flight = Gauge::default();
        registry.register(
            "tasker_worker_steps_in_flight",
            "Steps running on this worker now",
            in_flight.clone(),
        );
        let result_batch_size = Histogram::new([1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0]);
        registry.register(
            "tasker_worker_result_batch_size",
            "Results per message this worker published (one message per broker confirm)",
            result_batch_size.clone(),
        );
        let concurrency_gauge: Gauge = Gauge::default();
        concurrency_gauge.set(i64::from(concurrency));
        registry.register(
            "tasker_worker_concurrency",
            "Steps this worker may run at once",
            concurrency_gauge,
        );
        let dead_lettered = Family::<Reason, Counter>::default();
        for reason in ["undecodable", "unknown_handler", "bad_signature"] {
            let _ = dead_lettered.get_or_create(&Reason {
                reason: reason.to_owned(),
            });
        }
        registry.register(
            "tasker_worker_dead_lettered",
            "Step messages sent to the dead-letter queue: undecodable, unknown_handler or bad_signature",
            dead_lettered.clone(),
        );
        let skipped_cancelled = Counter::default();
        registry.register(
            "tasker_worker_steps_skipped_cancelled",
            "Queued steps of cancelled tasks acked without running",
            skipped_cancelled.clone(),
        );
        let skipped_superseded = Counter::default();
        registry.register(
            "tasker_worker_steps_skipped_superseded",
            "Queued copies of dispatches the coordinator replaced, acked without running",
            skipped_superseded.clone(),
        );
        let skipped_duplicate = Counter::default();
        registry.register(
            "tasker_worker_steps_skipped_duplicate",
            "Redelivered copies of dispatches this worker had already answered, acked without running",
            skipped_duplicate.clone(),
        );
        let aborted_cancelled = Counter::default();
        registry.register(
            "tasker_worker_steps_aborted_cancelled",
            "Running steps aborted because their task was cancelled",
            aborted_cancelled.clone(),
        );
        let aborted_superseded = Counter::default();
        registry.register(
            "tasker_worker_steps_aborted_superseded",
            "Running steps aborted because a coordinator said their dispatch is no longer wanted (a `superseded` control message)",
            aborted_superseded.clone(),
        );
        let broker_errors = Counter::default();
        registry.register(
            "tasker_worker_broker_errors",
            "Failed publishes, acks and nacks",
            broker_errors.clone(),
        );
        let control_dropped = Counter::default();
        registry.register(
            "tasker_worker_control_messages_dropped",
            "Undecodable messages on the control exchange, dropped",
            control_dropped.clone(),
        );
        let broker_reconnects = Counter::default();
        registry.register(
            "tasker_worker_broker_reconnects",
            "Times the worker reconnected to RabbitMQ after losing its connection",
            broker_reconnects.clone(),
        );
        WorkerMetrics {
            registry,
            step_duration,
            in_flight,
            result_batch_size,
            dead_lettered,
            skipped_cancelled,
            skipped_superseded,
            skipped_duplicate,
            aborted_cancelled,
            aborted_superseded,
            broker_errors,
            broker_reconnects,
            control_dropped,
        }
    }

    pub(crate) fn dead_letter(&self, reason: &str) {
        self.dead_lettered
            .get_or_create(&Reason {
                reason: reason.to_owned(),
            })
            .inc();
    }
}

/// Serve `/metrics` and `/health/live` on `address` until `stop` turns true.
pub(crate) async fn serve(
    address: SocketAddr,
    metrics: Arc<WorkerMetrics>,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(address).await?;
    tracing::info!(address = %listener.local_addr()?, "metrics listening");
    let app = Router::new()
        .route("/metrics", get(render))
        .route("/health/live", get(|| async { "live" }))
        .with_state(metrics);
    Ok(tokio::spawn(async move {
        let server = axum::serve(listener, app).with_graceful_shutdown(async move {
            let _ = stop.changed().await;
        });
        if let Err(error) = server.await {
            tracing::warn!(%error, "metrics server stopped");
        }
    }))
}

async fn render(State(metrics): State<Arc<WorkerMetrics>>) -> impl axum::response::IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            tasker_protocol::metrics::CONTENT_TYPE,
        )],
        tasker_protocol::metrics::render(&metrics.registry),
    )
}
