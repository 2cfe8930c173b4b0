//! Prometheus metrics plumbing shared by the binaries (the metrics themselves are defined
//! where they are measured: `tasker_coordinator::metrics`, `tasker_worker::metrics`).
//! Every name starts with `tasker_`, carries its unit, and counters end in `_total`.

use std::sync::LazyLock;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// The content type of [`render`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A latency histogram from 1 ms to about 16 s.
pub fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

/// A histogram of batch sizes from 1 to 1024.
pub fn batch_histogram() -> Histogram {
    Histogram::new(exponential_buckets(1.0, 2.0, 11))
}

/// The registry in the OpenMetrics text format.
pub fn render(registry: &Registry) -> String {
    let mut text = String::new();
    if let Err(error) = encode(&mut text, registry) {
        tracing::error!(%error, "cannot encode metrics");
    }
    text
}

/// A handler duration histogram from 1 ms to about 9 minutes.
pub fn duration_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 20))
}

/// Every SQL statement this process sent to PostgreSQL (`BEGIN` and `COMMIT` included):
/// counted from sqlx's per-statement `sqlx::query` events by a layer that
/// [`crate::telemetry`] installs, so it is exact and needs no bookkeeping at call sites.
pub static DB_STATEMENTS: LazyLock<Counter> = LazyLock::new(Counter::default);
