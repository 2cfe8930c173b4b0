//! The worker's settings: flags, or the environment variables named beside them.

use tasker_protocol::config::BrokerSettings;

/// Everything a worker needs.
#[derive(Debug, Clone, clap::Args)]
pub struct WorkerSettings {
    /// How to reach RabbitMQ.
    #[command(flatten)]
    pub broker: BrokerSettings,
    /// Namespaces to serve, comma separated. Empty: every namespace, including ones
    /// registered after the worker started.
    #[arg(
        long,
        env = "TASKER_NAMESPACES",
        value_delimiter = ',',
        default_value = ""
    )]
    pub namespaces: Vec<String>,
    /// Steps run at once. The broker prefetch is twice this: the second half holds
    /// steps whose results are being published (docs/operating.md, "Concurrency and
    /// prefetch").
    #[arg(long, env = "TASKER_CONCURRENCY", default_value_t = 16,
          value_parser = clap::value_parser!(u16).range(1..))]
    pub concurrency: u16,
    /// How often the worker tells coordinators which steps it is still running. Keep it
    /// well under the coordinators' `TASKER_HEARTBEAT_LEASE_MS`.
    #[arg(long, env = "TASKER_HEARTBEAT_INTERVAL_MS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(100..=600_000))]
    pub heartbeat_interval_ms: u64,
    /// Serve Prometheus metrics (`/metrics`) and `/health/live` on this address. Unset:
    /// no HTTP server.
    #[arg(long, env = "TASKER_METRICS_ADDR")]
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Largest result a handler may return, in bytes of JSON. A larger one fails the step
    /// permanently (code `result_too_large`) instead of reaching the broker.
    #[arg(long, env = "TASKER_MAX_RESULT_BYTES", default_value_t = crate::executor::DEFAULT_MAX_RESULT_BYTES)]
    pub max_result_bytes: usize,
    /// This worker's id in results and logs. Default: host name and process id.
    #[arg(long, env = "TASKER_WORKER_ID")]
    pub worker_id: Option<String>,
    /// For fault tests only (built with the `failpoints` feature): pause the first step
    /// that reaches this stage (`received`, `running`, `publishing`, `acking`, or
    /// `heartbeating`: the first heartbeat that reports a running step), log
    /// `failpoint: paused at <stage>`, and hold it there until the broker connection it
    /// came on is lost, so a test can cut the connection at exactly that moment.
    #[cfg(feature = "failpoints")]
    #[arg(long, env = "TASKER_FAILPOINT_PAUSE_AT", hide = true)]
    pub failpoint_pause_at: Option<String>,
}

impl WorkerSettings {
    /// The namespaces to serve, or `None` for all.
    pub fn selected_namespaces(&self) -> Option<Vec<String>> {
        let namespaces: Vec<String> = self
            .namespaces
            .iter()
            .map(|n| n.trim().to_owned())
            .filter(|n| !n.is_empty())
            .collect();
        (!namespaces.is_empty()).then_some(namespaces)
    }

    /// The configured id, or `<host>-<pid>`.
    pub fn worker_id(&self) -> String {
        self.worker_id.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/etc/hostname")
                .map(|h| h.trim().to_owned())
                .unwrap_or_else(|_| "worker".to_owned());
            format!("{host}-{}", std::process::id())
        })
    }
}
