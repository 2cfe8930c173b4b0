//! The API's connection handling: at most `TASKER_HTTP_MAX_CONNECTIONS` connections at
//! once (the next ones wait in the kernel's accept queue), and a client must start within
//! `TASKER_HTTP_HEADER_TIMEOUT_MS` of connecting and send a request's headers within that
//! long of their first byte, or of its previous answer: silent and slow-header clients
//! cannot hold connections open for ever. HTTP/1 only: telling HTTP/2 from HTTP/1 would
//! wait for a preface with no time limit, and an HTTP/2 connection has no header
//! timeout, so a client that sent one byte, or a preface and nothing more, would hold its
//! slot for ever. Requests already being answered when the coordinator stops are
//! finished first; every connection is a task on the application's tracker, so
//! none outlives the coordinator (see `service`).

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Limits on the API's connections.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ConnectionLimits {
    /// Connections served at once.
    pub(crate) max_connections: usize,
    /// How long a client may take to send a request's headers.
    pub(crate) header_timeout: Duration,
}

/// How long the requests in progress get to finish once the coordinator stops.
const DRAIN: Duration = Duration::from_secs(10);

/// Serve `app` on `listener` until `stop` is cancelled, then let the requests in progress
/// finish (for at most [`DRAIN`]). Each connection is spawned on `tasks`.
pub(crate) async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ConnectionLimits,
    stop: CancellationToken,
    tasks: TaskTracker,
) {
    let connections = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let graceful = GracefulShutdown::new();
    // Cancelled when the drain is over: the connections still open are then dropped.
    let abandon = CancellationToken::new();
    let mut builder = auto::Builder::new(TokioExecutor::new()).http1_only();
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    loop {
        let permit = tokio::select! {
            permit = connections.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
            () = stop.cancelled() => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    // Out of file descriptors, or a connection reset before it was
                    // accepted: wait a little instead of spinning.
                    tracing::warn!(%error, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = stop.cancelled() => break,
        };
        let service = TowerToHyperService::new(app.clone());
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let header_timeout = limits.header_timeout;
        let (stop, abandon) = (stop.clone(), abandon.clone());
        tasks.spawn(async move {
            // hyper times the headers from their first byte: a client that connects and
            // sends nothing is timed here (and not waited for once the coordinator stops:
            // it has no request in progress).
            let mut first = [0_u8; 1];
            let peeked = tokio::select! {
                peeked = tokio::time::timeout(header_timeout, stream.peek(&mut first)) => peeked,
                () = stop.cancelled() => return,
            };
            match peeked {
                Ok(Ok(read)) if read > 0 => {}
                _ => return,
            }
            let connection = builder
                .serve_connection(TokioIo::new(stream), service)
                .into_owned();
            // Errors here are the client's (gone, too slow, not HTTP): nothing to do.
            tokio::select! {
                _ = watcher.watch(connection) => {}
                () = abandon.cancelled() => {}
            }
            drop(permit);
        });
    }
    drop(listener);
    if tokio::time::timeout(DRAIN, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("requests still in progress after {DRAIN:?}; closing their connections");
        abandon.cancel();
    }
}
