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

/// The binaries' shutdown trigger: SIGTERM or Ctrl-C (SIGINT), listened for from the
/// moment this is called (call it first, so a signal during start-up is not lost). The
/// returned future resolves at the first; a second ends the process at once (exit 130),
/// for an operator who will not wait for the drain.
///
/// Call it inside a Tokio runtime.
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    let listen = |kind: tokio::signal::unix::SignalKind, name: &'static str| {
        tokio::signal::unix::signal(kind)
            .inspect_err(|error| tracing::error!(%error, "cannot listen for {name}"))
            .ok()
    };
    #[cfg(unix)]
    let (mut terminate, mut interrupt) = (
        listen(tokio::signal::unix::SignalKind::terminate(), "SIGTERM"),
        listen(tokio::signal::unix::SignalKind::interrupt(), "Ctrl-C"),
    );
    async move {
        #[cfg(unix)]
        {
            let mut next = async move || {
                let terminated = async {
                    match terminate.as_mut() {
                        Some(signal) => signal.recv().await,
                        None => std::future::pending().await,
                    }
                };
                let interrupted = async {
                    match interrupt.as_mut() {
                        Some(signal) => signal.recv().await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    _ = terminated => "SIGTERM",
                    _ = interrupted => "Ctrl-C",
                }
            };
            let first = next().await;
            tracing::info!("{first} received; shutting down (a second signal stops at once)");
            tokio::spawn(async move {
                let second = next().await;
                tracing::warn!("{second} received again: stopping at once");
                std::process::exit(130);
            });
        }
        #[cfg(not(unix))]
        {
            if let Err(error) = tokio::signal::ctrl_c().await {
                tracing::error!(%error, "cannot listen for Ctrl-C");
                std::future::pending::<()>().await;
            }
            tracing::info!("Ctrl-C received; shutting down");
        }
    }
}
