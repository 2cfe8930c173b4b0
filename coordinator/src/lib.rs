//! # tasker-coordinator
//!
//! The coordinator owns the truth in PostgreSQL and moves work through RabbitMQ: it
//! serves the HTTP API, claims ready steps and publishes them, applies workers' results,
//! and heals lost work. Several coordinators may run against one database.
//!
//! ## Layout
//! - [`Application`] (`startup`): builds everything from [`CoordinatorSettings`] and runs it.
//! - `http/`: the API of `docs/api.md` (templates, tasks, health); `http/auth` guards it.
//! - `auth`: bearer tokens (API tokens, JWTs) and scopes; `tasker-coordinator token`.
//! - `dispatcher`: claims ready steps in batches (`FOR UPDATE SKIP LOCKED`) and publishes them.
//! - `result_processor`: applies results in batches and dispatches the dependents they
//!   make ready, in the same transaction.
//! - `creator`: writes the task creations that arrive together with one statement.
//! - `sweeper`: expires leases of lost steps.
//! - `control`: announces namespaces to workers and hears their status.
//! - `events`: relays the transition history to the lifecycle events exchange.
//! - `retention`: removes finished tasks past `TASKER_RETENTION`; `tasker-coordinator prune`.
//! - `publisher`: publishes claimed steps with publisher confirms.
//! - `metrics`: the Prometheus metrics; `gauges`: the loop that refreshes the gauges.
//! - `service`: the one start/stop shape of the background loops above, and how every
//!   spawned task is tracked until shutdown.

mod auth;
mod control;
mod creator;
mod dispatcher;
mod events;
mod gauges;
mod http;
mod link;
mod live;
mod metrics;
mod operations;
mod publisher;
mod result_processor;
mod retention;
mod scheduler;
mod service;
mod settings;
mod startup;
mod sweeper;

pub use auth::command::TokenArgs;
pub use retention::{Age, PruneArgs, Retention};
pub use settings::{AuthMode, AuthSettings, CoordinatorSettings, Secret};
pub use startup::Application;

/// The API's OpenAPI 3.1 description as pretty JSON (what `GET /openapi.json` serves).
pub fn openapi_json() -> String {
    http::openapi::document_text()
}
