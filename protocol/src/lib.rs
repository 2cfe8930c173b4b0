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
/// returned future resolves at the first; another one more than a second later ends the
/// process at once (exit code 128 + the signal's number: 143, 130), for an operator who
/// will not wait for the drain. One within that second is the same stop delivered twice
/// (a terminal's Ctrl-C to the process group while a wrapper forwards SIGTERM).
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
                    _ = terminated => ("SIGTERM", 143),
                    _ = interrupted => ("Ctrl-C", 130),
                }
            };
            let (first, _) = next().await;
            let received = tokio::time::Instant::now();
            tracing::info!("{first} received; shutting down (a second signal stops at once)");
            tokio::spawn(async move {
                loop {
                    let (second, code) = next().await;
                    if received.elapsed() > std::time::Duration::from_secs(1) {
                        tracing::warn!("{second} received again: stopping at once");
                        std::process::exit(code);
                    }
                }
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
