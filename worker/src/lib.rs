//! # tasker-worker
//!
//! A stateless Tasker worker: it consumes the steps of its namespaces from RabbitMQ, runs
//! their handlers concurrently, and publishes the results. Run the `tasker-worker` binary
//! for the built-in handlers, or build your own worker with your handlers:
//!
//! ```no_run
//! use clap::Parser;
//! use tasker_worker::{HandlerRegistry, Worker, WorkerSettings};
//!
//! #[derive(Parser)]
//! struct Cli {
//!     #[command(flatten)]
//!     worker: WorkerSettings,
//! }
//!
//! # async fn run() -> anyhow::Result<()> {
//! let settings = Cli::parse().worker;
//! let registry = HandlerRegistry::with_builtins(); // .register("my.handler", MyHandler)
//! let worker = Worker::build(settings, registry).await?;
//! worker.run_until_stopped(tasker_shared::shutdown_signal()).await
//! # }
//! ```
//!
//! `worker/examples/order_worker.rs` is a complete worker with custom handlers.
//!
//! ## Layout
//! - [`handler`]: the [`StepHandler`] trait, [`StepContext`], [`StepError`], [`HandlerRegistry`].
//! - [`handlers`]: the built-in handlers.
//! - `executor`: decides one step's outcome (timeout, panics).
//! - `runtime`: [`Worker`]: consuming, concurrency, publishing, acking, shutdown.
//! - `notices`: batched started notices, heartbeats and the worker's status broadcast.
//! - `metrics`: the Prometheus metrics and their HTTP server.

#![warn(missing_docs)]

mod executor;
pub mod handler;
pub mod handlers;
mod metrics;
mod notices;
mod runtime;
mod settings;

pub use handler::{HandlerRegistry, StepContext, StepError, StepHandler};
pub use runtime::Worker;
pub use settings::WorkerSettings;
