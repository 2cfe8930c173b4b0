//! The coordinator's settings: flags, or the environment variables named beside them.

use std::net::SocketAddr;
use std::path::PathBuf;

use tasker_shared::config::{BrokerSettings, DatabaseSettings};
use tasker_shared::events::EventSelection;

/// Everything `tasker-coordinator serve` needs.
#[derive(Debug, Clone, clap::Args)]
pub struct CoordinatorSettings {
    /// How to reach PostgreSQL.
    #[command(flatten)]
    pub database: DatabaseSettings,
    /// How to reach RabbitMQ.
    #[command(flatten)]
    pub broker: BrokerSettings,
    /// Who may call the API (docs/security.md).
    #[command(flatten)]
    pub auth: AuthSettings,
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
    #[arg(long, env = "TASKER_BATCH_SIZE", default_value_t = 256,
          value_parser = clap::value_parser!(i64).range(1..=4096))]
    pub batch_size: i64,
    /// API connections served at once; further clients wait to be accepted. Keep it
    /// under the process's file-descriptor limit (`ulimit -n`) less the database pool.
    #[arg(long, env = "TASKER_HTTP_MAX_CONNECTIONS", default_value_t = 512,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub http_max_connections: u32,
    /// How long an API client may take to start sending once connected, and to send a
    /// request's headers, before its connection is closed (silent and slow-header
    /// clients would otherwise hold it for ever).
    #[arg(long, env = "TASKER_HTTP_HEADER_TIMEOUT_MS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(100..))]
    pub http_header_timeout_ms: u64,
    /// How long a request's body may take to arrive once its headers have: a body sent
    /// slowly, or never finished, would otherwise hold its share of
    /// `TASKER_MAX_INFLIGHT_BODY_BYTES` for ever (answered 408).
    #[arg(long, env = "TASKER_HTTP_BODY_TIMEOUT_MS", default_value_t = 60_000,
          value_parser = clap::value_parser!(u64).range(100..))]
    pub http_body_timeout_ms: u64,
    /// Result batches applied at once, each by its own consumer of the results queue
    /// (the second gets messages only while the first has its prefetch full). On two
    /// cores a second one brought no throughput and cost CPU per step (BENCHMARKS.md).
    #[arg(long, env = "TASKER_RESULT_CONSUMERS", default_value_t = 1,
          value_parser = clap::value_parser!(u16).range(1..=16))]
    pub result_consumers: u16,
    /// How long a claimed step may go without the broker confirming its publish before it
    /// is dispatched again (a coordinator that died between claim and publish). A
    /// confirmed step has no lease: it waits in its durable queue as long as the queue is
    /// long. Also the age past which the sweeper compares confirmed steps with their
    /// queue, to find messages lost with a deleted queue.
    #[arg(long, env = "TASKER_DISPATCH_LEASE_MS", default_value_t = 60_000,
          value_parser = clap::value_parser!(i64).range(1_000..))]
    pub dispatch_lease_ms: i64,
    /// Added to a running step's `timeout_ms` before its lease expires and the step is
    /// treated as lost (worker vanished).
    #[arg(long, env = "TASKER_LEASE_GRACE_MS", default_value_t = 30_000,
          value_parser = clap::value_parser!(i64).range(0..))]
    pub lease_grace_ms: i64,
    /// A running step whose worker sent no heartbeat for this long counts as lost (its
    /// worker vanished) and is retried. Keep it at least three times the workers'
    /// `TASKER_HEARTBEAT_INTERVAL_MS`.
    #[arg(long, env = "TASKER_HEARTBEAT_LEASE_MS", default_value_t = 30_000,
          value_parser = clap::value_parser!(i64).range(1_000..))]
    pub heartbeat_lease_ms: i64,
    /// How often the dispatcher looks for steps whose backoff expired. New tasks and
    /// results wake it at once; this is the safety net.
    #[arg(long, env = "TASKER_POLL_INTERVAL_MS", default_value_t = 5_000,
          value_parser = clap::value_parser!(u64).range(10..))]
    pub poll_interval_ms: u64,
    /// Publish lifecycle events (`task.completed`, `step.failed`…) to the events exchange:
    /// `true`, `false`, or the routing-key patterns of those to publish
    /// (`task.*,step.failed`).
    #[arg(long, env = "TASKER_EVENTS", default_value = "true")]
    pub events: EventSelection,
    /// How often the events relay looks for transitions committed by other coordinators
    /// (this coordinator's own commits wake it at once).
    #[arg(long, env = "TASKER_EVENTS_POLL_MS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(10..))]
    pub events_poll_ms: u64,
    /// How often the gauges (work in flight, queue depths) are refreshed.
    #[arg(long, env = "TASKER_GAUGE_INTERVAL_MS", default_value_t = 15_000,
          value_parser = clap::value_parser!(u64).range(10..))]
    pub gauge_interval_ms: u64,
    /// How long finished tasks are kept (`30d`, `12h`…), or `off`: older ones are removed
    /// with their steps, edges and history, in bounded batches, by one coordinator at a
    /// time (docs/operating.md, "Retention").
    #[arg(long, env = "TASKER_RETENTION", default_value = "30d")]
    pub retention: crate::retention::Retention,
    /// How often a coordinator looks for finished tasks past the retention.
    #[arg(long, env = "TASKER_RETENTION_INTERVAL_MS", default_value_t = 60_000,
          value_parser = clap::value_parser!(u64).range(100..))]
    pub retention_interval_ms: u64,
    /// How late a schedule's fire time may be and still run: one past it was missed (no
    /// coordinator ran then), and runs only as its `catch_up` says.
    #[arg(long, env = "TASKER_SCHEDULE_GRACE_MS", default_value_t = 10_000)]
    pub schedule_grace_ms: u64,
    /// How often expired leases are swept.
    #[arg(long, env = "TASKER_SWEEP_INTERVAL_MS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(10..))]
    pub sweep_interval_ms: u64,
    /// For chaos tests only (built with the `failpoints` feature): after this many
    /// claimed batches, stop between the claim's commit and its publish, log
    /// `failpoint: paused after claim`, and wait there for ever, so a test can kill the
    /// coordinator at exactly that moment.
    #[cfg(feature = "failpoints")]
    #[arg(long, env = "TASKER_FAILPOINT_PAUSE_AFTER_CLAIMS", hide = true)]
    pub failpoint_pause_after_claims: Option<u64>,
    /// Largest request body accepted (413 past it).
    #[arg(long, env = "TASKER_MAX_BODY_BYTES", default_value_t = 8 * 1024 * 1024)]
    pub max_body_bytes: usize,
    /// Largest task context accepted, in bytes of compact JSON (413 past it). Each step
    /// message carries the context, so this also bounds message size.
    #[arg(long, env = "TASKER_MAX_CONTEXT_BYTES", default_value_t = 1024 * 1024)]
    pub max_context_bytes: usize,
    /// Largest step message published, in bytes (the task's context and the step's
    /// parents' results travel in it). A larger one is not sent: its step fails for good
    /// with code `step_message_too_large`. Keep it at most RabbitMQ's `max_message_size`
    /// (16 MiB by default since RabbitMQ 4.0, 128 MiB before), or the broker closes the
    /// publishing channel at every try.
    #[arg(long, env = "TASKER_MAX_STEP_MESSAGE_BYTES",
          default_value_t = crate::publisher::DEFAULT_MAX_MESSAGE_BYTES,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new()
              .range(1024 * 1024..=512 * 1024 * 1024))]
    pub max_step_message_bytes: usize,
    /// Largest template document accepted by `POST /v1/templates`, in bytes (413 past it).
    #[arg(long, env = "TASKER_MAX_TEMPLATE_BYTES", default_value_t = 1024 * 1024)]
    pub max_template_bytes: usize,
    /// Most steps a template registered through the API may have (422 past it); at most
    /// the parser's own cap of 10,000.
    #[arg(long, env = "TASKER_MAX_TEMPLATE_STEPS", default_value_t = 1_000,
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub max_template_steps: u32,
    /// Bytes of request bodies the API holds at once (each request counts its
    /// `Content-Length`, or `TASKER_MAX_BODY_BYTES` when it gives none, until it is
    /// answered); a request past it answers 503 `overloaded` with `Retry-After: 1`.
    #[arg(long, env = "TASKER_MAX_INFLIGHT_BODY_BYTES", default_value_t = 256 * 1024 * 1024)]
    pub max_inflight_body_bytes: usize,
    /// Task creations admitted at once (waiting for or in a creating statement); past it
    /// `POST /v1/tasks` answers 503 `overloaded` with `Retry-After`, so a flood of creates
    /// holds bounded memory instead of queueing without limit.
    #[arg(long, env = "TASKER_MAX_PENDING_CREATES", default_value_t = 1_024,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_pending_creates: u32,
    /// Most elements a `for_each` list may have; a longer one fails its step with
    /// `fan_out_too_large`.
    #[arg(long, env = "TASKER_MAX_FAN_OUT", default_value_t = 10_000,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_fan_out: u32,
    /// Most tasks a tree of child tasks may hold, its root included; a `tasker.task` step
    /// whose tree is full fails with `child_task_tree_too_large`.
    #[arg(long, env = "TASKER_MAX_TASK_TREE", default_value_t = 10_000,
          value_parser = clap::value_parser!(u32).range(2..=1_000_000))]
    pub max_task_tree: u32,
}

