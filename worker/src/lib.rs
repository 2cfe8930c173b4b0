//! # tasker-worker
//!
//! A stateless Tasker worker: it consumes the steps of its namespaces from RabbitMQ, runs
//! their handlers concurrently, and publishes the results. Run the `tasker-worker` binary
//! for the built-in handlers, or build your own worker with your handlers:
//!
//! ```no_run
//! use tasker_worker::HandlerRegistry;
//!
//! #[tokio::main]
//! async fn main() -> anyhow::Result<()> {
//!     let registry = HandlerRegistry::with_builtins(); // .register("my.handler", MyHandler)
//!     tasker_worker::run("my-worker", registry).await
//! }
//! ```
//!
//! `worker/examples/order_worker.rs` is a complete worker with custom handlers.
//!
//! ## Layout
//! - [`handler`]: the [`StepHandler`] trait, [`StepContext`], [`StepError`], [`HandlerRegistry`].
//! - [`handlers`]: the built-in handlers.
//! - `cli`: [`run`], the whole `main` of a worker binary.
//! - `executor`: decides one step's outcome (timeout, panics).
//! - `failpoint`: the fault-test hook that holds a step at one stage (only with the
//!   `failpoints` feature).
//! - `runtime`: [`Worker`]: consuming, concurrency, publishing, acking, shutdown.
//! - `results`: results published in batches, each step answered at its confirm.
//! - `notices`: batched started notices, heartbeats and the worker's status broadcast.
//! - `metrics`: the Prometheus metrics and their HTTP server.

#![warn(missing_docs)]

mod cli;
mod executor;
#[cfg(feature = "failpoints")]
mod failpoint;
pub mod handler;
pub mod handlers;
mod metrics;
mod notices;
mod results;
mod runtime;
mod settings;

pub use cli::run;
pub use handler::{HandlerRegistry, StepContext, StepError, StepHandler};
pub use runtime::Worker;
pub use settings::WorkerSettings;
