//! # tasker-protocol
//!
//! What a worker needs to speak to Tasker, and nothing of the coordinator's database or
//! templates: the wire messages, the broker topology, message signatures, the settings
//! every process reads, metrics plumbing and telemetry. The coordinator's crate
//! (`tasker-shared`) re-exports these modules.
//!
//! ## Layout
//! - [`messages`]: the wire protocol between coordinators and workers (docs/protocol.md).
//! - [`broker`]: RabbitMQ names, declarations and publishing helpers.
//! - [`signing`]: message signatures (`TASKER_MESSAGE_KEY`).
//! - [`config`]: settings read from flags and environment variables.
//! - [`metrics`]: Prometheus plumbing and the database statement counter.
//! - [`telemetry`]: logging, OpenTelemetry traces, and trace-context propagation.

#![warn(missing_docs)]

pub mod broker;
pub mod config;
pub mod messages;
pub mod metrics;
pub mod signing;
pub mod telemetry;

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