impl CoordinatorSettings {
    /// How long a running step's lease lasts: the heartbeat lease, and the grace past its
    /// timeout.
    pub(crate) fn lease_policy(&self) -> tasker_shared::store::transitions::LeasePolicy {
        tasker_shared::store::transitions::LeasePolicy {
            grace_ms: self.lease_grace_ms,
            heartbeat_lease_ms: self.heartbeat_lease_ms,
        }
    }
}

/// Authentication of API calls (docs/security.md). Off by default, for local runs.
#[derive(Debug, Clone, clap::Args)]
pub struct AuthSettings {
    /// `on`: every API call but `/health/live`, `/health/ready` and `/openapi.json` needs
    /// a bearer token (an API token from `tasker-coordinator token create`, or a JWT)
    /// with the route's scope. `off`: anyone who reaches the port may do anything.
    #[arg(
        long = "auth",
        env = "TASKER_AUTH",
        value_enum,
        default_value_t = AuthMode::Off
    )]
    pub mode: AuthMode,
    /// Accept JWTs signed with HS256 and this shared secret (at least 32 bytes; a shorter
    /// one is refused at start).
    #[arg(long, env = "TASKER_JWT_HS256_SECRET", hide_env_values = true)]
    pub jwt_hs256_secret: Option<Secret>,
    /// Accept JWTs signed with RS256 by the holder of this public key's private key: the
    /// PEM text itself (starting `-----BEGIN`), or the path of a file holding it.
    #[arg(long, env = "TASKER_JWT_RS256_PUBLIC_KEY")]
    pub jwt_rs256_public_key: Option<String>,
    /// When set, a JWT must carry this issuer (`iss`).
    #[arg(long, env = "TASKER_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,
    /// When set (comma-separated), a JWT's audience (`aud`) must be one of these.
    #[arg(long, env = "TASKER_JWT_AUDIENCE", value_delimiter = ',')]
    pub jwt_audience: Vec<String>,
    /// Clock skew allowed when checking a JWT's `exp` and `nbf`.
    #[arg(long, env = "TASKER_JWT_LEEWAY_SECONDS", default_value_t = 30)]
    pub jwt_leeway_seconds: u64,
    /// With authentication on, whether `/metrics` and `/health/status` need a token with
    /// `metrics:read` too (`on`/`off`, or `true`/`false`; off: they stay open to scrapers
    /// and probes).
    #[arg(long, env = "TASKER_METRICS_AUTH", default_value_t = false, action = clap::ArgAction::Set,
          value_parser = clap::builder::BoolishValueParser::new())]
    pub metrics_auth: bool,
}

