//! # tasker-shared
//!
//! What every Tasker process shares: the domain's states, templates, the message protocol,
//! the broker topology, persistence and configuration.
//!
//! ## Layout
//! - [`states`]: task and step states and the allowed transitions (with a diagram).
//! - [`template`]: parsing and validating templates (the project's format and
//!   tasker-engine 1.x files), and validating a task's context against its schema.
//! - [`messages`]: the wire protocol between coordinators and workers.
//! - [`broker`]: RabbitMQ names, declarations and publishing helpers.
//! - [`db`]: the PostgreSQL pool and the embedded migrations.
//! - [`store`]: every query; [`store::transitions`] is the only place states change.
//! - [`events`]: lifecycle event names and payloads.
//! - [`metrics`]: Prometheus plumbing and the database statement counter.
//! - [`config`]: settings read from flags and environment variables.
//! - [`telemetry`]: logging, OpenTelemetry traces, and trace-context propagation.

#![warn(missing_docs)]

pub mod broker;
pub mod config;
pub mod db;
pub mod events;
pub mod messages;
pub mod metrics;
pub mod signing;
pub mod states;
pub mod store;
pub mod telemetry;
pub mod template;

/// Resolves on SIGTERM or Ctrl-C: the binaries' shutdown trigger.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            tracing::error!(%error, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::error!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("Ctrl-C received; shutting down"),
        () = terminate => tracing::info!("SIGTERM received; shutting down"),
    }
}
