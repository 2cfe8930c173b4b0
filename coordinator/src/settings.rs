//! The coordinator's settings: flags, or the environment variables named beside them.

use std::net::SocketAddr;
use std::path::PathBuf;

use tasker_shared::config::{BrokerSettings, DatabaseSettings};

/// Everything `tasker-coordinator serve` needs.
#[derive(Debug, Clone, clap::Args)]
pub struct CoordinatorSettings {
    /// How to reach PostgreSQL.
    #[command(flatten)]
    pub database: DatabaseSettings,
    /// How to reach RabbitMQ.
    #[command(flatten)]
    pub broker: BrokerSettings,
    /// Address the HTTP API listens on (port 0 picks a free port).
    #[arg(long, env = "TASKER_HTTP_ADDR", default_value = "127.0.0.1:8080")]
    pub http_addr: SocketAddr,
    /// Register every template file (`*.yaml`, `*.yml`, `*.json`) in this folder at start.
    #[arg(long, env = "TASKER_TEMPLATES_DIR")]
    pub templates_dir: Option<PathBuf>,
    /// Which `environments.<env>` overrides of tasker-engine templates apply.
    #[arg(long, env = "TASKER_ENV", default_value = "development")]
    pub environment: String,
    /// Most steps claimed (or results applied) in one transaction.
    #[arg(long, env = "TASKER_BATCH_SIZE", default_value_t = 256)]
    pub batch_size: i64,
    /// How long a claimed step may wait in its queue before it is dispatched again (the
    /// message expires at the same moment, so a stale copy is never run).
    #[arg(long, env = "TASKER_DISPATCH_LEASE_MS", default_value_t = 300_000)]
    pub dispatch_lease_ms: i64,
    /// Added to a running step's `timeout_ms` before its lease expires and the step is
    /// treated as lost (worker vanished).
    #[arg(long, env = "TASKER_LEASE_GRACE_MS", default_value_t = 30_000)]
    pub lease_grace_ms: i64,
    /// A running step whose worker sent no heartbeat for this long counts as lost (its
    /// worker vanished) and is retried. Keep it at least three times the workers'
    /// `TASKER_HEARTBEAT_INTERVAL_MS`.
    #[arg(long, env = "TASKER_HEARTBEAT_LEASE_MS", default_value_t = 30_000)]
    pub heartbeat_lease_ms: i64,
    /// How often the dispatcher looks for steps whose backoff expired. New tasks and
    /// results wake it at once; this is the safety net.
    #[arg(long, env = "TASKER_POLL_INTERVAL_MS", default_value_t = 5_000)]
    pub poll_interval_ms: u64,
    /// Publish lifecycle events (`task.completed`, `step.failed`…) to the events exchange.
    #[arg(long, env = "TASKER_EVENTS", default_value_t = true, action = clap::ArgAction::Set)]
    pub events: bool,
    /// How often the events relay looks for transitions committed by other coordinators
    /// (this coordinator's own commits wake it at once).
    #[arg(long, env = "TASKER_EVENTS_POLL_MS", default_value_t = 10_000)]
    pub events_poll_ms: u64,
    /// How often the gauges (work in flight, queue depths) are refreshed.
    #[arg(long, env = "TASKER_GAUGE_INTERVAL_MS", default_value_t = 15_000)]
    pub gauge_interval_ms: u64,
    /// How often expired leases are swept.
    #[arg(long, env = "TASKER_SWEEP_INTERVAL_MS", default_value_t = 10_000)]
    pub sweep_interval_ms: u64,
    /// Largest request body accepted (413 past it).
    #[arg(long, env = "TASKER_MAX_BODY_BYTES", default_value_t = 8 * 1024 * 1024)]
    pub max_body_bytes: usize,
}