/// Whether API calls are authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AuthMode {
    /// Every route is open (local runs; a loud warning is logged at start).
    Off,
    /// Bearer tokens with scopes are required.
    On,
}

/// A secret setting: never printed, by `Debug` or otherwise.
pub use tasker_shared::config::Secret;

#[cfg(test)]
mod auth_tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        settings: CoordinatorSettings,
    }

    #[test]
    fn auth_is_off_by_default_and_secrets_never_print() {
        let cli = Cli::try_parse_from(["test"]).unwrap();
        assert_eq!(cli.settings.auth.mode, AuthMode::Off);
        assert!(!cli.settings.auth.metrics_auth);
        assert_eq!(cli.settings.events, EventSelection::All);
        let cli = Cli::try_parse_from([
            "test",
            "--auth",
            "on",
            "--jwt-hs256-secret",
            "s3cret-s3cret",
            "--jwt-audience",
            "tasker,ops",
            "--metrics-auth",
            "on",
        ])
        .unwrap();
        assert_eq!(cli.settings.auth.mode, AuthMode::On);
        assert_eq!(cli.settings.auth.jwt_audience, ["tasker", "ops"]);
        assert!(cli.settings.auth.metrics_auth);
        let printed = format!("{:?}", cli.settings);
        assert!(!printed.contains("s3cret"), "{printed}");
        assert!(
            printed.contains("jwt_hs256_secret: Some(\"***\")"),
            "{printed}"
        );
    }
}
